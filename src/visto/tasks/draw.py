"""Boxes drawn on an image, for `visto chat` and reports."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

from visto.tasks.common import ImageSize, norm_to_pixels

# Distinct, readable on light and dark backgrounds (Tableau 10).
PALETTE = ("#4E79A7", "#F28E2B", "#E15759", "#76B7B2", "#59A14F", "#EDC948", "#B07AA1",
           "#FF9DA7", "#9C755F", "#BAB0AC")  # fmt: skip


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str | None] | None = None,
    normalized: bool = False,
    width: int | None = None,
) -> Image.Image:
    """A copy of `image` (RGB) with each box outlined and its label above it.

    Boxes are pixels (x1, y1, x2, y2), or 0..999 ints with `normalized=True`.
    """
    assert labels is None or len(labels) == len(boxes), "one label per box"
    out = image.convert("RGB")  # always a copy, even for an RGB input
    if out is image:
        out = image.copy()
    draw = ImageDraw.Draw(out)
    size: ImageSize = out.size
    line = width or max(1, round(min(size) / 150))
    for k, box in enumerate(boxes):
        px = norm_to_pixels(box, size) if normalized else [round(v) for v in box]
        x1, y1, x2, y2 = px
        colour = PALETTE[k % len(PALETTE)]
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=line)
        label = labels[k] if labels is not None else None
        if label:
            left, top, right, bottom = draw.textbbox((0, 0), label)
            ty = y1 - (bottom - top) - 4 if y1 - (bottom - top) - 4 >= 0 else y1 + line
            draw.rectangle([x1, ty, x1 + right - left + 4, ty + bottom - top + 4], fill=colour)
            draw.text((x1 + 2 - left, ty + 2 - top), label, fill="white")
    return out
