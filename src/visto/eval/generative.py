"""Evaluation of generative VLMs: ask every task's question, read the answers, score them.

`evaluate_generative(generate, samples)` is independent of the engine: `generate` takes a
batch of prompt Samples (the conversation up to the last user turn, images attached) and
returns one answer string each. Samples are grouped by `sample.truth["task"]` (and
`["qtype"]` for VQA), as the synthetic world's reader produces them, and scored with
`visto.eval.metrics`. The flat names (DESIGN.md), each with `prefix` in front:

    vqa.overall  vqa.<type>             VQA accuracy (normalized exact match), all and per type
    count.acc                           counting questions, first number in the answer
    pope.acc/precision/recall/f1/yes_ratio   the existence probes (half are absent objects)
    ground.acc50                        referring expression -> box, IoU >= 0.5
    refdesc.acc                         box -> description, normalized exact match
    ocr.exact  ocr.cer                  read all text: exact match, character error rate
    json.valid  json.field_acc          structured description: parses; fields right (the
                                        model's own decoding)
    json.constrained.valid/field_acc    the same asked under the world's JSON grammar
                                        (`constrained_generate`; validity is the grammar's)
    detect.precision/recall/f1          the objects listed in that JSON, boxes at IoU 0.5
    classify.acc                        the main object's colour and shape
    caption.bleu4  caption.cider        one caption per image against all its references
    boxes.precision/recall/f1           answers that list several boxes, IoU 0.5 one to one
    longform.bleu4  longform.cider      free-text answers longer than a VQA answer

`evaluate_generative_world` runs it on a split of a synthetic world and on the held-out
split (names with `heldout.` in front), the generative counterpart of `evaluate_two_tower`.

The blind twin (DESIGN.md): the same questions asked with each image swapped for another
image of the same split (a seeded derangement: never its own) or for a blank one give
`blind.<name>`; `with_gains` adds `gain.<name>` = figure - blind figure, what the model
gains from looking (for `ocr.cer`, lower is better: there a negative gain is the good one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from visto.data.sample import Sample
from visto.data.tokenizer import parse_boxes
from visto.errors import UserError
from visto.eval import EvalResult
from visto.eval import metrics as M
from visto.tasks import classify as classify_task
from visto.tasks import detect as detect_task
from visto.tasks.parsers import parse_count, parse_json_answer

GenerateFn = Callable[[list[Sample]], list[str]]
# Tasks that `evaluate_generative` scores; others ("chat": multi-turn) are skipped.
SCORED_TASKS = ("caption", "vqa", "count", "ground", "refdesc", "ocr", "json", "classify",
                "boxes", "longform")  # fmt: skip
# What a blind twin sees instead of the image: another image of the split, or a blank one.
BLIND_MODES = ("swap", "blank")
BLANK_RGB = (128, 128, 128)  # mid grey: no colour, shape or text to read
BLIND, GAIN, CONSTRAINED = "blind.", "gain.", "json.constrained."


@dataclass
class Item:
    """One question to ask: the prompt sample, its reference answer(s), what it tests."""

    prompt: Sample
    references: list[str]  # one answer, or every reference caption of the image
    task: str
    qtype: str | None
    truth: dict


def prompt_of(sample: Sample) -> Sample:
    """The sample without its final assistant turn: what the model is asked."""
    assert sample.turns and sample.turns[-1].role == "assistant", (
        f"sample {sample.id!r} must end with the assistant's reference answer"
    )
    return dataclasses.replace(sample, turns=sample.turns[:-1])


def build_items(samples: Iterable[Sample]) -> tuple[list[Item], dict[str, int]]:
    """Items to ask, and how many samples were skipped per reason. Caption samples of one
    image (one per reference caption) become one item with all captions as references."""
    items: list[Item] = []
    captions: dict[str, Item] = {}
    skipped: dict[str, int] = defaultdict(int)
    for sample in samples:
        truth = sample.truth or {}
        task = truth.get("task")
        if task not in SCORED_TASKS:
            skipped[f"task {task!r}"] += 1
            continue
        answer = sample.turns[-1].content
        if task == "caption":
            key = str(truth.get("image_id", sample.id))
            if key in captions:
                captions[key].references.append(answer)
                continue
            captions[key] = item = Item(prompt_of(sample), [answer], task, None, truth)
        else:
            item = Item(prompt_of(sample), [answer], task, truth.get("qtype"), truth)
        items.append(item)
    return items, dict(skipped)


# LLaVA-1.5's RefCOCO answers write boxes as fractions of the image: [0.12, 0.3, 0.5, 0.61].
_FRACTION_BOX_RE = re.compile(
    r"\[\s*" + r"\s*,\s*".join([r"([01](?:\.\d+)?|\.\d+)"] * 4) + r"\s*\]"
)


def answer_boxes(text: str) -> list[list[int]]:
    """Every box in an answer or reference, 0..999: visto's plain lists and location tokens
    (`parse_boxes`), or fractions 0..1 scaled to 0..999, so a model that learned either
    convention is scored against references in the same one."""
    boxes = parse_boxes(text)
    if boxes:
        return boxes
    found = []
    for m in _FRACTION_BOX_RE.finditer(text):
        values = [float(g) for g in m.groups()]
        if all(0.0 <= v <= 1.0 for v in values) and any(0.0 < v < 1.0 for v in values):
            found.append([min(round(v * 1000), 999) for v in values])
    return found


def generate_all(generate: GenerateFn, prompts: Sequence[Sample], batch_size: int) -> list[str]:
    """One answer per prompt, asked in batches of `batch_size` in the order given."""
    assert batch_size >= 1
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        batch = list(prompts[i : i + batch_size])
        answers = generate(batch)
        assert len(answers) == len(batch), (
            f"generate returned {len(answers)} answers for {len(batch)} prompts"
        )
        out.extend(str(a) for a in answers)
    return out


# Answers that run long: the engine's JSON budget (`tasks.runner.make_generate`: hundreds of
# tokens), against a few tokens for every other answer.
LONG_ANSWER_TASKS = ("json",)


def batch_order(items: Sequence[Item]) -> list[list[int]]:
    """The item indices in the groups and order they are asked in: the short answers, then
    the long ones (LONG_ANSWER_TASKS), each group by task and question type (file order within
    one). A batch decodes until its longest answer ends, its finished rows dropped as they end:
    a JSON question among 63 one-word answers kept a batch decoding ~300 steps at one to three
    rows. On n0's quickstart model (200 test + 200 held-out images, idle) the seeing pass took
    126 s in file order and 63 s in these groups, every answer the same (bench/README.md,
    "Quickstart wall clock"). The answers do not depend on the order."""
    order = sorted(range(len(items)), key=lambda k: (items[k].task, items[k].qtype or "", k))
    short = [k for k in order if items[k].task not in LONG_ANSWER_TASKS]
    long = [k for k in order if items[k].task in LONG_ANSWER_TASKS]
    return [group for group in (short, long) if group]


def generate_grouped(generate: GenerateFn, prompts: Sequence[Sample], groups: Sequence[Sequence[int]],
                     batch_size: int) -> dict[int, str]:  # fmt: skip
    """`generate_all` over each group of prompt indices in turn (`batch_order`; a batch never
    spans two groups): prompt index -> answer, for the indices in `groups`."""
    out: dict[int, str] = {}
    for group in groups:
        answers = generate_all(generate, [prompts[k] for k in group], batch_size)
        out.update(zip(group, answers, strict=True))
    return out


class Answered:
    """The answers an evaluation has generated, by what a model's answer depends on: the
    images it is shown (their pixels) and the turns (`key`); a sample's id and truth do not
    reach the model. The blind twin shows every image in place of another one, so each of its
    questions that the shown image was itself asked (the JSON, classify and OCR questions,
    and the VQA questions the two images share) is a prompt already answered: greedy decoding
    answers it the same, and it is not asked again. An evaluation whose `generate` is not a
    function of images and turns (sampling, an oracle by sample id) passes `reuse=False`."""

    def __init__(self) -> None:
        self.answers: dict[tuple, str] = {}
        self._pixels: dict[int, bytes] = {}  # id(image) -> digest, for the images of this run
        self._held: list[Any] = []  # keeps those images alive, so no id is reused

    def key(self, sample: Sample, kind: str) -> tuple:
        """(kind: which generate function, the images' digests, the turns)."""
        digests = []
        for image in sample.images:
            digest = self._pixels.get(id(image))
            if digest is None:
                h = hashlib.blake2b(digest_size=16)
                h.update(f"{image.mode}/{image.size}".encode())
                h.update(image.tobytes())
                digest = self._pixels[id(image)] = h.digest()
                self._held.append(image)
            digests.append(digest)
        return (kind, tuple(digests), tuple((t.role, t.content) for t in sample.turns))

    def ask(self, generate: GenerateFn, prompts: Sequence[Sample], groups: Sequence[Sequence[int]],
            batch_size: int, kind: str, log: Callable[[str], None], message: str) -> list[str]:  # fmt: skip
        """Answers to `prompts`: those already known from here, the others generated
        (`generate_grouped` over `groups`, each distinct prompt once). `message` is logged with
        the number of questions asked first: "asking {n} question(s)..."."""
        keys = [self.key(p, kind) for p in prompts]
        first: dict[tuple, int] = {}
        for k, key in enumerate(keys):
            if key not in self.answers:
                first.setdefault(key, k)
        todo = set(first.values())
        known = len(prompts) - len(todo)
        log(message.format(n=len(todo)) + (f" ({known} asked before: the same images and turns)" if known else ""))
        groups = [[k for k in group if k in todo] for group in groups]
        for k, answer in generate_grouped(generate, prompts, [g for g in groups if g], batch_size).items():
            self.answers[keys[k]] = answer
        return [self.answers[key] for key in keys]


def _present(item: Item) -> bool:
    """Whether an existence probe's object is in the image (the item's facts, else 'yes')."""
    facts = item.truth.get("item") or {}
    if "present" in facts:
        return bool(facts["present"])
    return M.normalize_vqa_answer(item.references[0]) == "yes"


def score_items(items: Sequence[Item], predictions: Sequence[str]) -> tuple[dict, list[float]]:
    """(flat metrics without prefix, one per-item score: the figure that item contributes)."""
    assert len(items) == len(predictions)
    by_task: dict[str, list[int]] = defaultdict(list)
    for k, item in enumerate(items):
        by_task[item.task].append(k)
    scores: list[float] = [M.NAN] * len(items)
    out: dict[str, float] = {}

    vqa = by_task.get("vqa", [])
    if vqa:
        per_type = M.vqa_scores(
            [predictions[k] for k in vqa],
            [items[k].references for k in vqa],
            [items[k].qtype or "other" for k in vqa],
        )
        out.update({f"vqa.{name}": v for name, v in per_type.items()})
        for k in vqa:
            scores[k] = M.vqa_accuracy(predictions[k], items[k].references)

    counting = [k for k in vqa if items[k].qtype == "count"] + by_task.get("count", [])
    if counting:
        targets = [int(items[k].references[0]) for k in counting]
        out["count.acc"] = M.count_accuracy([predictions[k] for k in counting], targets)
        for k, t in zip(counting, targets, strict=True):
            scores[k] = float(parse_count(predictions[k]) == t)

    probes = [k for k in vqa if items[k].qtype == "exist"]
    if probes:
        pope = M.pope_metrics(
            [predictions[k] for k in probes], [_present(items[k]) for k in probes]
        )
        out.update({f"pope.{name}": v for name, v in pope.items()})

    ground = by_task.get("ground", [])
    if ground:
        pred_boxes, target_boxes = [], []
        for k in ground:
            target = answer_boxes(items[k].references[0])[0]
            found = answer_boxes(predictions[k])
            pred_boxes.append(found[0] if found else None)
            target_boxes.append(target)
            scores[k] = M.box_iou(found[0], target) if found else 0.0
        out["ground.acc50"] = M.grounding_accuracy(pred_boxes, target_boxes)

    refdesc = by_task.get("refdesc", [])
    if refdesc:
        for k in refdesc:
            scores[k] = M.vqa_accuracy(predictions[k], items[k].references)
        out["refdesc.acc"] = M.mean_or_nan([scores[k] for k in refdesc])

    ocr = by_task.get("ocr", [])
    if ocr:
        preds, refs = [predictions[k] for k in ocr], [items[k].references[0] for k in ocr]
        out["ocr.exact"] = M.ocr_exact_match(preds, refs)
        out["ocr.cer"] = M.character_error_rate(preds, refs)
        for k in ocr:
            scores[k] = M.character_error_rate([predictions[k]], items[k].references[:1])

    out.update(_score_json(items, predictions, by_task.get("json", []), scores))

    classify = by_task.get("classify", [])
    if classify:
        for k in classify:
            label = classify_task.parse(predictions[k])
            scores[k] = float(label == M.normalize_vqa_answer(items[k].references[0]))
        out["classify.acc"] = M.mean_or_nan([scores[k] for k in classify])

    listed = by_task.get("boxes", [])
    if listed:
        pred_boxes = [answer_boxes(predictions[k]) for k in listed]
        target_boxes = [answer_boxes(items[k].references[0]) for k in listed]
        prf = M.detection_prf(pred_boxes, target_boxes, 0.5)
        out.update({f"boxes.{name}": v for name, v in prf.items()})
        for k, p, t in zip(listed, pred_boxes, target_boxes, strict=True):
            # This answer's F1 = 2 TP / (#predicted + #target): 0, not undefined, for no boxes.
            scores[k] = 2 * len(M.match_boxes(p, t, 0.5)) / (len(p) + len(t))

    for task in ("caption", "longform"):
        out.update(_score_text(task, items, predictions, by_task.get(task, []), scores))
    return out, scores


def _score_text(
    task: str,
    items: Sequence[Item],
    predictions: Sequence[str],
    indices: list[int],
    scores: list[float],
) -> dict[str, float]:
    """BLEU-4 and CIDEr-D of free-text answers against all their references (COCO's way)."""
    if not indices:
        return {}
    hyps = [M.tokenize_caption(predictions[k]) for k in indices]
    refs = [[M.tokenize_caption(r) for r in items[k].references] for k in indices]
    cider, per_answer = M.cider_d(hyps, refs)
    for k, s in zip(indices, per_answer, strict=True):
        scores[k] = s
    return {f"{task}.bleu4": M.bleu(hyps, refs)[3], f"{task}.cider": cider}  # fmt: skip


def _score_json(
    items: Sequence[Item], predictions: Sequence[str], indices: list[int], scores: list[float]
) -> dict[str, float]:
    if not indices:
        return {}
    valid, field_acc = [], []
    pred_boxes, target_boxes, pred_labels, target_labels = [], [], [], []
    for k in indices:
        target = json.loads(items[k].references[0])
        ok, value = parse_json_answer(predictions[k])
        valid.append(float(ok))
        acc = M.json_field_accuracy(value, target) if ok else 0.0
        field_acc.append(acc)
        scores[k] = acc
        # The same answer read as a detection: every listed object with its box and label.
        found = detect_task.parse(predictions[k])
        pred_boxes.append([b.norm for b in found])
        pred_labels.append([b.label or "" for b in found])
        objects = target.get("objects", []) if isinstance(target, dict) else []
        target_boxes.append([o["box"] for o in objects])
        target_labels.append([detect_task.object_label(o) or "" for o in objects])
    out = {"json.valid": M.mean_or_nan(valid), "json.field_acc": M.mean_or_nan(field_acc)}
    prf = M.detection_prf(pred_boxes, target_boxes, 0.5, pred_labels, target_labels)
    out.update({f"detect.{name}": v for name, v in prf.items()})
    return out


# ----------------------------------------------------------------------------- blind twins


def derangement(n: int, seed: int | str = 0) -> list[int]:
    """A seeded permutation of range(n) that moves every index: Sattolo's algorithm draws a
    random n-cycle, so each image is shown in place of another one, never in its own."""
    if n < 2:
        raise UserError(
            f"a blind twin that swaps images needs at least 2 images, got {n}; "
            "use the blank mode (--blind blank) or evaluate more images"
        )
    order = list(range(n))
    rng = random.Random(f"visto-blind/{seed}")
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i, never i itself: that is what makes it one cycle
        order[i], order[j] = order[j], order[i]
    return order


def check_blind_mode(mode: str | None) -> None:
    """A clear error for a blind mode that is neither one of BLIND_MODES nor None (off)."""
    if mode is not None and mode not in BLIND_MODES:
        raise UserError(f"blind mode must be one of {', '.join(BLIND_MODES)} or None, got {mode!r}")


def image_key(sample: Sample) -> str:
    """Which image a prompt asks about: the world's image id, else the sample's own id."""
    return str((sample.truth or {}).get("image_id", sample.id))


def blank_like(image: Any) -> Any:
    from PIL import Image

    return Image.new("RGB", image.size, BLANK_RGB)


def blind_prompts(
    prompts: Sequence[Sample], mode: str, seed: int | str = 0
) -> tuple[list[Sample], list[str]]:
    """(the prompts with their images hidden, what each was shown instead): in "swap" mode
    every image is replaced by another image of `prompts` (a seeded derangement of the
    distinct images, so all questions about one image see the same other image), in "blank"
    mode by a grey image of the same size."""
    check_blind_mode(mode)
    if mode == "blank":
        hidden = [
            dataclasses.replace(p, images=[blank_like(im) for im in p.images]) for p in prompts
        ]
        return hidden, ["blank"] * len(prompts)
    images: dict[str, list] = {}
    for p in prompts:
        images.setdefault(image_key(p), p.images)
    keys = list(images)
    partner = {key: keys[k] for key, k in zip(keys, derangement(len(keys), seed), strict=True)}
    hidden = []
    for p in prompts:
        shown = images[partner[image_key(p)]]
        if len(shown) != len(p.images):
            raise UserError(
                f"blind twin: prompt {p.id!r} has {len(p.images)} image(s) but the one swapped "
                f"in has {len(shown)}; swapping needs one image count for all (use blank)"
            )
        hidden.append(dataclasses.replace(p, images=shown))
    return hidden, [partner[image_key(p)] for p in prompts]


def swap_or_blank(samples: Sequence[Sample], mode: str | None) -> str | None:
    """The blind mode to run: "swap" falls back to "blank" where there is one image only."""
    if mode == "swap" and len({image_key(s) for s in samples}) < 2:
        return "blank"
    return mode


def with_gains(metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` plus gain.<name> = <name> - blind.<name> for every figure with a blind twin
    (NaN where either is undefined)."""
    gains = {
        GAIN + name: metrics[name] - value
        for key, value in metrics.items()
        if key.startswith(BLIND) and (name := key[len(BLIND) :]) in metrics
    }
    return {**metrics, **gains}


# ----------------------------------------------------------------------------- asking


@dataclass
class Pass:
    """One pass of every item through the model: its own answers and their scores, the
    grammar-constrained answers of the JSON items (item index -> answer, score), and the
    flat figures (no prefix) of both."""

    answers: list[str]
    scores: list[float]
    constrained_answers: dict[int, str]
    constrained_scores: dict[int, float]
    metrics: dict[str, float]


def run_pass(
    items: Sequence[Item],
    prompts: Sequence[Sample],
    generate: GenerateFn,
    constrained_generate: GenerateFn | None,
    batch_size: int,
    log: Callable[[str], None],
    what: str = "",
    answered: Answered | None = None,
) -> Pass:
    """Ask every item's prompt (`prompts[k]` for `items[k]`; batched by `batch_order`), then
    the JSON items again through `constrained_generate` where one is given; score both.
    `answered`: the answers generated so far, reused for the same images and turns (None:
    every prompt is asked)."""
    message = f"asking {{n}} question(s) in batches of {batch_size}{what}"
    groups = batch_order(items)
    if answered is None:
        log(message.format(n=len(prompts)))
        by_index = generate_grouped(generate, prompts, groups, batch_size)
        answers = [by_index[k] for k in range(len(prompts))]
    else:
        answers = answered.ask(generate, prompts, groups, batch_size, "own", log, message)
    metrics, scores = score_items(items, answers)
    json_items = [k for k, it in enumerate(items) if it.task == "json"]
    if constrained_generate is None or not json_items:
        return Pass(answers, scores, {}, {}, metrics)
    json_prompts = [prompts[k] for k in json_items]
    message += ", JSON under its grammar"
    if answered is None:
        log(message.format(n=len(json_items)))
        constrained = generate_all(constrained_generate, json_prompts, batch_size)
    else:
        constrained = answered.ask(constrained_generate, json_prompts, [list(range(len(json_items)))],
                                   batch_size, "constrained", log, message)  # fmt: skip
    sub_scores = [M.NAN] * len(json_items)
    figures = _score_json(
        [items[k] for k in json_items], constrained, list(range(len(json_items))), sub_scores
    )
    metrics[CONSTRAINED + "valid"] = figures["json.valid"]
    metrics[CONSTRAINED + "field_acc"] = figures["json.field_acc"]
    return Pass(answers, scores, dict(zip(json_items, constrained, strict=True)),
                dict(zip(json_items, sub_scores, strict=True)), metrics)  # fmt: skip


def _score_or_none(score: float) -> float | None:
    return None if math.isnan(score) else score


def question_records(
    items: Sequence[Item], seeing: Pass, blind: Pass | None, shown: Sequence[str]
) -> list[dict[str, Any]]:
    """One record per item: the question, references, the answer and its score; the
    constrained answer of a JSON item; the blind twin's answer and what it was shown."""
    records = []
    for k, it in enumerate(items):
        record = {
            "id": it.prompt.id,
            "task": it.task,
            "qtype": it.qtype,
            "question": it.prompt.turns[-1].content if it.prompt.turns else "",
            "references": it.references,
            "prediction": seeing.answers[k],
            "score": _score_or_none(seeing.scores[k]),
        }
        if k in seeing.constrained_answers:
            record["constrained_prediction"] = seeing.constrained_answers[k]
            record["constrained_score"] = _score_or_none(seeing.constrained_scores[k])
        if blind is not None:
            record["blind_image"] = shown[k]
            record["blind_prediction"] = blind.answers[k]
            record["blind_score"] = _score_or_none(blind.scores[k])
        records.append(record)
    return records


def evaluate_generative(
    model_generate_fn: GenerateFn,
    samples: Iterable[Sample],
    *,
    prefix: str = "",
    batch_size: int = 16,
    log: Callable[[str], None] = lambda _msg: None,
    constrained_generate: GenerateFn | None = None,
    blind: str | None = None,
    seed: int = 0,
    reuse: bool = True,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(flat metrics dict, one record per question asked) for `samples` with task truth.

    Every metric name gets `prefix` in front ("heldout." for the held-out split). Each
    prediction record: id, task, qtype, question (the last user turn), references,
    prediction, score (that item's figure: accuracy, IoU, CER, field accuracy, CIDEr-D).
    `constrained_generate` also asks the JSON items under a grammar (json.constrained.*,
    constrained_prediction). `blind` ("swap" or "blank", `blind_prompts` with `seed`) asks
    every item again with its image hidden: blind.<prefix><name>, and in each record
    blind_prediction, blind_score and blind_image (the image shown instead, or "blank").
    `reuse`: a prompt whose images and turns were asked before takes that answer (`Answered`:
    right for any `generate` that answers from the images and turns alone, as greedy decoding
    does; False for one that samples or reads the sample's id).
    """
    check_blind_mode(blind)  # before any question is asked
    items, skipped = build_items(samples)
    for reason, n in skipped.items():
        log(f"skipped {n} sample(s) with {reason}: no generative metric for it")
    return ask_items(
        items, model_generate_fn, prefix=prefix, batch_size=batch_size, log=log,
        constrained_generate=constrained_generate, blind=blind, seed=seed, reuse=reuse,
    )  # fmt: skip


def ask_items(
    items: Sequence[Item],
    model_generate_fn: GenerateFn,
    *,
    prefix: str = "",
    batch_size: int = 16,
    log: Callable[[str], None] = lambda _msg: None,
    constrained_generate: GenerateFn | None = None,
    blind: str | None = None,
    seed: int = 0,
    reuse: bool = True,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """`evaluate_generative` on items already built (from the world's truth, or from a
    dataset's exchanges: `visto.eval.dataset`). `reuse`: a prompt with the same images and
    turns as one asked before (the blind twin's, mostly) takes its answer (`Answered`)."""
    check_blind_mode(blind)
    if not items:
        return {}, []
    prompts = [it.prompt for it in items]
    answered = Answered() if reuse else None
    seeing = run_pass(items, prompts, model_generate_fn, constrained_generate, batch_size, log,
                      answered=answered)  # fmt: skip
    metrics = {f"{prefix}{name}": float(v) for name, v in seeing.metrics.items()}
    blind_pass, shown = None, []
    if blind is not None:
        hidden, shown = blind_prompts(prompts, blind, seed)
        blind_pass = run_pass(items, hidden, model_generate_fn, constrained_generate, batch_size,
                              log, f" with the images hidden ({blind})", answered)  # fmt: skip
        metrics.update(
            {f"{BLIND}{prefix}{name}": float(v) for name, v in blind_pass.metrics.items()}
        )
    return metrics, question_records(items, seeing, blind_pass, shown)


@dataclass
class GenerativeEvalResult(EvalResult):
    """An EvalResult that also carries the per-question predictions (for predictions.jsonl)."""

    predictions: list[dict[str, Any]] = field(default_factory=list)


def zero_undefined_pope(metrics: dict[str, float]) -> dict[str, float]:
    """POPE precision and F1 are 0/0 when a model never says "yes": they count as 0
    (scikit-learn's zero_division=0), on either split and for the blind twin, so a never-yes
    model is not left out of a table it would lose."""
    undefined_is_zero = ("pope.precision", "pope.f1")
    return {
        k: 0.0
        if math.isnan(v) and k.removeprefix(BLIND).removeprefix("heldout.") in undefined_is_zero
        else v
        for k, v in metrics.items()
    }


def reportable_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The figures to write out, sorted and rounded: undefined POPE figures as 0
    (`zero_undefined_pope`), the gains over the blind twin (`with_gains`), any other
    undefined figure (NaN) left out."""
    metrics = with_gains(zero_undefined_pope(metrics))
    return {k: round(float(v), 6) for k, v in sorted(metrics.items()) if not math.isnan(v)}


def blind_note(mode: str | None) -> str:
    if mode is None:
        return "blind twin: not evaluated (no blind.* figures)"
    shown = {"swap": "another image of the same split (a seeded derangement: never its own)",
             "blank": "a blank grey image"}[mode]  # fmt: skip
    return (f"blind twin: the same questions with each image replaced by {shown}; blind.<name> "
            "is its figure, gain.<name> = figure - blind figure (what looking adds)")  # fmt: skip


def evaluate_generative_world(
    model_generate_fn: GenerateFn,
    data_dir: str | os.PathLike,
    *,
    split: str = "test",
    n: int = 200,
    tasks: Sequence[str] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    log: Callable[[str], None] = lambda _msg: None,
    constrained_generate: GenerateFn | None = None,
    blind: str | None = "swap",
) -> GenerativeEvalResult:
    """Every task on the first `n` images of `split` and of the held-out split, and (unless
    `blind` is None) its blind twin on the same images (`evaluate_generative`).

    `tasks` selects among the world's task kinds (default: the reader's DEFAULT_TASKS);
    `seed` is the reader's (it only picks the questions of "chat", which is not scored) and
    the blind twin's derangement.
    """
    from visto.data.synth import iter_samples

    check_blind_mode(blind)
    runs = [(split, "heldout." if split == "heldout" else "")]
    if split != "heldout":
        runs.append(("heldout", "heldout."))
    metrics: dict[str, float] = {}
    predictions: list[dict[str, Any]] = []
    notes: list[str] = []
    modes: set[str | None] = set()
    for split_name, prefix in runs:
        samples = list(iter_samples(data_dir, split_name, tasks=tasks, seed=seed, limit=n))
        if not samples:
            notes.append(f"split {split_name!r} is empty: no {prefix or 'seen'} figures")
            continue
        log(f"{split_name}: {len(samples)} sample(s)")
        mode = swap_or_blank(samples, blind)
        modes.add(mode)
        m, records = evaluate_generative(
            model_generate_fn, samples, prefix=prefix, batch_size=batch_size, log=log,
            constrained_generate=constrained_generate, blind=mode, seed=seed,
        )  # fmt: skip
        metrics.update(m)
        predictions += [{**r, "split": split_name} for r in records]
        notes.append(f"{split_name}: {len(records)} question(s) on the first {n} image(s)")
    notes += [blind_note(mode) for mode in sorted(modes, key=str)]
    return GenerativeEvalResult(metrics=metrics, notes=notes, predictions=predictions)


def evaluate_generative_model(
    model: Any,
    data_dir: Any,
    *,
    split: str = "test",
    n: int = 200,
    batch_size: int = 16,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    constrain_json: bool = True,
    blind: str | None = "swap",
    max_new_tokens: int = 24,
    json_max_new_tokens: int = 400,
    log: Callable[[str], None] = lambda _msg: None,
) -> GenerativeEvalResult:
    """`visto eval` for a generative family: every task of the world on the first `n` images
    of `split` and of the held-out split (`evaluate_generative_world`), each answer the
    model's own greedy decoding; JSON questions also under the world's grammar
    (json.constrained.*) when `constrain_json` and xgrammar is installed; and the blind twin
    (`blind`: "swap", "blank" or None) of every figure."""
    from visto.tasks.runner import make_constrained_generate, make_generate

    budget = {"max_new_tokens": max_new_tokens, "json_max_new_tokens": json_max_new_tokens}
    generate = make_generate(model, None, constrain_json=False, **budget)
    constrained = make_constrained_generate(model, **budget) if constrain_json else None
    result = evaluate_generative_world(
        generate, data_dir, split=split, n=n, tasks=tasks, batch_size=batch_size, seed=seed,
        log=log, constrained_generate=constrained, blind=blind,
    )  # fmt: skip
    result.notes.append(json_note(constrain_json, constrained is not None, max_new_tokens))
    nan = [k for k, v in result.metrics.items() if isinstance(v, float) and math.isnan(v)]
    if nan:
        result.notes.append(f"no figure (nothing to divide by) for: {', '.join(nan)}")
    return result


def json_note(asked: bool, available: bool, max_new_tokens: int) -> str:
    """The report's line on how answers were decoded."""
    if available:
        constrained = "and again under the world's JSON schema (xgrammar): json.constrained.*"
    elif asked:
        constrained = "no grammar-constrained figures: xgrammar is not installed"
    else:
        constrained = "no grammar-constrained figures (--no-constrain)"
    return (
        "JSON answers: json.valid and json.field_acc are the model's own (unconstrained) "
        f"decoding; {constrained}; greedy decoding, at most {max_new_tokens} new tokens per "
        "short answer"
    )
