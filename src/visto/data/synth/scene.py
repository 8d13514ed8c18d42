"""Scene sampling: which objects and texts go where. Pure data, no pixels.

A scene is a plain dict: {"background": {...}, "objects": [...], "texts": [...]}. Objects
carry their geometry (centre, radius, polygon) so the renderer only draws; texts carry the
font and the top-left corner of their tight box. Every random choice comes from one
`random.Random` seeded by (world seed, image index), so an image never depends on which
worker drew it or in what order.
"""

from __future__ import annotations

import math
import random

from visto.data.synth.config import WorldConfig
from visto.data.synth.vocab import (
    COLOURS,
    FONTS,
    SHAPES,
    SIZE_JITTER,
    SIZES,
    WORDS,
    heldout_pairs,
    load_font,
)

Box = tuple[float, float, float, float]


def image_rng(seed: int, index: int, stream: str) -> random.Random:
    # A str seed is hashed with SHA-512 by `random`, stable across processes and runs
    # (unlike hash(), which is salted per process).
    return random.Random(f"visto-synth/{stream}/{seed}/{index}")


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of `shape` centred at (cx, cy) filling a circle of radius r (circle: a 48-gon)."""
    if shape == "circle":
        n = 48
        return [
            (cx + r * math.cos(2 * math.pi * k / n), cy + r * math.sin(2 * math.pi * k / n))
            for k in range(n)
        ]
    if shape == "square":
        h = r * 0.82  # same visual weight as the circle, not inscribed in it
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.97, cy + r * 0.78), (cx - r * 0.97, cy + r * 0.78)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "hexagon":
        return [
            (cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3))
            for k in range(6)
        ]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.72, cy), (cx, cy + r), (cx - r * 0.72, cy)]
    if shape == "cross":
        a, t = r * 0.9, r * 0.32  # arm length and half thickness of a plus sign
        return [
            (cx - t, cy - a), (cx + t, cy - a), (cx + t, cy - t), (cx + a, cy - t),
            (cx + a, cy + t), (cx + t, cy + t), (cx + t, cy + a), (cx - t, cy + a),
            (cx - t, cy + t), (cx - a, cy + t), (cx - a, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def polygon_box(points: list[tuple[float, float]]) -> Box:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return (min(xs), min(ys), max(xs), max(ys))


def box_area(b: Box) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def box_intersection(a: Box, b: Box) -> float:
    return box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def box_iou(a: Box, b: Box) -> float:
    inter = box_intersection(a, b)
    return inter / (box_area(a) + box_area(b) - inter + 1e-9)


def _fits(
    box: Box,
    colour: str,
    placed: list[Box],
    colours: list[str],
    covered: list[float],
    cfg: WorldConfig,
) -> bool:
    """New box overlaps the placed ones within the IoU and occlusion bounds."""
    for i, other in enumerate(placed):
        if box_iou(box, other) > cfg.max_iou:
            return False
        # Two touching objects of one colour would read as one blob: keep them apart.
        if colours[i] == colour and box_intersection(box, other) > 0:
            return False
        # The new object is drawn on top: it must not hide too much of an earlier one.
        if (covered[i] + box_intersection(box, other)) / box_area(other) > cfg.max_occlusion:
            return False
    return True


def sample_background(rng: random.Random, kind: str) -> dict:
    base = rng.randint(222, 248)
    tint = [max(200, min(255, base + rng.randint(-10, 10))) for _ in range(3)]
    if kind == "plain":
        style = "plain"
    else:
        style = rng.choices(
            ["plain", "gradient", "mottled", "stripes", "checker"], weights=[4, 1.5, 1.5, 1.5, 1.5]
        )[0]
    bg = {"style": style, "colour": tint}
    if style == "gradient":
        bg["colour2"] = [max(190, c - rng.randint(15, 35)) for c in tint]
        bg["angle"] = rng.choice([0, 45, 90, 135])
    elif style == "mottled":
        # A coarse grid of random offsets, upsampled smoothly: low-frequency noise that
        # looks like paper or cloth and still compresses well as PNG.
        bg["grid"] = [[rng.randint(-14, 14) for _ in range(5)] for _ in range(5)]
    elif style in ("stripes", "checker"):
        bg["period"] = rng.choice([8, 12, 16])
        bg["delta"] = rng.randint(8, 16)
        bg["vertical"] = rng.random() < 0.5
    return bg


def _random_word(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.6:
        return rng.choice(WORDS), "word"
    digits = rng.randint(2, 4)
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1)), "number"


def sample_scene(cfg: WorldConfig, index: int, split: str) -> dict:
    """The objects and texts of image `index` in `split` (heldout: first object is a held-out pair)."""
    rng = image_rng(cfg.seed, index, "scene")
    s = cfg.size
    held = heldout_pairs()
    allowed = [(c, sh) for sh in SHAPES for c in COLOURS if (c, sh) not in held]
    single = rng.random() < cfg.single_object_fraction or cfg.max_objects == 1
    n_objects = 1 if single else rng.randint(2, cfg.max_objects)

    objects: list[dict] = []
    boxes: list[Box] = []
    covered: list[float] = []
    for k in range(n_objects):
        pool = (
            held
            if (split == "heldout" and k == 0)
            else (held + allowed if split == "heldout" else allowed)
        )
        colour, shape = rng.choice(pool)
        size = rng.choice(list(SIZES))
        r = s * SIZES[size] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)) / 2
        for _ in range(40):
            cx = rng.uniform(r + 1, s - r - 1)
            cy = rng.uniform(r + 1, s - r - 1)
            points = shape_polygon(shape, cx, cy, r)
            box = polygon_box(points)
            if _fits(box, colour, boxes, [o["colour"] for o in objects], covered, cfg):
                for i, other in enumerate(boxes):
                    covered[i] += box_intersection(box, other)
                boxes.append(box)
                covered.append(0.0)
                objects.append({"shape": shape, "colour": colour, "size": size, "points": points})
                break
        # An object that finds no room is dropped: fewer objects beats broken bounds.

    texts: list[dict] = []
    if not single and cfg.max_texts > 0 and rng.random() < cfg.text_probability:
        taken = [(b[0] - 2, b[1] - 2, b[2] + 2, b[3] + 2) for b in boxes]
        for _ in range(rng.randint(1, cfg.max_texts)):
            text, kind = _random_word(rng)
            font = rng.choice(list(FONTS))
            px = max(10, round(s * rng.choice([0.12, 0.14, 0.16])))
            left, top, right, bottom = load_font(font, px).getbbox(text)
            w, h = right - left, bottom - top
            if w >= s - 4:
                continue
            for _ in range(40):
                x = rng.randint(2, s - w - 2)
                y = rng.randint(2, s - h - 2)
                box = (x, y, x + w, y + h)
                # Text never touches an object or another text, so it is always legible.
                if all(box_intersection(box, t) == 0 for t in taken):
                    taken.append((x - 2, y - 2, x + w + 2, y + h + 2))
                    texts.append(
                        {"text": text, "kind": kind, "font": font, "px": px, "box": [x, y, x + w, y + h],
                         "offset": [left, top], "colour": rng.choice([[20, 20, 20], [30, 30, 80], [80, 20, 20]])}
                    )  # fmt: skip
                    break
    return {
        "background": sample_background(rng, cfg.background),
        "objects": objects,
        "texts": texts,
    }
