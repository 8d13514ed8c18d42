"""Bounded, safe decoding of untrusted image files: one function every reader uses; and the
normalisation of decoded pixels that trainers reading whole image arrays share.

Limits are checked before pixels are decoded (Pillow reads the header first), so a
decompression bomb costs a header read, not gigabytes of memory.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from visto.errors import UserError

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # 20 MiB of encoded bytes
MAX_IMAGE_PIXELS = 40_000_000  # 40 Mpx, e.g. 8000 x 5000
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class BadImage(UserError):
    """An image that is corrupt, unsupported, or over the limits."""


def open_image(
    source: bytes | str | os.PathLike,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Decode `source` (bytes or a path) to an RGB image with EXIF orientation applied."""
    name = "image bytes"
    if not isinstance(source, (bytes, bytearray)):
        path = Path(source)
        name = str(path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise BadImage(f"image file not found: {path}") from None
        if size > max_bytes:
            raise BadImage(f"{name} is {size:,} bytes; the limit is {max_bytes:,}")
        source = path.read_bytes()
    if len(source) > max_bytes:
        raise BadImage(f"{name} is {len(source):,} bytes; the limit is {max_bytes:,}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source))
            if image.format not in ALLOWED_FORMATS:
                raise BadImage(
                    f"{name}: format {image.format} is not supported; use one of {ALLOWED_FORMATS}"
                )
            w, h = image.size
            if w * h > max_pixels:
                raise BadImage(
                    f"{name} is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,}"
                )
            image.load()
            image = ImageOps.exif_transpose(image)
    except BadImage:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"{name} is not a readable image (corrupt, or not an image format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"{name} could not be decoded: {e}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as RGB; transparent areas are composited onto white so they do not turn black."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def normalise_pixels(
    pixels: torch.Tensor | np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 (x / 255 - mean) / std per channel, contiguous: the one
    image normalisation. The processor's transform (`visto.data.processor`, its
    `ProcessorConfig.mean/std`) and the trainers that read whole arrays of decoded images (dense
    pretraining, the OCR reader) share it, so a tower sees the same numbers either way.

    `pixels`: a tensor, or a numpy array (the processor's decoded image, channels first as a
    view), which numpy converts to float32 in one pass into a new buffer: handed to torch
    first, the processor's transform took 1.2-1.6x as long on 64-384 px images. The float32
    ops then run in place, in the order of the lookup table they replaced: the same numbers.
    A numpy array's stay in numpy (three small torch ops cost more than the arithmetic on a
    model-sized image); float32 division and subtraction are IEEE's in both, so the bits are
    the same (tested on every byte value)."""
    if isinstance(pixels, np.ndarray):
        assert pixels.dtype == np.uint8 and pixels.shape[-3] == 3, (pixels.dtype, pixels.shape)
        out = pixels.astype(np.float32, order="C")
        m, s = _channel_stats_numpy(tuple(mean), tuple(std))
        out /= np.float32(255.0)
        out -= m
        out /= s
        return torch.from_numpy(out)
    assert pixels.dtype == torch.uint8 and pixels.shape[-3] == 3, (pixels.dtype, pixels.shape)
    out = pixels.to(torch.float32, memory_format=torch.contiguous_format)
    m, s = _channel_stats(tuple(mean), tuple(std))
    return out.div_(255.0).sub_(m).div_(s)


@functools.lru_cache(maxsize=16)
def _channel_stats(
    mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 1, 1) float32 mean and std, made once per setting."""
    assert len(mean) == 3 and len(std) == 3, (mean, std)
    with torch.inference_mode(False):  # plain tensors, usable inside and outside that mode
        return (torch.tensor(mean, dtype=torch.float32).view(3, 1, 1),
                torch.tensor(std, dtype=torch.float32).view(3, 1, 1))  # fmt: skip


@functools.lru_cache(maxsize=16)
def _channel_stats_numpy(
    mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """`_channel_stats` as read-only numpy arrays."""
    m, s = (t.numpy().copy() for t in _channel_stats(mean, std))
    m.flags.writeable = s.flags.writeable = False
    return m, s
