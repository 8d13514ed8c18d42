"""Read a generated world: metadata, raw records, and `Sample`s for every task.

`iter_samples` turns each image record into one Sample per task item (one per caption, per
VQA question, per nameable object for grounding, ...). Records are read one line at a time
and each image is decoded once for all of its samples, then dropped: iterating a 10k-image
split holds one image in memory, not the split.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from visto.data.images import open_image
from visto.data.sample import Sample, exchanges, with_image
from visto.data.synth.config import SPLITS
from visto.data.synth.generate import TASK_KINDS
from visto.errors import UserError

DEFAULT_TASKS = tuple(
    t for t in TASK_KINDS if t not in ("count", "chat")
)  # count is a subset of vqa
# Kinds read from the truth and the masks rather than generated with the world: "segment" is
# one sample per image whose truth carries its text prompts and the path of its instance mask
# (visto.data.synth.prompts), for the dense experts (visto.models.clipseg). Never a default.
TRUTH_KINDS = ("segment",)


def load_world(data_dir: str | os.PathLike) -> dict:
    """world.json of a world directory (config, vocabularies, held-out pairs, counts)."""
    path = Path(data_dir) / "world.json"
    if not path.is_file():
        raise UserError(
            f"{data_dir} is not a synthetic world (no world.json); "
            f"create one with: visto data synth --out {data_dir} --n 2000"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); regenerate the world") from None


def iter_records(data_dir: str | os.PathLike, split: str) -> Iterator[dict]:
    """The raw per-image records of `split`, in index order."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    load_world(data_dir)
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} is missing; regenerate the world with visto data synth")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno} is not valid JSON ({e})") from None


def _check_tasks(tasks: Iterable[str] | None) -> tuple[str, ...]:
    if tasks is None:
        return DEFAULT_TASKS
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASK_KINDS + TRUTH_KINDS]
    if unknown:
        raise UserError(
            f"unknown task(s) {unknown}; choose from {', '.join(TASK_KINDS + TRUTH_KINDS)}"
        )
    return tasks


def record_items(
    record: dict, tasks: tuple[str, ...], rng: random.Random
) -> Iterator[tuple[str, str | None, list[tuple[str, str]], dict]]:
    """(task, qtype, [(question, answer), ...], facts) for every item of `tasks` in one record."""
    t = record["tasks"]
    if "caption" in tasks:
        prompts = [
            "Describe this image.",
            "Write a caption for this image.",
            "What do you see in this picture?",
        ]
        for k, caption in enumerate(t["captions"]):
            yield "caption", None, [(prompts[k % len(prompts)], caption)], {}
    vqa_all = "vqa" in tasks
    for qa in t["vqa"]:
        if vqa_all or ("count" in tasks and qa["type"] == "count"):
            facts = {k: v for k, v in qa.items() if k not in ("q", "a", "type")}
            yield ("vqa" if vqa_all else "count"), qa["type"], [(qa["q"], qa["a"])], facts
    for kind in ("ground", "refdesc"):
        if kind in tasks:
            for item in t[kind]:
                yield kind, None, [(item["q"], item["a"])], {"object": item["object"]}
    for kind in ("ocr", "json", "classify"):
        if kind in tasks and t[kind] is not None:
            yield kind, None, [(t[kind]["q"], t[kind]["a"])], {}
    if "chat" in tasks and len(t["vqa"]) >= 2:
        # A conversation of 2-4 questions about the same image (multi-turn instruction data).
        picked = rng.sample(t["vqa"], min(len(t["vqa"]), rng.randint(2, 4)))
        yield (
            "chat",
            None,
            [(qa["q"], qa["a"]) for qa in picked],
            {"qtypes": [qa["type"] for qa in picked]},
        )
    if "segment" in tasks:
        from visto.data.synth.prompts import record_prompts

        prompts = [p.to_json() for p in record_prompts(record["truth"], record["id"])]
        text = "\n".join(p["text"] for p in prompts)
        yield "segment", None, [(text, "")], {"prompts": prompts, "mask": record["mask"]}


def iter_samples(
    data_dir: str | os.PathLike,
    split: str,
    tasks: Iterable[str] | None = None,
    seed: int = 0,
    limit: int | None = None,
) -> Iterator[Sample]:
    """One Sample per (image, task item) of `split`; `seed` picks the questions of "chat".

    `tasks` selects among TASK_KINDS (default: all but "count", which is the count questions
    of "vqa", and "chat"). Each sample's truth is the image's full ground truth plus `task`,
    `qtype` (VQA type or None), `split`, `image_id` and `item`: the facts this item was
    derived from (referred object index, relation, probe, ...). `limit` stops
    after that many images.
    """
    tasks = _check_tasks(tasks)
    root = Path(data_dir)
    for n, record in enumerate(iter_records(root, split)):
        if limit is not None and n >= limit:
            return
        rng = random.Random(f"visto-chat/{seed}/{record['id']}")
        image = None
        for k, (task, qtype, qas, facts) in enumerate(record_items(record, tasks, rng)):
            if image is None:
                image = open_image(root / record["image"])
            turns = with_image(exchanges(qas))
            truth = {**record["truth"], "task": task, "qtype": qtype, "split": split,
                     "image_id": record["id"], "item": facts}  # fmt: skip
            if task == "segment":  # where the instance mask lies, for the collate
                truth["item"] = {**facts, "mask": str(root / facts["mask"])}
            yield Sample(
                id=f"{record['id']}-{task}-{k}",
                images=[image],
                turns=turns,
                truth=truth,
                source="synth",
            )
