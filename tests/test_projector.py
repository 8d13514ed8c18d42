"""Projectors: output shapes per kind, and pixel shuffle's token count and ordering."""

from __future__ import annotations

import pytest
import torch

from visto.connectors.projector import ProjectorConfig, build_projector, pixel_shuffle
from visto.errors import UserError


@pytest.mark.parametrize(
    ("kind", "tokens"), [("linear", 64), ("mlp", 64), ("pixel_shuffle", 16)]
)
def test_shapes(kind, tokens):
    cfg = ProjectorConfig(kind=kind, scale_factor=2)
    proj = build_projector(cfg, 32, 48)
    out = proj(torch.randn(3, 64, 32))
    assert out.shape == (3, tokens, 48)
    assert cfg.num_tokens(64) == tokens


def test_mlp_names_and_hidden_width():
    proj = build_projector(ProjectorConfig(kind="mlp", hidden_dim=20), 8, 12)
    assert sorted(proj.state_dict()) == [
        "linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"
    ]
    assert proj.linear_1.weight.shape == (20, 8) and proj.linear_2.weight.shape == (12, 20)
    x = torch.randn(2, 5, 8)
    expected = proj.linear_2(torch.nn.functional.gelu(proj.linear_1(x)))
    torch.testing.assert_close(proj(x), expected)


def test_pixel_shuffle_order():
    # A 4x4 grid whose feature is (row, col): token (i, j) must hold patches
    # (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1), in that order.
    side, r = 4, 2
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    x = torch.stack([rows, cols], dim=-1).reshape(1, side * side, 2).float()  # (1, 16, 2)
    out = pixel_shuffle(x, r)
    assert out.shape == (1, 4, 8)
    for i in range(2):
        for j in range(2):
            token = out[0, i * 2 + j].view(4, 2).tolist()
            assert token == [[2 * i, 2 * j], [2 * i, 2 * j + 1], [2 * i + 1, 2 * j], [2 * i + 1, 2 * j + 1]]


def test_pixel_shuffle_rejects_bad_grids():
    with pytest.raises(UserError, match="square grid"):
        ProjectorConfig(kind="pixel_shuffle", scale_factor=3).num_tokens(64)
    with pytest.raises(UserError, match="kind"):
        ProjectorConfig(kind="qformer")
    with pytest.raises(AssertionError):
        pixel_shuffle(torch.zeros(1, 12, 4), 2)


@pytest.mark.parametrize("kind", ["linear", "mlp", "pixel_shuffle"])
def test_input_norm_makes_the_projection_blind_to_feature_scale_and_offset(kind):
    """With norm on, features shifted and scaled per patch give the same visual tokens;
    with norm off (the default) they do not, and no norm parameter exists."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8)
    shifted = 30 * x + 5  # a tower whose features are large with a common offset
    normed = build_projector(ProjectorConfig(kind=kind, norm=True), 8, 12)
    torch.testing.assert_close(normed(shifted), normed(x), atol=1e-4, rtol=1e-4)
    plain = build_projector(ProjectorConfig(kind=kind), 8, 12)
    assert not torch.allclose(plain(shifted), plain(x))
    assert not any("pre_norm" in k for k in plain.state_dict())
