"""A tiny random transformers `IdeficsForVisionText2Text` (gated cross-attention + Perceiver
Resampler) loads into visto's Flamingo with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from visto.data.special_tokens import IMAGE_TOKEN_ID
from visto.errors import UserError
from visto.models.flamingo import from_idefics


def save_tiny_idefics(path, alpha_type: str = "float", interval: int = 2, extra_vocab: int = 2):
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    torch.manual_seed(0)
    config = IdeficsConfig(
        vocab_size=60, additional_vocab_size=extra_vocab, hidden_size=32, intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, cross_layer_interval=interval,
        alpha_initializer="zeros", alpha_type=alpha_type, use_resampler=True,
        tie_word_embeddings=False, max_position_embeddings=128,
        vision_config=dict(embed_dim=24, image_size=16, patch_size=8, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=48),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=3, resampler_depth=2,
                              resampler_n_heads=2, resampler_head_dim=8),
    )
    model = IdeficsForVisionText2Text(config).eval()
    with torch.no_grad():
        # Transformers' init (std 0.02) leaves the visual path a ~1e-4 effect on the logits;
        # variance-preserving weights, open gates and varied norms make every part count.
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)  # zeros would hide the visual path
            elif p.ndim >= 2:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(path)
    return model


def inputs(vocab: int):
    """Two rows, no padding: row 0 has two images, row 1 one; text before the first image."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, vocab, (2, 14), generator=g)
    ids[0, [3, 8]] = IMAGE_TOKEN_ID
    ids[1, 5] = IMAGE_TOKEN_ID
    pixels = torch.randn(2, 2, 3, 16, 16, generator=g)
    media_index = torch.cumsum(ids == IMAGE_TOKEN_ID, dim=1)  # (B, T)
    # Idefics takes the per-image mask as an input: token t reads image j iff j is the last
    # image at or before t (what its processor builds).
    image_attention_mask = (media_index[..., None] == torch.arange(1, 3)).long()  # (B, T, 2)
    return ids, pixels, image_attention_mask


@pytest.mark.parametrize("alpha_type,interval,extra", [("float", 2, 2), ("vector", 1, 0)])
def test_idefics_loads_with_equal_logits(tmp_path, alpha_type, interval, extra):
    theirs = save_tiny_idefics(tmp_path / "idefics", alpha_type, interval, extra)
    ours = from_idefics(tmp_path / "idefics")
    assert ours.config.cross_attn_every == interval and ours.config.gate == alpha_type
    ids, pixels, image_mask = inputs(60 + extra)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = theirs(
            input_ids=ids, attention_mask=mask, pixel_values=pixels, image_attention_mask=image_mask
        ).logits
        got = ours.logits({
            "input_ids": ids, "attention_mask": mask,
            # visto's layout: the batch's images concatenated, with the row of each
            "pixel_values": torch.cat([pixels[0], pixels[1, :1]]),
            "image_sample_index": torch.tensor([0, 0, 1]),
        })
    assert got.shape == expected.shape == (2, 14, 60 + extra)
    assert (got - expected).abs().max() < 1e-4, float((got - expected).abs().max())
    # The visual path matters here (gates are open), so the agreement is not the LM's alone.
    with torch.no_grad():
        other = ours.logits({"input_ids": ids, "attention_mask": mask,
                             "pixel_values": torch.randn(3, 3, 16, 16),
                             "image_sample_index": torch.tensor([0, 0, 1])})
    assert (other - got).abs().max() > 1e-2


def test_unsupported_idefics_settings_are_refused_with_reasons(tmp_path):
    save_tiny_idefics(tmp_path / "idefics")
    config_path = tmp_path / "idefics" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "qk_layer_norms": True, "use_resampler": False}))
    with pytest.raises(UserError, match="qk_layer_norms.*use_resampler|use_resampler.*qk_layer_norms"):
        from_idefics(tmp_path / "idefics")
    config_path.write_text(json.dumps({**config, "model_type": "llava"}))
    with pytest.raises(UserError, match="not 'idefics'"):
        from_idefics(tmp_path / "idefics")
