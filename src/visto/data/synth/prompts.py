"""Text prompts for dense experts, and the pixels each one names, from a world record's truth.

A text-prompted segmenter (CLIPSeg) is asked "the red star", "all circles", "all red shapes"
or "the text" and answers with a mask; an open-vocabulary detector (OWL-ViT) is asked a
colour-shape phrase ("red star") and answers with boxes. The world's instance mask holds
i + 1 on object i's visible pixels; texts are not in it, so their glyphs are drawn again from
the truth (font, size, tight box), exactly as the renderer drew them.

    prompts = record_prompts(truth, image_id)   # [Prompt("the red star", "single", (2,)), ...]
    target = prompt_mask(instance_mask, truth, prompts[0])   # (S, S) bool
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from visto.data.synth.vocab import COLOURS, SHAPE_PLURALS, SHAPES, heldout_pairs, load_font

# single: one object named by colour and shape (only where that pair is unique in the image);
# shape: "all <shape>s"; colour: "all <colour> shapes"; text: every rendered word or number;
# absent: a seen pair the image does not hold (its target is empty).
PROMPT_KINDS = ("single", "shape", "colour", "text", "absent")
TEXT_PROMPT = "the text"


@dataclass(frozen=True)
class Prompt:
    text: str
    kind: str  # one of PROMPT_KINDS
    objects: tuple[int, ...]  # indices into truth["objects"] whose pixels it names
    text_mask: bool = False  # it names the rendered texts

    def to_json(self) -> dict:
        return {"text": self.text, "kind": self.kind, "objects": list(self.objects),
                "text_mask": self.text_mask}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> Prompt:
        return cls(d["text"], d["kind"], tuple(d["objects"]), bool(d.get("text_mask", False)))


def pair_phrase(colour: str, shape: str) -> str:
    """The detector's query for a colour-shape pair: "red star"."""
    return f"{colour} {shape}"


def seen_pairs() -> list[tuple[str, str]]:
    """The colour-shape pairs train/val/test images hold (all but the held-out ones)."""
    held = set(heldout_pairs())
    return [(c, s) for s in SHAPES for c in COLOURS if (c, s) not in held]


def record_prompts(truth: dict, image_id: str = "") -> list[Prompt]:
    """Every prompt the image answers, plus one absent seen pair (chosen by `image_id`)."""
    objs = truth["objects"]
    pairs = [(o["colour"], o["shape"]) for o in objs]
    out = []
    for i, pair in enumerate(pairs):
        if pairs.count(pair) == 1:
            out.append(Prompt(f"the {pair_phrase(*pair)}", "single", (i,)))
    for shape in dict.fromkeys(o["shape"] for o in objs):
        which = tuple(i for i, o in enumerate(objs) if o["shape"] == shape)
        out.append(Prompt(f"all {SHAPE_PLURALS[shape]}", "shape", which))
    for colour in dict.fromkeys(o["colour"] for o in objs):
        which = tuple(i for i, o in enumerate(objs) if o["colour"] == colour)
        out.append(Prompt(f"all {colour} shapes", "colour", which))
    if truth.get("texts"):
        out.append(Prompt(TEXT_PROMPT, "text", (), text_mask=True))
    absent = [p for p in seen_pairs() if p not in pairs]
    if absent:
        pair = random.Random(f"visto-prompts/{image_id}").choice(absent)
        out.append(Prompt(f"the {pair_phrase(*pair)}", "absent", ()))
    return out


def text_mask(truth: dict) -> np.ndarray:
    """(H, W) bool: the glyph pixels of every text, drawn as the renderer drew them."""
    canvas = Image.new("L", (truth["width"], truth["height"]), 0)
    draw = ImageDraw.Draw(canvas)
    for t in truth.get("texts", []):
        font = load_font(t["font"], t["px"])
        left, top, _, _ = font.getbbox(t["text"])  # the renderer's offset (scene.sample_scene)
        draw.text((t["box"][0] - left, t["box"][1] - top), t["text"], font=font, fill=255)
    return np.asarray(canvas) > 127


def prompt_mask(instance_mask: np.ndarray, truth: dict, prompt: Prompt) -> np.ndarray:
    """(H, W) bool: the visible pixels `prompt` names."""
    values = np.asarray([i + 1 for i in prompt.objects], dtype=instance_mask.dtype)
    out = np.isin(instance_mask, values) if len(values) else np.zeros(instance_mask.shape, bool)
    if prompt.text_mask:
        out |= text_mask(truth)
    return out


__all__ = ["PROMPT_KINDS", "TEXT_PROMPT", "Prompt", "pair_phrase", "prompt_mask",
           "record_prompts", "seen_pairs", "text_mask"]  # fmt: skip
