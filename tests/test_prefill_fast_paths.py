"""Issue 19, item 1 (third pass): the prefill's inference paths give the modules' numbers.

- the ViT's patch embedding as one matmul (with the class token's row and the positions in
  its bias) equals the conv path, for CLIP's and SigLIP's layouts, one image and several;
  hooks on the embedding still see it run; a swapped or changed patch conv is picked up;
- the decoder's last layer computes its queries for the last position only: first logits
  and greedy tokens equal the model's own, also after the last layer's weights change in
  place, alone, in equal-length rows (no padding: the rotary tables read without a lookup)
  and left-padded;
- the KV cache of a prefill is one buffer, zeroed, the window marked as the mask expects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visto.infer import Engine, PromptBatch, SamplingParams
from visto.nn.language import DecoderConfig, DecoderLM
from visto.nn.vision import ViT, ViTConfig


def _both_paths(vit: ViT, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and pooled output through the modules (autograd on) and at inference."""
    with torch.enable_grad():
        ref = vit(pixels, feature_layer=-2)
    with torch.inference_mode():
        fast = vit(pixels, feature_layer=-2)
    return (fast.features, ref.features.detach()), (fast.pooled, ref.pooled.detach())


@pytest.mark.parametrize(
    "overrides",
    [{}, {"pos_embed": "sincos"},
     {"cls_token": False, "pool": "mean", "pre_norm": False, "patch_bias": True}],
)  # fmt: skip
@pytest.mark.parametrize("batch", [1, 3])
def test_patch_embedding_as_a_matmul_equals_the_conv(overrides, batch):
    torch.manual_seed(0)
    vit = ViT(ViTConfig.preset("tiny", **overrides)).eval()
    with torch.no_grad():  # non-zero biases and class token: every term of the table counts
        if vit.embeddings.patch_embedding.bias is not None:
            vit.embeddings.patch_embedding.bias.normal_()
    pixels = torch.randn(batch, 3, 32, 32, dtype=torch.float64)  # cast like the conv path
    with torch.inference_mode():
        plan = vit._inference_plan(pixels)
    assert plan is not None and plan.embed is not None
    for fast, ref in _both_paths(vit, pixels):
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


def test_hooked_embeddings_run_as_modules_and_changes_are_picked_up():
    torch.manual_seed(1)
    vit = ViT(ViTConfig.preset("tiny")).eval()
    pixels = torch.randn(2, 3, 32, 32)
    seen = []
    handle = vit.embeddings.patch_embedding.register_forward_hook(lambda *_: seen.append(1))
    with torch.inference_mode():
        hooked = vit(pixels).features
    assert seen == [1]
    handle.remove()
    with torch.inference_mode():
        torch.testing.assert_close(vit(pixels).features, hooked, atol=1e-5, rtol=0)
    assert seen == [1]  # the matmul path: the conv module did not run

    with torch.no_grad():  # in place (a load, an optimizer step)
        vit.embeddings.patch_embedding.weight.mul_(2.0)
        vit.embeddings.position_embedding.weight.add_(0.5)
    changed = _both_paths(vit, pixels)[0]
    torch.testing.assert_close(*changed, atol=1e-5, rtol=0)
    assert not torch.allclose(changed[0], hooked)

    conv = vit.embeddings.patch_embedding
    vit.embeddings.patch_embedding = nn.Conv2d(3, conv.out_channels, 8, stride=8, bias=False)
    torch.testing.assert_close(*_both_paths(vit, pixels)[0], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    lm = DecoderLM(DecoderConfig(vocab_size=97, hidden_size=64, num_layers=3, num_heads=4,
                                 num_kv_heads=2, intermediate_size=96)).eval()  # fmt: skip
    with torch.no_grad():  # peaked logits: greedy choices far from ties
        for p in lm.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    return lm


class _Ids:
    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


@pytest.mark.parametrize("lengths", [[11], [9, 9], [12, 5]])
def test_last_layer_queries_of_the_last_position_alone(decoder, lengths):
    g = torch.Generator().manual_seed(len(lengths))
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in lengths]
    batch = PromptBatch.left_padded(prompts)
    fast = Engine(decoder, _Ids(), eos_token_ids=[], pad_id=0)
    slow = Engine(decoder, _Ids(), eos_token_ids=[], pad_id=0, fast=False)
    for step in range(2):
        logits, state = fast.prefill(batch, room=6)
        torch.testing.assert_close(logits, decoder.prefill(batch)[0], atol=1e-4, rtol=0)
        params = SamplingParams(max_new_tokens=6)
        got = [c.token_ids for c in fast.generate_batch(batch, params)]
        assert got == [c.token_ids for c in slow.generate_batch(batch, params)]
        if step == 0:  # the last layer's weights change in place (a load, a step)
            attn = decoder.model.layers[-1].self_attn
            with torch.no_grad():
                attn.q_proj.weight.mul_(-1.5)
                attn.k_proj.weight.mul_(0.5)
    padded = len(set(lengths)) > 1
    assert state.padded == padded
    T = batch.input_ids.shape[1]
    assert bool(state.real[:, :T].eq(batch.attention_mask.bool()).all())
    assert not bool(state.real[:, T:].any())
    expected_bias = torch.zeros_like(state.bias).masked_fill_(~state.real, float("-inf"))
    assert torch.equal(state.bias, expected_bias)
    assert state.positions.tolist() == lengths
    # one zeroed buffer for every layer's keys and values; the columns after the window unused
    storage = state.k[0].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == storage for t in (*state.k, *state.v))
    assert not bool(state.k[0][:, :, T:].any())
