"""The structured answer a region connector writes from what it detected: the world's JSON.

A JSON answer lists every object with its shape, colour, size and box, the counts per shape
and the text (data.synth.tasks.json_target). Each of those is something the connector already
has: the detector's objects (their attribute probabilities and boxes) and the reader's lines.
So the connector writes the answer itself, in the words and the token order the answer is
trained on, and the pointer head offers it to the decoder token by token (a script:
connectors.pointer). The decoder learns when to copy it, not how to spell each object from
its token (which a decoder trained for minutes did at 0.18 field accuracy, bench/README.md).

The objects are those the detector finds present, each value its most probable one, each box
in the world's ints 0..999; the text is what the reader read, in reading order.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

from visto.connectors.named import KINDS
from visto.data.synth.tasks import json_target
from visto.data.synth.vocab import SHAPES


def detected_json(attributes: Tensor, boxes: Tensor, present: Tensor, lines: list[str]) -> str:
    """One image: attribute probabilities (S, VALUES) in connectors.named's layout, boxes
    (S, 4) in 0..1, which slots are objects (S,), and the lines read -> its JSON answer,
    written as the world writes it (compact separators, objects left to right)."""
    objects = []
    for s, box in zip(present.nonzero().flatten().tolist(), world_boxes(boxes, present), strict=True):
        at, values = 0, {}
        for kind, names in KINDS.items():
            values[kind] = names[int(attributes[s, at : at + len(names)].argmax())]
            at += len(names)
        objects.append({**values, "box": box, "box_norm": box})
    counts = {shape: n for shape in SHAPES if (n := sum(o["shape"] == shape for o in objects))}
    truth = {"objects": objects, "counts": counts, "texts": [{"text": line} for line in lines]}
    return json.dumps(json_target(truth), separators=(",", ":"))


def world_boxes(boxes: Tensor, present: Tensor) -> list[list[int]]:
    """One image's boxes (S, 4) in 0..1 and which slots are objects (S,) -> the present
    objects' boxes as the world writes them in a JSON answer: ints 0..999."""
    return [[min(max(round(float(v) * 999), 0), 999) for v in boxes[s]]
            for s in present.nonzero().flatten().tolist()]  # fmt: skip


def script_ids(tokenizer, answers: list[str], end_id: int) -> Tensor:
    """Answers -> their token ids as the processor encodes an answer, each followed by the end
    token (an answer ends as it was copied), padded with -1: (N, L)."""
    encoded = [[*tokenizer.encode(text), end_id] for text in answers]
    width = max((len(ids) for ids in encoded), default=0)
    out = torch.full((len(encoded), width), -1, dtype=torch.long)
    for n, ids in enumerate(encoded):
        out[n, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


__all__ = ["detected_json", "script_ids", "world_boxes"]
