"""Rendering: a scene dict to an RGB image, an instance mask, and pixel-exact ground truth.

Objects are filled polygons without anti-aliasing, so every object pixel has exactly its
vocabulary colour and the mask is exact. Boxes are measured on the rendered pixels (the
object's full, un-occluded extent), not on the geometry, so they are tight by construction.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from visto.data.synth.vocab import COLOURS, load_font


def render_background(bg: dict, size: int) -> Image.Image:
    style = bg["style"]
    if style == "plain":
        return Image.new("RGB", (size, size), tuple(bg["colour"]))
    base = np.array(bg["colour"], dtype=np.int16)
    if style == "gradient":
        ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
        angle = bg["angle"]
        if angle == 0:
            t = np.broadcast_to(ramp[None, :], (size, size))
        elif angle == 90:
            t = np.broadcast_to(ramp[:, None], (size, size))
        else:
            t = (ramp[None, :] + (ramp[:, None] if angle == 45 else ramp[::-1, None])) / 2
        step = np.array(bg["colour2"], dtype=np.float32) - base
        pixels = base + (t[..., None] * step).astype(np.int16)  # (H, W, 3)
    elif style == "mottled":
        grid = Image.fromarray(np.array(bg["grid"], dtype=np.float32), mode="F")
        offset = np.asarray(grid.resize((size, size), Image.BILINEAR)).astype(np.int16)  # (H, W)
        pixels = base + offset[..., None]
    else:  # stripes or checker: two tones alternating every `period` pixels
        idx = np.arange(size) // bg["period"]
        if style == "stripes":
            stripe = (idx % 2).astype(np.int16)
            on = np.broadcast_to(
                stripe[None, :] if bg["vertical"] else stripe[:, None], (size, size)
            )
        else:
            on = ((idx[:, None] + idx[None, :]) % 2).astype(np.int16)
        pixels = base - bg["delta"] * on[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def render_scene(scene: dict, size: int) -> tuple[Image.Image, Image.Image, list[dict], list[dict]]:
    """(image RGB, mask L with value i+1 on object i's visible pixels, objects, texts)."""
    image = render_background(scene["background"], size)
    mask = Image.new("L", (size, size), 0)
    draw, mask_draw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    scratch = Image.new("L", (size, size), 0)
    scratch_draw = ImageDraw.Draw(scratch)

    objects = []
    for i, obj in enumerate(scene["objects"]):
        points = obj["points"]
        draw.polygon(points, fill=COLOURS[obj["colour"]])
        mask_draw.polygon(points, fill=i + 1)
        scratch.paste(0, (0, 0, size, size))
        scratch_draw.polygon(points, fill=255)
        box = scratch.getbbox()  # (x1, y1, x2, y2), x2/y2 exclusive: tight on the pixels
        assert box is not None, "an object was placed outside the image"
        area = scratch.histogram()[255]
        objects.append(
            {
                "shape": obj["shape"],
                "colour": obj["colour"],
                "size": obj["size"],
                "box": list(box),
                "area": area,
            }
        )

    for t in scene["texts"]:
        font = load_font(t["font"], t["px"])
        x, y = t["box"][0] - t["offset"][0], t["box"][1] - t["offset"][1]
        draw.text((x, y), t["text"], font=font, fill=tuple(t["colour"]))

    visible = np.bincount(np.asarray(mask).ravel(), minlength=len(objects) + 1)
    for i, obj in enumerate(objects):
        obj["visible"] = round(float(visible[i + 1]) / max(1, obj["area"]), 3)
    texts = [{k: t[k] for k in ("text", "kind", "font", "px", "box")} for t in scene["texts"]]
    return image, mask, objects, texts
