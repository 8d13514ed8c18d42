"""Perceiver Resampler: a fixed number of tokens for any number of patches and frames."""

from __future__ import annotations

import pytest
import torch

from visto.connectors.resampler import PerceiverResampler, ResamplerConfig
from visto.errors import UserError


def resampler(**overrides) -> PerceiverResampler:
    torch.manual_seed(0)
    cfg = ResamplerConfig(**{"num_latents": 5, "depth": 2, "heads": 2, "max_frames": 4, **overrides})
    return PerceiverResampler(16, cfg).eval()


@pytest.mark.parametrize("shape", [(3, 1, 4, 16), (3, 1, 49, 16), (3, 4, 9, 16), (3, 2, 1, 16), (3, 7, 16)])
def test_same_number_of_tokens_for_any_patches_and_frames(shape):
    out = resampler()(torch.randn(shape))
    assert out.shape == (3, 5, 16)
    assert torch.isfinite(out).all()


def test_time_embeddings_make_frame_order_matter_and_are_bounded():
    model = resampler()
    with torch.no_grad():
        model.frame_embeddings.normal_()
    frames = torch.randn(2, 3, 4, 16)
    with torch.no_grad():
        a = model(frames)
        b = model(frames.flip(1))  # the same patches, frames in reverse order
    assert not torch.allclose(a, b)
    with pytest.raises(AssertionError, match="frames"):
        model(torch.randn(1, 5, 4, 16))  # max_frames is 4


def test_without_time_embeddings_frame_order_is_irrelevant():
    # Attention over a set: permuting the keys changes nothing (no position on the features).
    model = resampler(max_frames=1)
    assert not hasattr(model, "frame_embeddings")
    frames = torch.randn(2, 1, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(frames), model(frames.flip(2)), rtol=1e-5, atol=1e-5)


def test_each_item_is_resampled_alone():
    model = resampler()
    x = torch.randn(4, 2, 3, 16)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


def test_latents_read_the_features():
    model = resampler()
    x = torch.randn(1, 1, 8, 16)
    y = x.clone()
    y[0, 0, 3] = torch.randn(16)  # (a constant shift would vanish in the LayerNorm)
    with torch.no_grad():
        assert (model(x) - model(y)).abs().max() > 1e-4


def test_hf_key_map_names_every_tensor_but_the_time_embeddings():
    model = resampler()
    keys = set(model.state_dict())
    assert set(model.hf_key_map()) == keys - {"frame_embeddings"}
    assert "blocks.1.0.output_proj.weight" in model.hf_key_map().values()


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError, match="num_latents"):
        ResamplerConfig(num_latents=0)
    with pytest.raises(UserError, match="activation"):
        ResamplerConfig(act="tanh")
