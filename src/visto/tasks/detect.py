"""Detection: every object with its box.

The prompt is the synthetic world's structured-description request, because that is where
a model trained on the world learned to list objects with boxes; `parse` reads its JSON
({"objects": [{"shape", "colour", "size", "box"}, ...]}) and also free text that puts a
label before each box ("red circle [12, 40, 200, 230]; blue square <loc_5>...").
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from visto.data.sample import Turn
from visto.data.tokenizer import DEFAULT_LOC_BINS, parse_boxes
from visto.tasks.common import Box, ImageSize, user_turns
from visto.tasks.parsers import parse_json_answer

PROMPT = (
    "List every object with its shape, colour, size and box, the counts per shape and the "
    "text, as JSON."
)
_BOX_SPAN = re.compile(r"(?:<loc_\d+>\s*){4}|\[\s*\d+\s*,\s*\d+\s*,\s*\d+\s*,\s*\d+\s*\]")
_LABEL_EDGES = " \t\n,;:.-*•"


def build_prompt() -> list[Turn]:
    return user_turns(PROMPT)


def object_label(obj: Mapping) -> str | None:
    """The label "large red circle" from an object's size/colour/shape fields, or its "label"."""
    if isinstance(obj.get("label"), str):
        return obj["label"]
    words = [obj.get(k) for k in ("size", "colour", "color", "shape")]
    words = [w for w in words if isinstance(w, str) and w]
    return " ".join(words) or None


def parse(
    answer: str, image_size: ImageSize | None = None, loc_bins: int = DEFAULT_LOC_BINS
) -> list[Box]:
    """The detected objects as labelled boxes (0..999 and, given the size, pixels)."""
    valid, value = parse_json_answer(answer)
    if valid and isinstance(value, Mapping) and isinstance(value.get("objects"), list):
        out = []
        for obj in value["objects"]:
            if isinstance(obj, Mapping):
                boxes = parse_boxes(str(obj.get("box")), loc_bins) if obj.get("box") else []
                if boxes:
                    out.append(Box.from_norm(boxes[0], image_size, object_label(obj)))
        return out
    out, start = [], 0
    for m in _BOX_SPAN.finditer(answer):
        boxes = parse_boxes(m.group(), loc_bins)
        label = answer[start : m.start()].strip(_LABEL_EDGES) or None
        start = m.end()
        if boxes:
            out.append(Box.from_norm(boxes[0], image_size, label))
    return out
