"""Evaluation on a dataset in any format (LLaVA JSON, COCO, WebDataset, parquet): what the
data carries decides what is scored (`visto eval --data FILE`).

Generative models answer every exchange of every sample that has an image:

    a sample with world truth (truth["task"]; the synthetic world, also once exported)
                            the world's own scoring (`generative.build_items`)
    a caption record (truth["captions"])   caption.bleu4, caption.cider, all its captions
                                           as references
    each exchange of a conversation, asked after the turns before it (the reference
    answers in the history, as LLaVA's multi-turn evaluation does), by its reference:
        one box                 ground.acc50 (IoU >= 0.5; 0..999 or LLaVA's 0..1 boxes)
        several boxes           boxes.precision / recall / f1 (IoU 0.5, one to one)
        at most 3 words         vqa.overall, vqa.yesno / number / other (VQA normalisation;
                                VQAv2's answer types)
        longer                  longform.bleu4, longform.cider

and the blind twin (`blind.<name>`) asks it all again with each image swapped for another
of the dataset (or blank). Text-only samples are skipped: there is nothing to look at.

Two-tower models: image <-> caption retrieval over the caption records
(retrieval.t2i/i2t.r1/5/10); the dataset carries no class labels for zero-shot.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from visto.data.sample import Sample
from visto.errors import UserError
from visto.eval import EvalResult
from visto.eval import metrics as M
from visto.eval.generative import (
    GenerativeEvalResult,
    Item,
    answer_boxes,
    ask_items,
    blind_note,
    build_items,
    check_blind_mode,
    image_key,
    swap_or_blank,
)

# The tasks an exchange of a dataset can be scored as (the world's tasks come on top).
EXCHANGE_TASKS = ("caption", "vqa", "ground", "boxes", "longform")
# VQAv2's answers are almost all 1-3 words; a longer reference is free text, where exact
# match would score nothing and BLEU/CIDEr say more.
SHORT_ANSWER_WORDS = 3
SPLIT = "data"  # the predictions' split name: a dataset has none of its own
_NUMBER = re.compile(r"\d+(\.\d+)?")


def read_dataset(
    path: str | Path,
    *,
    fmt: str | None = None,
    image_root: str | Path | None = None,
    caption_key: str | None = None,
    image_key: str | None = None,
    n: int | None = None,
) -> tuple[list[Sample], str]:
    """(the first `n` samples that load, the reader's summary: read / skipped by reason)."""
    from visto.data.formats import ReadStats, read_samples

    stats = ReadStats()
    samples = read_samples(path, fmt, stats=stats, image_root=image_root,
                           caption_key=caption_key, image_key=image_key)  # fmt: skip
    taken = list(itertools.islice(samples, n))
    if not taken:
        raise UserError(
            f"no sample of {path} loads ({stats.summary()}); `visto data inspect {path}` "
            "shows why, --image-root says where relative image paths point"
        )
    return taken, stats.summary()


def exchange_task(reference: str) -> str:
    """How a reference answer is scored: by its boxes, else by its length."""
    boxes = answer_boxes(reference)
    if boxes:
        return "ground" if len(boxes) == 1 else "boxes"
    words = M.normalize_vqa_answer(reference).split()
    return "vqa" if len(words) <= SHORT_ANSWER_WORDS else "longform"


def answer_type(reference: str) -> str:
    """VQAv2's answer type of a short answer: yesno, number or other."""
    answer = M.normalize_vqa_answer(reference)
    if answer in ("yes", "no"):
        return "yesno"
    return "number" if _NUMBER.fullmatch(answer) else "other"


def exchange_items(sample: Sample) -> list[Item]:
    """One item per assistant turn: the conversation up to the question before it."""
    truth = sample.truth or {}
    if "captions" in truth and sample.turns[-1].role == "assistant":
        prompt = _prompt(sample, len(sample.turns) - 1, "caption", 0)
        return [Item(prompt, list(truth["captions"]), "caption", None, truth)]
    items = []
    for i, turn in enumerate(sample.turns):
        if turn.role != "assistant" or i == 0 or sample.turns[i - 1].role != "user":
            continue
        task = exchange_task(turn.content)
        qtype = answer_type(turn.content) if task == "vqa" else None
        items.append(Item(_prompt(sample, i, task, len(items)), [turn.content], task, qtype, {}))
    return items


def _prompt(sample: Sample, end: int, task: str, k: int) -> Sample:
    # "<sample id>-<task>-<k>" as the world names its samples, so the page of examples finds
    # the image; every exchange of one sample is the same image to the blind twin.
    return dataclasses.replace(sample, id=f"{sample.id}-{task}-{k}", turns=sample.turns[:end],
                               truth={"image_id": sample.id})  # fmt: skip


def dataset_items(
    samples: Iterable[Sample], tasks: Sequence[str] | None = None
) -> tuple[list[Item], Counter[str]]:
    """(items to ask, samples or items left out per reason)."""
    world, items, skipped = [], [], Counter()
    for sample in samples:
        if not sample.images:
            skipped["text only (nothing to look at)"] += 1
        elif (sample.truth or {}).get("task") is not None:
            world.append(sample)
        else:
            found = exchange_items(sample)
            items += found
            if not found:
                skipped["no answer to score"] += 1
    world_items, world_skipped = build_items(world)
    skipped.update(world_skipped)
    items = world_items + items
    if tasks is not None:
        skipped.update(f"task {it.task!r} (not in --tasks)" for it in items if it.task not in tasks)
        items = [it for it in items if it.task in tasks]
    return items, skipped


def blind_mode_for(prompts: Sequence[Sample], requested: str | None) -> str | None:
    """The blind mode to run: swapping needs two images and one image count for all."""
    mode = swap_or_blank(prompts, requested)
    if mode == "swap" and len({len(p.images) for p in prompts}) > 1:
        return "blank"
    return mode


def evaluate_generative_dataset(
    generate: Callable[[list[Sample]], list[str]],
    samples: Sequence[Sample],
    *,
    tasks: Sequence[str] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    log: Callable[[str], None] = lambda _msg: None,
    constrained_generate: Callable[[list[Sample]], list[str]] | None = None,
    blind: str | None = "swap",
) -> GenerativeEvalResult:
    """Every exchange of `samples` asked and scored, with its blind twin (see module doc)."""
    check_blind_mode(blind)
    items, skipped = dataset_items(samples, tasks)
    notes = [f"left out {n}: {reason}" for reason, n in skipped.most_common()]
    if not items:
        raise UserError(
            f"nothing to score among {len(samples)} sample(s): {'; '.join(notes) or 'no exchanges'}"
        )
    mode = blind_mode_for([it.prompt for it in items], blind)
    if not any(it.task == "json" for it in items):
        constrained_generate = None  # the grammar is the world's JSON schema: nothing to ask
    metrics, records = ask_items(
        items, generate, batch_size=batch_size, log=log,
        constrained_generate=constrained_generate, blind=mode, seed=seed,
    )  # fmt: skip
    tasks_asked = Counter(it.task for it in items)
    notes.insert(0, f"{len(records)} question(s) on {len(samples)} sample(s): "
                 + ", ".join(f"{t} {c}" for t, c in sorted(tasks_asked.items())))  # fmt: skip
    notes.append(blind_note(mode))
    if blind == "swap" and mode == "blank":
        notes.append("blind twin: blank, since swapping needs two images and one image count")
    predictions = [{**r, "split": SPLIT} for r in records]
    return GenerativeEvalResult(metrics=metrics, notes=notes, predictions=predictions)


def evaluate_generative_model_on_dataset(
    model: Any,
    samples: Sequence[Sample],
    *,
    batch_size: int = 16,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    constrain_json: bool = True,
    blind: str | None = "swap",
    max_new_tokens: int = 24,
    json_max_new_tokens: int = 400,
    log: Callable[[str], None] = lambda _msg: None,
) -> GenerativeEvalResult:
    """`evaluate_generative_dataset` with the model's greedy answers (`make_generate`)."""
    from visto.eval.generative import json_note
    from visto.tasks.runner import make_constrained_generate, make_generate

    budget = {"max_new_tokens": max_new_tokens, "json_max_new_tokens": json_max_new_tokens}
    generate = make_generate(model, None, constrain_json=False, **budget)
    constrained = make_constrained_generate(model, **budget) if constrain_json else None
    result = evaluate_generative_dataset(
        generate, samples, tasks=tasks, batch_size=batch_size, seed=seed, log=log,
        constrained_generate=constrained, blind=blind,
    )  # fmt: skip
    if any(r["task"] == "json" for r in result.predictions):
        result.notes.append(json_note(constrain_json, constrained is not None, max_new_tokens))
    return result


def evaluate_two_tower_dataset(
    model: Any,
    samples: Sequence[Sample],
    *,
    batch_size: int = 64,
    seed: int = 0,
    log: Callable[[str], None] = lambda _msg: None,
) -> EvalResult:
    """Image <-> caption retrieval over the caption records of `samples` (their first image
    and every caption). `seed` is taken for the common signature: retrieval draws nothing."""
    from visto.eval.twotower import RetrievalSet, embed_in_batches, retrieval_metrics

    captioned = [s for s in samples if s.images and (s.truth or {}).get("captions")]
    if not captioned:
        raise UserError(
            "a two-tower model is evaluated by image <-> caption retrieval, and none of the "
            f"{len(samples)} sample(s) is a caption record (an image and its caption); give "
            "caption data (COCO, a caption WebDataset or parquet), or evaluate a generative model"
        )
    captions, owner = [], []
    for i, sample in enumerate(captioned):
        captions += sample.truth["captions"]
        owner += [i] * len(sample.truth["captions"])
    images = [s.images[0] for s in captioned]
    log(f"embedding {len(images)} images and {len(captions)} captions")
    model.eval()
    image_emb = embed_in_batches(model.embed_images, images, batch_size)
    text_emb = embed_in_batches(model.embed_texts, captions, batch_size)
    metrics = retrieval_metrics(image_emb, text_emb, RetrievalSet(captions, owner, len(images)))
    notes = [f"retrieval over {len(images)} images and {len(captions)} captions"]
    if len(captioned) < len(samples):
        notes.append(f"left out {len(samples) - len(captioned)} sample(s) that are not captions")
    return EvalResult(metrics=metrics, notes=notes)


def images_by_key(samples: Iterable[Sample]) -> dict[tuple[str, str], Any]:
    """(split, image id) -> first image, for the page of examples."""
    return {(SPLIT, image_key(s)): s.images[0] for s in samples if s.images}
