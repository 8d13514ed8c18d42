"""A contact sheet of a world: images with masks, boxes, texts and one question each.

Looking at the data before training on it catches more bugs than any metric: a box off by
one object, a mask that leaks, a question whose answer is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from visto.data.contact_sheet import grid, wrap
from visto.data.images import open_image
from visto.data.sample import image_to_png_bytes
from visto.data.synth.generate import VQA_TYPES
from visto.data.synth.reader import iter_records
from visto.data.synth.vocab import load_font
from visto.errors import UserError
from visto.utils.io import atomic_write_bytes

# Vivid, mutually distinct hues for instances 1, 2, ... on the mask panel.
INSTANCE_TINTS = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (128, 128, 0),
    (0, 0, 128),
]
PANEL = 224  # pixels per panel: the image as rendered (with boxes), then its mask
CAPTION_LINES = 4


def _mask_panel(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The image washed out to grey, each instance's visible pixels tinted in its own hue."""
    grey = np.asarray(image.convert("L")).astype(np.float32)[..., None] * 0.35 + 160  # (H, W, 1)
    pixels = np.repeat(grey, 3, axis=2)  # (H, W, 3)
    for i in range(1, int(mask.max()) + 1):
        where = mask == i
        pixels[where] = 0.25 * pixels[where] + 0.75 * np.array(
            INSTANCE_TINTS[(i - 1) % len(INSTANCE_TINTS)]
        )
    return Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))


def _draw_boxes(image: Image.Image, truth: dict) -> None:
    draw = ImageDraw.Draw(image)
    scale = PANEL / truth["width"]
    small = load_font("sans-bold", 12)
    for i, obj in enumerate(truth["objects"]):
        x1, y1, x2, y2 = (v * scale for v in obj["box"])
        tint = INSTANCE_TINTS[i % len(INSTANCE_TINTS)]
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=(0, 0, 0), width=1)
        draw.rectangle((x1, y1, x1 + 13, y1 + 14), fill=tint)
        draw.text((x1 + 3, y1 + 1), str(i + 1), font=small, fill=(0, 0, 0))
    for t in truth["texts"]:
        x1, y1, x2, y2 = (v * scale for v in t["box"])
        draw.rectangle((x1 - 2, y1 - 2, x2 + 1, y2 + 1), outline=(0, 120, 255), width=1)


def _annotated(record: dict, root: Path, qa: dict | None) -> Image.Image:
    truth = record["truth"]
    image = open_image(root / record["image"]).resize((PANEL, PANEL), Image.NEAREST)
    mask = np.asarray(Image.open(root / record["mask"]).resize((PANEL, PANEL), Image.NEAREST))
    masked = _mask_panel(image, mask)
    _draw_boxes(masked, truth)
    _draw_boxes(image, truth)

    sheet = Image.new("RGB", (2 * PANEL + 4, PANEL + 15 * CAPTION_LINES + 8), (255, 255, 255))
    sheet.paste(image, (0, 0))
    sheet.paste(masked, (PANEL + 4, 0))
    draw = ImageDraw.Draw(sheet)
    font = load_font("sans", 12)
    held = [truth["objects"][i] for i in truth["heldout_objects"]]
    held_note = (
        f"  held-out: {', '.join(o['colour'] + ' ' + o['shape'] for o in held)}" if held else ""
    )
    width = sheet.width - 8
    lines = wrap(
        f"{record['id']} ({record['split']})  label: {truth['label']['class']}{held_note}",
        font,
        width,
    )
    if qa is not None:
        lines += wrap(f"[{qa['type']}] Q: {qa['q']}  A: {qa['a']}", font, width)
    for k, line in enumerate(lines[:CAPTION_LINES]):
        draw.text((4, PANEL + 4 + 15 * k), line, font=font, fill=(0, 0, 0))
    return sheet


def show_world(
    data_dir: str | os.PathLike, out: str | os.PathLike, split: str = "train", n: int = 16
) -> Path:
    """Write a grid of the first `n` images of `split`; each cell shows a different VQA type."""
    root = Path(data_dir)
    cells = []
    for k, record in enumerate(iter_records(root, split)):
        if k >= n:
            break
        wanted = VQA_TYPES[k % len(VQA_TYPES)]
        vqa = record["tasks"]["vqa"]
        qa = next((q for q in vqa if q["type"] == wanted), vqa[0] if vqa else None)
        cells.append(_annotated(record, root, qa))
    if not cells:
        raise UserError(f"split {split!r} of {root} has no images; pick another with --split")
    return atomic_write_bytes(out, image_to_png_bytes(grid(cells)))
