"""Bounded, safe decoding of untrusted image files: one function every reader uses; and the
normalisation of decoded pixels that trainers reading whole image arrays share.

Limits are checked before pixels are decoded (Pillow reads the header first), so a
decompression bomb costs a header read, not gigabytes of memory.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

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


def normalise_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 (x / 255 - mean) / std per channel: the pixel values the
    processor makes (`visto.data.processor`, its `ProcessorConfig.mean/std`), in the same
    float32 operations in the same order, so a tower trained on arrays of decoded images (dense
    pretraining, the OCR reader) sees the numbers it will get through the processor."""
    assert pixels.dtype == torch.uint8 and pixels.shape[-3] == 3, (pixels.dtype, pixels.shape)
    assert len(mean) == 3 and len(std) == 3, (mean, std)
    m = torch.tensor(tuple(mean), dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(tuple(std), dtype=torch.float32).view(3, 1, 1)
    return pixels.float().div_(255.0).sub_(m).div_(s)
