"""The processor's normalisation of a decoded image (issue 19, time to first token): a numpy
image is normalised in numpy, with the bits torch's in-place ops give (every byte value of
every channel, several mean/std settings), and runs no torch op."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from visto.data.images import normalise_pixels
from visto.nn.vision import CLIP_MEAN, CLIP_STD

rng = np.random.default_rng(19)
STATS = [((0.5,) * 3, (0.5,) * 3), (CLIP_MEAN, CLIP_STD), ((0.1, 0.2, 0.3), (0.9, 0.8, 0.7)),
         ((0.0,) * 3, (1.0,) * 3)] + [
    (tuple(rng.uniform(0, 1, 3)), tuple(rng.uniform(0.05, 2, 3))) for _ in range(6)]  # fmt: skip


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("mean", "std"), STATS)
def test_every_byte_value_gives_torchs_bits(mean, std):
    values = np.arange(256, dtype=np.uint8)
    image = np.stack([np.roll(values, 85 * c) for c in range(3)]).reshape(3, 16, 16)
    from_numpy = normalise_pixels(image, mean, std)
    from_torch = normalise_pixels(torch.from_numpy(image.copy()), mean, std)  # torch's ops
    assert from_numpy.dtype == torch.float32 and from_numpy.is_contiguous()
    assert torch.equal(from_numpy, from_torch)


def test_a_channels_first_view_and_a_batch():
    hwc = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    view = hwc.transpose(2, 0, 1)  # what the processor hands over
    out = normalise_pixels(view, CLIP_MEAN, CLIP_STD)
    assert out.shape == (3, 20, 24) and out.is_contiguous()
    assert torch.equal(out, normalise_pixels(torch.from_numpy(view.copy()), CLIP_MEAN, CLIP_STD))
    batch = np.stack([view, view[:, ::-1]])
    assert torch.equal(normalise_pixels(batch, CLIP_MEAN, CLIP_STD),
                       normalise_pixels(torch.from_numpy(batch.copy()), CLIP_MEAN, CLIP_STD))  # fmt: skip
    assert np.array_equal(view, hwc.transpose(2, 0, 1))  # the input is not written


def test_a_numpy_image_runs_no_torch_op():
    image = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
    with _CountOps() as count:
        normalise_pixels(image, CLIP_MEAN, CLIP_STD)
    arithmetic = [op for op in count.ops if "lift_fresh" not in op]  # from_numpy's own
    assert arithmetic == []  # it ran div_, sub_ and div_ on a torch tensor


def test_the_statistics_cannot_be_written():
    image = rng.integers(0, 256, (3, 4, 4), dtype=np.uint8)
    before = normalise_pixels(image, (0.3, 0.4, 0.5), (0.2, 0.2, 0.2))
    from visto.data.images import _channel_stats_numpy

    m, _ = _channel_stats_numpy((0.3, 0.4, 0.5), (0.2, 0.2, 0.2))
    with pytest.raises(ValueError):
        m += 1.0
    assert torch.equal(normalise_pixels(image, (0.3, 0.4, 0.5), (0.2, 0.2, 0.2)), before)
