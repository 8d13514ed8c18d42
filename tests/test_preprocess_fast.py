"""The image transform's fast path (issue 19): pixel values bit-equal to the path it replaced
(exif_transpose copy, an unconditional PIL resize, a per-channel lookup table); its
normalisation is the one of `visto.data.images.normalise_pixels` (issue 16), with the numbers
it made before. A downscale by 2x or more runs torch's antialiased bicubic instead of PIL's
(`processor.resized_pixels`): the same pixels as torch's, within a level of PIL's on photos,
and, like PIL's, within rounding of the exact (float64) filter."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from visto.data import processor
from visto.data.images import normalise_pixels
from visto.data.processor import (
    ProcessorConfig,
    image_transform,
    patch_image_transform,
    resized_pixels,
)
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


@pytest.fixture
def pil_always(monkeypatch):
    """PIL's bicubic for every resize, as before the fast downscale."""
    monkeypatch.setattr(processor, "FAST_DOWNSCALE_FROM", math.inf)


@pytest.mark.parametrize("mode", ["resize", "pad"])
@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("stats", [((0.5,) * 3, (0.5,) * 3), (CLIP_MEAN, CLIP_STD)])
def test_pixels_equal_the_previous_path(mode, size, stats, pil_always):
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


# ----------------------------------------------------------------------------- fast downscale


def photo(w: int, h: int, seed: int) -> Image.Image:
    """A gradient with noise and a few blocks, through JPEG (bench/preprocess_speed.py's)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) + rng.normal(0, 30, (h, w, 3))
    for _ in range(6):
        x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
        x[y0 : y0 + 40, x0 : x0 + 60] = rng.integers(0, 256, 3)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def torch_bicubic(image: Image.Image, w: int, h: int, dtype=torch.uint8) -> np.ndarray:
    """(3, h, w): torch's antialiased bicubic of the image's pixels as `dtype`, rounded."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].to(dtype)
    y = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True)[0]
    return y.round().clamp(0, 255).to(torch.uint8).numpy() if dtype != torch.uint8 else y.numpy()


def pil_bicubic(image: Image.Image, w: int, h: int) -> np.ndarray:
    return np.asarray(image.resize((w, h), Image.Resampling.BICUBIC)).transpose(2, 0, 1)


def levels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


@pytest.mark.parametrize("mode", ["resize", "pad", "patch"])
def test_a_downscale_by_two_or_more_takes_the_fast_path(mode):
    """Fails when the fast path is off: the pixels are torch's, and PIL's differ from them."""
    cfg = ProcessorConfig(
        image_size=64, resize_mode=mode, patch_size=8, mean=CLIP_MEAN, std=CLIP_STD
    )
    image = noise_image(256, 192, seed=8)  # 4x: (64, 48) in pad and patch mode
    w, h = (64, 64) if mode == "resize" else (64, 48)
    ours, pil = torch_bicubic(image, w, h), pil_bicubic(image, w, h)
    assert levels(ours, pil).max() > 0  # the two differ on noise, so the test can tell them apart
    if mode == "patch":
        got = patch_image_transform(image, cfg)[0]
        want = normalise_pixels(np.ascontiguousarray(ours), cfg.mean, cfg.std)
    else:
        got = image_transform(image, cfg)
        canvas = np.empty((3, 64, 64), np.uint8)
        canvas[:] = np.array([round(255 * m) for m in cfg.mean], np.uint8)[:, None, None]
        canvas[:, (64 - h) // 2 : (64 - h) // 2 + h] = ours
        want = normalise_pixels(canvas, cfg.mean, cfg.std)
    assert torch.equal(got, want)


def test_below_two_it_is_pils_resize_bit_for_bit():
    image = noise_image(127, 100, seed=9)  # 127 / 64 = 1.98
    assert np.array_equal(resized_pixels(image, 64, 64), pil_bicubic(image, 64, 64))
    assert not np.array_equal(torch_bicubic(image, 64, 64), pil_bicubic(image, 64, 64))
    assert np.array_equal(resized_pixels(image.resize((128, 100)), 64, 64),
                          torch_bicubic(image.resize((128, 100)), 64, 64))  # 2.0: fast  # fmt: skip


@pytest.mark.parametrize(("w", "h"), [(640, 480), (500, 375), (800, 600), (480, 640), (1024, 683)])
@pytest.mark.parametrize("size", [64, 128, 224])
def test_on_photos_the_fast_path_is_within_a_level_of_pil(w, h, size):
    image = photo(w, h, seed=w + h)
    d = levels(resized_pixels(image, size, size), pil_bicubic(image, size, size))
    assert d.max() <= 1 and d.mean() < 0.01, (d.max(), d.mean())


@pytest.mark.parametrize(("src", "dst"), [((296, 620), (134, 268)), ((178, 378), (83, 153)),
                                          ((180, 599), (74, 268)), ((112, 574), (5, 90)),
                                          ((256, 256), (64, 64)), ((900, 300), (100, 100))])  # fmt: skip
@pytest.mark.parametrize("kind", ["noise", "photo"])
def test_both_are_within_rounding_of_the_exact_filter(src, dst, kind):
    """PIL's and the fast path are integer versions of one filter (PIL's bicubic widened by the
    factor; float64 here is the filter itself). On noise, their worst case, both are off it by
    < 0.2 levels on average; the fast path's int16 weights put a rare pixel up to 6 levels off
    (PIL's: 4; the worst of 120 random geometries, probed when this was written)."""
    image = noise_image(*src, seed=src[0]) if kind == "noise" else photo(*src, seed=src[0])
    exact = torch_bicubic(image, *dst, dtype=torch.float64)
    for pixels in (resized_pixels(image, *dst), pil_bicubic(image, *dst)):
        assert levels(pixels, exact).mean() < 0.2 and levels(pixels, exact).max() <= 6
