"""A page of example predictions: test images with the question, the model's answer, the
reference, and predicted vs true boxes in two colours (`visto eval` links it in report.md).

    render_examples(predictions, "runs/world", "runs/eval/examples.png", n=12)

`predictions` are the records of `visto.eval.generative.evaluate_generative_world` (one per
question: id, task, qtype, question, references, prediction, score, split), or of a dataset's
evaluation (`visto.eval.dataset`) with its images passed in as `images`. Examples are
picked round-robin over tasks, box tasks first, alternating the seen and held-out splits,
so one page shows every kind of question; within a task the pick is seeded.
"""

from __future__ import annotations

import json
import math
import os
import random
import textwrap
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from visto.data.tokenizer import parse_boxes
from visto.eval.generative import answer_boxes
from visto.tasks import detect
from visto.tasks.common import norm_to_pixels
from visto.utils.io import save_figure

TASK_ORDER = ("ground", "boxes", "json", "refdesc", "vqa", "ocr", "count", "classify", "caption",
              "longform")  # fmt: skip
# What a record's score is, per task (visto.eval.generative.score_items).
SCORE_NAMES = {"ground": "IoU", "boxes": "F1", "ocr": "CER", "json": "field acc",
               "caption": "CIDEr-D", "longform": "CIDEr-D"}  # fmt: skip
# Tasks whose score is a graded figure, not pass/fail: no tick or cross.
GRADED_TASKS = ("ocr", "json", "caption", "longform", "boxes")
TRUE_COLOUR = "#111111"  # reference boxes: solid black
PRED_COLOUR = "#E41A1C"  # predicted boxes: dashed red with a white halo


def pick_examples(
    predictions: Sequence[Mapping[str, Any]], n: int = 12, seed: int = 0
) -> list[Mapping[str, Any]]:
    """Up to `n` records, round-robin over tasks (TASK_ORDER first) and splits, each from an
    image not shown yet where the bucket has one (a page of different scenes)."""
    buckets: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for record in predictions:
        buckets[(str(record.get("task")), str(record.get("split", "")))].append(record)
    rng = random.Random(seed)
    for key in sorted(buckets):
        rng.shuffle(buckets[key])
    tasks = [t for t in TASK_ORDER if any(k[0] == t for k in buckets)]
    tasks += sorted({k[0] for k in buckets} - set(tasks))
    splits = sorted({k[1] for k in buckets}, key=lambda s: (s == "heldout", s))
    picked: list[Mapping[str, Any]] = []
    shown: set[tuple[str, str]] = set()

    def take(bucket: list[Mapping[str, Any]]) -> Mapping[str, Any]:
        fresh = [i for i, r in enumerate(bucket) if (r.get("split"), image_id_of(r)) not in shown]
        record = bucket.pop(fresh[0] if fresh else 0)
        shown.add((record.get("split"), image_id_of(record)))
        return record

    round_ = 0
    while len(picked) < n and any(buckets.values()):
        for task in tasks:
            # Alternate the split each round, falling back to whichever still has records.
            order = splits[round_ % len(splits) :] + splits[: round_ % len(splits)]
            for split in order:
                if buckets.get((task, split)):
                    picked.append(take(buckets[(task, split)]))
                    break
            if len(picked) == n:
                break
        round_ += 1
    return picked


def example_boxes(record: Mapping[str, Any]) -> tuple[list[list[int]], list[list[int]]]:
    """(true boxes, predicted boxes) of one record, 0..999 (empty for tasks without boxes)."""
    task, prediction = record.get("task"), str(record.get("prediction", ""))
    references = record.get("references") or [""]
    if task == "ground":
        return answer_boxes(references[0])[:1], answer_boxes(prediction)[:1]
    if task == "boxes":
        return answer_boxes(references[0]), answer_boxes(prediction)
    if task == "refdesc":  # the box is in the question: the object the model must name
        return parse_boxes(str(record.get("question", "")))[:1], []
    if task == "json":
        try:
            objects = json.loads(references[0]).get("objects", [])
        except (json.JSONDecodeError, AttributeError):
            objects = []
        true = [o["box"] for o in objects if isinstance(o, Mapping) and len(o.get("box", [])) == 4]
        return true, [b.norm for b in detect.parse(prediction)]
    return [], []


def image_id_of(record: Mapping[str, Any]) -> str:
    """The world record id from a sample id "<image id>-<task>-<k>"."""
    return str(record["id"]).rsplit("-", 2)[0]


def find_images(
    data_dir: str | os.PathLike, wanted: Mapping[str, set[str]]
) -> dict[tuple[str, str], Path]:
    """(split, image id) -> image path, for the wanted ids of each split."""
    from visto.data.synth import iter_records

    found: dict[tuple[str, str], Path] = {}
    for split, ids in wanted.items():
        left = set(ids)
        for record in iter_records(data_dir, split):
            if record["id"] in left:
                found[(split, record["id"])] = Path(data_dir) / record["image"]
                left.discard(record["id"])
                if not left:
                    break
    return found


def _short(text: str, width: int, lines: int) -> str:
    text = " ".join(str(text).split()) or "(empty)"
    wrapped = textwrap.wrap(text, width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1].rstrip() + "…"
    return "\n".join(wrapped)


def _verdict(task: str, score: Any) -> str:
    """ " ✓"/" ✗" where the score is pass/fail (accuracy; IoU >= 0.5 for grounding)."""
    if not isinstance(score, (int, float)) or math.isnan(score) or task in GRADED_TASKS:
        return ""
    return " ✓" if score >= (0.5 if task == "ground" else 1.0) else " ✗"


def _caption(record: Mapping[str, Any]) -> str:
    question = str(record.get("question", "")).replace("<image>", "").strip()
    references = record.get("references") or [""]
    score = record.get("score")
    task = str(record.get("task"))
    score_text = (
        "–" if score is None or (isinstance(score, float) and math.isnan(score)) else f"{score:.2f}"
    )
    lines = [
        "Q: " + _short(question, 40, 2).replace("\n", "\n    "),
        "pred: " + _short(record.get("prediction", ""), 38, 2).replace("\n", "\n      "),
        "ref: " + _short(references[0], 38, 2).replace("\n", "\n     "),
        f"{SCORE_NAMES.get(task, 'acc')}: {score_text}{_verdict(task, score)}",
    ]
    return "\n".join(lines)


def render_examples(
    predictions: Sequence[Mapping[str, Any]],
    data_dir: str | os.PathLike,
    path: str | os.PathLike,
    n: int = 12,
    seed: int = 0,
    columns: int = 4,
    images: Mapping[tuple[str, str], Any] | None = None,
) -> Path | None:
    """Write a PNG grid of `n` examples; None (and nothing written) when there are none.
    `images` ((split, image id) -> PIL image) stands in for `data_dir`'s world files."""

    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.patheffects as pe
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    from visto.data.images import open_image

    examples = pick_examples(predictions, n, seed)
    if not examples:
        return None
    if images is None:
        wanted: dict[str, set[str]] = defaultdict(set)
        for record in examples:
            wanted[str(record.get("split", "test"))].add(image_id_of(record))
        images = find_images(data_dir, wanted)

    columns = min(columns, len(examples))
    rows = math.ceil(len(examples) / columns)
    # Each example is an image axes with a text axes under it, so long answers never run
    # into the next row.
    fig = plt.figure(figsize=(3.3 * columns, 4.6 * rows))
    top = 1 - 0.65 / (4.6 * rows)  # room for the legend above the first row's titles
    grid = fig.add_gridspec(2 * rows, columns, height_ratios=[3.1, 1.2] * rows, hspace=0.12,
                            wspace=0.08, left=0.01, right=0.99, bottom=0.0, top=top)  # fmt: skip
    halo = [pe.Stroke(linewidth=3.6, foreground="white"), pe.Normal()]
    for k, record in enumerate(examples):
        row, col = divmod(k, columns)
        ax = fig.add_subplot(grid[2 * row, col])
        text_ax = fig.add_subplot(grid[2 * row + 1, col])
        text_ax.axis("off")
        split = str(record.get("split", "test"))
        image_or_path = images.get((split, image_id_of(record)))
        qtype = f" / {record['qtype']}" if record.get("qtype") else ""
        ax.set_title(f"{record.get('task')}{qtype} · {split}", fontsize=10, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
        if image_or_path is None:
            ax.text(0.5, 0.5, "image not found", ha="center", va="center", transform=ax.transAxes)
        else:
            image = image_or_path
            if isinstance(image_or_path, (str, os.PathLike)):
                image = open_image(image_or_path)
            w, h = image.size
            ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest")
            true, pred = example_boxes(record)
            for boxes, colour, style in ((true, TRUE_COLOUR, "-"), (pred, PRED_COLOUR, "--")):
                for box in boxes:
                    x1, y1, x2, y2 = norm_to_pixels(box, (w, h))
                    rect = Rectangle((x1, y1), max(x2 - x1, 0.5), max(y2 - y1, 0.5), fill=False,
                                     edgecolor=colour, linewidth=2, linestyle=style)  # fmt: skip
                    rect.set_path_effects(halo)
                    ax.add_patch(rect)
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
        text_ax.text(0.0, 0.97, _caption(record), transform=text_ax.transAxes, va="top",
                     ha="left", fontsize=8, family="monospace")  # fmt: skip
    handles = [
        Line2D([], [], color=TRUE_COLOUR, lw=2, ls="-", label="reference box"),
        Line2D([], [], color=PRED_COLOUR, lw=2, ls="--", label="predicted box"),
    ]
    fig.legend(handles=handles, loc="upper center", ncol=2, frameon=False, fontsize=10,
               bbox_to_anchor=(0.5, 1.0))  # fmt: skip
    return save_figure(fig, path, dpi=100, bbox_inches="tight", pad_inches=0.15)
