"""Attention, rotary, KV cache and blocks: against naive references and transformers' Llama."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from visto.nn.attention import (
    Attention,
    KVCache,
    RotaryEmbedding,
    apply_rotary,
    padding_mask_to_attention_mask,
    position_ids_from_padding,
)
from visto.nn.transformer import MLP, DecoderBlock, EncoderBlock, RMSNorm, SwiGLU


def naive_attention(attn: Attention, x, context=None, mask=None):
    """Softmax(QK^T / sqrt(d)) V written out by hand, heads repeated for GQA."""
    B, T, _ = x.shape
    src = x if context is None else context
    S = src.shape[1]
    q = attn.q_proj(x).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(src).view(B, S, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(src).view(B, S, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    rep = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.out(y.transpose(1, 2).reshape(B, T, -1))


def test_gqa_self_attention_matches_naive_with_mask():
    torch.manual_seed(0)
    attn = Attention(dim=32, n_heads=4, n_kv_heads=2)
    x = torch.randn(2, 5, 32)
    causal = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    torch.testing.assert_close(attn(x, causal=True), naive_attention(attn, x, mask=causal))
    torch.testing.assert_close(attn(x), naive_attention(attn, x))
    random_mask = torch.rand(2, 1, 5, 5) > 0.3
    random_mask[..., 0] = True  # every query sees at least one key
    torch.testing.assert_close(
        attn(x, mask=random_mask), naive_attention(attn, x, mask=random_mask)
    )


def test_cross_attention_uses_context_and_out_proj_name():
    torch.manual_seed(0)
    attn = Attention(dim=16, n_heads=2, kv_dim=24, bias=True, out_name="out_proj")
    assert "out_proj.weight" in attn.state_dict() and "o_proj.weight" not in attn.state_dict()
    x, ctx = torch.randn(3, 4, 16), torch.randn(3, 7, 24)
    y = attn(x, ctx)
    assert y.shape == (3, 4, 16)
    torch.testing.assert_close(y, naive_attention(attn, x, context=ctx))


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pq: int, pk: int) -> float:
        cq, sq = rope(torch.tensor([[pq]]))
        ck, sk = rope(torch.tensor([[pk]]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item()

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


def test_padding_helpers():
    pad = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids_from_padding(pad).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert position_ids_from_padding(pad, past_length=3).tolist() == [[1], [3]]
    m = padding_mask_to_attention_mask(pad)
    assert m.shape == (2, 1, 4, 4)
    assert m[0, 0, 3].tolist() == [False, False, True, True]
    assert m[1, 0, 1].tolist() == [True, True, False, False]
    m1 = padding_mask_to_attention_mask(pad, q_len=1)  # a decode step sees everything real
    assert m1[0, 0, 0].tolist() == [False, False, True, True]


class TinyDecoder(nn.Module):
    """Just enough decoder to exercise DecoderBlock + KV cache the way an LM uses them."""

    def __init__(self, vocab: int = 50, dim: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            [DecoderBlock(dim, n_heads=4, n_kv_heads=2, mlp_hidden=64) for _ in range(layers)]
        )
        self.rope = RotaryEmbedding(dim // 4)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids, padding_mask, cache: KVCache | None = None):
        past = cache.length if cache is not None else 0
        rope = self.rope(position_ids_from_padding(padding_mask, past))
        mask = padding_mask_to_attention_mask(padding_mask, q_len=ids.shape[1])
        x = self.embed(ids)
        for i, block in enumerate(self.blocks):
            x = block(x, rope=rope, mask=mask, cache=None if cache is None else cache.layers[i])
        return self.head(x)


def test_left_padded_prefill_then_decode_matches_unbatched_full_forward():
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    continuations = [[20, 21, 22], [30, 31, 32]]
    # Reference: each sequence alone, no padding, no cache, all tokens at once.
    refs = []
    for p, c in zip(prompts, continuations, strict=True):
        ids = torch.tensor([p + c])
        refs.append(model(ids, torch.ones_like(ids))[0, len(p) - 1 :])  # logits predicting c
    # Batched: left-pad prompts, prefill, then feed one continuation token per step.
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    pad = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    cache = KVCache.empty(len(model.blocks))
    with torch.no_grad():
        steps = [model(ids, pad, cache)[:, -1]]
        for t in range(3):
            pad = torch.cat([pad, torch.ones(2, 1, dtype=pad.dtype)], dim=1)
            step_ids = torch.tensor([[c[t]] for c in continuations])
            steps.append(model(step_ids, pad, cache)[:, -1])
    assert cache.length == T + 3
    batched = torch.stack(steps, dim=1)  # (B, 4, V)
    for b in range(2):
        torch.testing.assert_close(batched[b], refs[b], atol=1e-5, rtol=1e-4)
    assert cache.select(torch.tensor([1])).layers[0].k.shape[0] == 1


def test_decoder_block_matches_transformers_llama_layer():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        attention_bias=False,
    )
    cfg._attn_implementation = "eager"
    theirs = LlamaDecoderLayer(cfg, layer_idx=0).eval()
    ours = DecoderBlock(32, n_heads=4, n_kv_heads=2, mlp_hidden=48).eval()
    ours.load_state_dict(theirs.state_dict())  # same names, same shapes: strict load
    x = torch.randn(2, 6, 32)
    pos = torch.arange(6)[None].expand(2, 6)
    cos_sin = LlamaRotaryEmbedding(cfg)(x, pos)
    causal = torch.full((6, 6), float("-inf")).triu(1)[None, None].expand(2, 1, 6, 6)
    out = theirs(x, attention_mask=causal, position_ids=pos, position_embeddings=cos_sin)
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(ours(x, rope=RotaryEmbedding(8)(pos)), out, atol=1e-5, rtol=1e-4)


def test_norms_and_mlps():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    n = RMSNorm(8)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(n(x), expected)
    assert set(MLP(8, 16).state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert set(SwiGLU(8, 16).state_dict()) == {
        "gate_proj.weight",
        "up_proj.weight",
        "down_proj.weight",
    }
    with pytest.raises(ValueError, match="unknown activation"):
        MLP(8, 16, act="nope")
    block = EncoderBlock(8, n_heads=2, mlp_hidden=16)
    assert block(x).shape == x.shape
    assert not torch.allclose(block(x, causal=True)[:, 0], block(x)[:, 0])
