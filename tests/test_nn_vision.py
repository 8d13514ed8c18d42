"""ViT: shapes, options, and parity with a tiny random transformers CLIPVisionModel."""

from __future__ import annotations

import pytest
import torch

from visto.errors import UserError
from visto.nn.vision import (
    ViT,
    ViTConfig,
    load_transformers_clip_vision,
    sincos_position_embedding_2d,
)


def test_matches_transformers_clip_vision_model(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    hf_cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    theirs = CLIPVisionModel(hf_cfg).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_transformers_clip_vision(tmp_path).eval()
    assert ours.config.act == "quick_gelu" and ours.config.layers == 3

    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = theirs(pixel_values=pixels, output_hidden_states=True)
        out = ours(pixels)
        penultimate = ours(pixels, feature_layer=-2, pooled=False)
    assert (out.pooled - ref.pooler_output).abs().max() < 1e-4
    assert (out.features - ref.last_hidden_state[:, 1:]).abs().max() < 1e-4
    assert (penultimate.features - ref.hidden_states[-2][:, 1:]).abs().max() < 1e-4
    assert penultimate.pooled is None
    # Export is the same map backwards: our state dict loads into theirs strictly.
    theirs.load_state_dict(ours.state_dict(), strict=False)
    missing = set(theirs.state_dict()) - set(ours.state_dict())
    assert missing <= {"embeddings.position_ids"}, missing


def test_shapes_pooling_and_sincos():
    torch.manual_seed(0)
    cfg = ViTConfig.preset("tiny", pool="mean", pos_embed="sincos")
    vit = ViT(cfg)
    assert not any("position_embedding" in k for k in vit.state_dict())  # fixed, not learned
    out = vit(torch.randn(3, 3, 32, 32))
    assert out.pooled.shape == (3, 32) and out.features.shape == (3, 16, 32)
    table = sincos_position_embedding_2d(4, 32)
    assert table.shape == (16, 32)
    assert len({tuple(row.tolist()) for row in table}) == 16  # every patch position distinct
    with pytest.raises(AssertionError, match="expects pixels"):
        vit(torch.randn(1, 3, 64, 64))


def test_config_validation_and_presets():
    small = ViTConfig.preset("small")
    assert small.num_patches == 64
    with pytest.raises(UserError, match="multiple of patch_size"):
        ViTConfig(image_size=30, patch_size=8)
    with pytest.raises(UserError, match="unknown ViT preset"):
        ViTConfig.preset("huge")


def test_conv_stem_keeps_the_patch_grid_and_trains():
    """The conv stem gives the same tokens as the patch embedding, its gradients reach the
    first conv, and a patch size it cannot reach by halving is refused."""
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, width=32, layers=1, heads=4, mlp_hidden=64)
    patch = ViT(cfg)
    conv = ViT(ViTConfig(**{**cfg.__dict__, "stem": "conv"}))
    x = torch.randn(2, 3, 32, 32)
    out = conv(x)
    assert out.features.shape == patch(x).features.shape == (2, 16, 32)
    (out.pooled * torch.randn_like(out.pooled)).sum().backward()  # (a plain sum is 0 after LN)
    first = conv.embeddings.patch_embedding[0]
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    with pytest.raises(UserError, match="power of 2"):
        ViTConfig(image_size=36, patch_size=6, stem="conv")
    with pytest.raises(UserError, match="stem"):
        ViTConfig(stem="hybrid")
