"""The decoder LM: transformers parity both ways (Llama, Qwen2), padding, caching, presets."""

from __future__ import annotations

import json

import pytest
import torch
import transformers  # a hard dependency: a broken install fails here, not skips

from visto.errors import UserError
from visto.nn.language import DecoderConfig, DecoderLM

HF_SIZES = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)


def _hf_llama(tie: bool, theta: float = 10000.0):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**HF_SIZES, tie_word_embeddings=tie, rope_theta=theta)
    model = transformers.LlamaForCausalLM(cfg).eval()
    # Random init puts norms at 1 and some biases at 0; perturb everything so that a wrongly
    # mapped tensor cannot hide behind a default value.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _hf_qwen2():
    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(**HF_SIZES, tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, HF_SIZES["vocab_size"], (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is left-padded
    return ids, mask


@pytest.mark.parametrize(
    "make", [lambda: _hf_llama(tie=False), lambda: _hf_llama(True, 5e5), _hf_qwen2]
)
def test_transformers_checkpoint_loads_with_identical_logits(tmp_path, make):
    hf = make()
    hf.save_pretrained(tmp_path)
    ours = DecoderLM.from_pretrained(tmp_path)
    ids, mask = _inputs()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got, _ = ours(ids, attention_mask=mask)
    real = mask.bool()  # padding positions carry no meaning in either model
    assert (got[real] - expected[real]).abs().max() < 1e-4


@pytest.mark.parametrize("qwen", [False, True])
def test_saved_model_loads_in_transformers_with_identical_logits(tmp_path, qwen):
    torch.manual_seed(0)
    cfg = DecoderConfig.preset("tiny", vocab_size=101, qkv_bias=qwen, tie_word_embeddings=not qwen)
    ours = DecoderLM(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours.save_pretrained(tmp_path / "export")
    meta = json.loads((tmp_path / "export" / "config.json").read_text())
    assert meta["architectures"] == ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(0, 101, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got, _ = ours(ids, attention_mask=mask)
    assert (got[mask.bool()] - expected[mask.bool()]).abs().max() < 1e-4
    # And back: the round trip through the transformers format changes nothing.
    again = DecoderLM.from_pretrained(tmp_path / "export")
    assert again.config == ours.config
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_parameter_names_are_llama_for_causal_lm():
    model = DecoderLM(DecoderConfig.preset("tiny", tie_word_embeddings=False))
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert ours == theirs


def test_left_padding_does_not_change_a_rows_logits():
    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig.preset("tiny", vocab_size=64)).eval()
    ids = torch.randint(0, 64, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone, _ = model(ids)
        with_pad, _ = model(padded, attention_mask=mask)
    torch.testing.assert_close(with_pad[:, 3:], alone, atol=1e-5, rtol=0)


def test_inputs_embeds_path_equals_input_ids_and_trains():
    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig.preset("tiny", vocab_size=64))
    ids = torch.randint(0, 64, (2, 5))
    a, _ = model(ids)
    b, _ = model(inputs_embeds=model.embed(ids))
    torch.testing.assert_close(a, b)
    loss = torch.nn.functional.cross_entropy(a[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError):
        model(ids, inputs_embeds=model.embed(ids))


def test_presets_and_unsupported_checkpoints(tmp_path):
    assert DecoderConfig.preset("tiny").num_layers == 2
    small = DecoderLM(DecoderConfig.preset("small"))
    n = sum(p.numel() for p in small.parameters())
    assert 1_000_000 < n < 4_000_000
    with pytest.raises(UserError, match="preset"):
        DecoderConfig.preset("huge")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="gpt2"):
        DecoderLM.from_pretrained(tmp_path)
    with pytest.raises(UserError, match="not a model directory"):
        DecoderLM.from_pretrained(tmp_path / "nope")


def test_shape_mismatch_is_refused(tmp_path):
    hf = _hf_llama(tie=False)
    hf.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["intermediate_size"] = 40  # the weights say 48
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="shape"):
        DecoderLM.from_pretrained(tmp_path)


def test_hub_id_resolves_through_the_hub_cache_offline(tmp_path, monkeypatch):
    """A hub id goes through huggingface_hub's snapshot resolution; here the snapshot sits in
    a local hub cache and the hub is offline, so no network is touched."""
    constants = pytest.importorskip("huggingface_hub.constants")
    hf = _hf_llama(tie=True)
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    commit = "0" * 40
    hf.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ours = DecoderLM.from_pretrained("tiny-org/tiny-llama")
    ids, mask = _inputs()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got, _ = ours(ids, attention_mask=mask)
    assert (got[mask.bool()] - expected[mask.bool()]).abs().max() < 1e-4
    with pytest.raises(UserError, match="could not fetch"):
        DecoderLM.from_pretrained("tiny-org/not-cached")
