"""The image transform's fast path (issue 19): pixel values bit-equal to the path it replaced
(exif_transpose copy, an unconditional PIL resize, a per-channel lookup table); its
normalisation is the one of `visto.data.images.normalise_pixels` (issue 16), with the numbers
it made before."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from visto.data.images import normalise_pixels
from visto.data.processor import ProcessorConfig, image_transform, patch_image_transform
from visto.nn.vision import CLIP_MEAN, CLIP_STD


def reference_transform(image: Image.Image, cfg: ProcessorConfig) -> torch.Tensor:
    """The transform as it was before the fast path (processor.py at 9b7f1ec)."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    size = cfg.image_size
    if cfg.resize_mode == "resize":
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    else:
        scale = size / max(image.width, image.height)
        new_w = min(size, max(1, round(image.width * scale)))
        new_h = min(size, max(1, round(image.height * scale)))
        fill = tuple(round(255 * m) for m in cfg.mean)
        canvas = Image.new("RGB", (size, size), fill)
        canvas.paste(image.resize((new_w, new_h), Image.Resampling.BICUBIC),
                     ((size - new_w) // 2, (size - new_h) // 2))  # fmt: skip
        image = canvas
    levels = np.arange(256, dtype=np.float32) / 255.0
    mean, std = np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)
    lut = (levels[None, :] - mean[:, None]) / std[:, None]
    x = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(np.stack([lut[c][x[..., c]] for c in range(3)]))


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def rotated_jpeg(w: int, h: int) -> Image.Image:
    """A JPEG whose EXIF says 'rotate 90 degrees' (orientation 6), opened raw."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    noise_image(w, h, seed=3).save(buffer, "JPEG", exif=exif)
    return Image.open(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize("mode", ["resize", "pad"])
@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("stats", [((0.5,) * 3, (0.5,) * 3), (CLIP_MEAN, CLIP_STD)])
def test_pixels_equal_the_previous_path(mode, size, stats):
    cfg = ProcessorConfig(image_size=size, resize_mode=mode, mean=stats[0], std=stats[1])
    images = [
        noise_image(96, 80),  # downscaled
        noise_image(size, size, seed=1),  # already the model's size: no resize at all
        noise_image(size, size // 2, seed=2),  # pad: the longer side fits, only pasted
        noise_image(20, 20, seed=4),  # upscaled
        rotated_jpeg(70, 50),  # EXIF orientation applied
        noise_image(40, 40, seed=5).convert("RGBA"),
    ]
    for image in images:
        got = image_transform(image, cfg)
        assert got.dtype == torch.float32 and got.shape == (3, size, size)
        assert torch.equal(got, reference_transform(image, cfg))


def test_patch_mode_pixels_unchanged():
    cfg = ProcessorConfig(image_size=48, resize_mode="patch", patch_size=8)
    image = noise_image(70, 30)
    pixels, grid = patch_image_transform(image, cfg)
    # reference: the canvas built by hand, normalised by the lookup table
    ref_cfg = ProcessorConfig(image_size=pixels.shape[2], resize_mode="resize")
    canvas = Image.new("RGB", (pixels.shape[2], pixels.shape[1]), (128, 128, 128))
    canvas.paste(image.resize((48, 21), Image.Resampling.BICUBIC), (0, 0))
    square = Image.new("RGB", (pixels.shape[2],) * 2)
    square.paste(canvas, (0, 0))
    ref = reference_transform(square, ref_cfg)[:, : pixels.shape[1]]
    assert grid == (3, 6) and torch.equal(pixels, ref)


def test_the_tensor_does_not_share_memory_with_the_image():
    cfg = ProcessorConfig(image_size=32, resize_mode="resize")
    image = noise_image(32, 32)
    before = np.asarray(image).copy()
    pixels = image_transform(image, cfg)
    pixels.fill_(0.0)
    assert np.array_equal(np.asarray(image), before)
    assert not torch.equal(image_transform(image, cfg), pixels)


def test_inside_and_outside_inference_mode():
    from visto.data import images

    images._channel_stats.cache_clear()
    cfg = ProcessorConfig(image_size=32, resize_mode="resize", mean=(0.1, 0.2, 0.3))
    image = noise_image(40, 40)
    with torch.inference_mode():  # the engine's prompt_batch may run here first
        inside = image_transform(image, cfg)
    outside = image_transform(image, cfg)
    assert torch.equal(inside, outside) and not outside.is_inference()


# sha256 (first 16 hex digits) of the float32 pixels the transforms made of noise_image(70, 45,
# seed=16) at 48 px before they normalised through normalise_pixels (processor.py at a841339).
BEFORE = {
    ("resize", "half"): "904e4915e58f4536", ("resize", "clip"): "acc9ecd9eb46c53a",
    ("resize", "other"): "5bf3a5c04e319d61", ("pad", "half"): "d5ab41399a40375a",
    ("pad", "clip"): "0c03425d5fe2d40a", ("pad", "other"): "9e6679954f38de69",
    ("patch", "half"): "38f53b76a971add4", ("patch", "clip"): "32dac53309d81c90",
    ("patch", "other"): "5797c9428bce1eff",
}  # fmt: skip
STATS = {"half": ((0.5,) * 3, (0.5,) * 3), "clip": (CLIP_MEAN, CLIP_STD),
         "other": ((0.1, 0.2, 0.3), (0.9, 0.8, 0.7))}  # fmt: skip


@pytest.mark.parametrize(("mode", "stats"), sorted(BEFORE))
def test_the_one_normalisation_makes_the_numbers_it_made_before(mode, stats):
    import hashlib

    mean, std = STATS[stats]
    cfg = ProcessorConfig(image_size=48, resize_mode=mode, mean=mean, std=std)
    image = noise_image(70, 45, seed=16)
    if mode == "patch":
        pixels = patch_image_transform(image, cfg)[0]
    else:
        pixels = image_transform(image, cfg)
    assert pixels.dtype == torch.float32 and pixels.is_contiguous()
    assert hashlib.sha256(pixels.numpy().tobytes()).hexdigest()[:16] == BEFORE[(mode, stats)]


def test_the_processor_and_the_trainers_normalise_alike():
    """An image already the model's size: the processor's pixels are normalise_pixels' of its
    bytes, handed over as a tensor (dense pretraining, the OCR reader) or an array."""
    mean, std = STATS["other"]
    image = noise_image(32, 32, seed=7)
    got = image_transform(image, ProcessorConfig(image_size=32, resize_mode="resize", mean=mean, std=std))
    chw = np.asarray(image).transpose(2, 0, 1)
    as_tensor = normalise_pixels(torch.from_numpy(chw.copy()), mean, std)
    batch = normalise_pixels(torch.from_numpy(np.stack([chw, chw])), list(mean), list(std))
    assert torch.equal(got, normalise_pixels(chw, mean, std)) and torch.equal(got, as_tensor)
    assert torch.equal(batch, torch.stack([got, got])) and batch.is_contiguous()
