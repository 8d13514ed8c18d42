"""Dense experts on the synthetic world (`visto eval` of a clipseg checkpoint).

Text-prompted segmentation, every prompt of every image (visto.data.synth.prompts), a pixel
in the mask where its probability is above one half:

    segment.miou.single   mean IoU of the prompts naming one object ("the red star")
    segment.miou.shape    "all circles" (the shapes present)
    segment.miou.colour   "all red shapes"
    segment.miou.text     "the text" (images with text)
    segment.miou          all of them together
    segment.absent.empty  share of prompts naming an absent pair answered with an empty mask

Open-vocabulary detection (OWL-ViT's protocol, as COCO's AP at IoU 0.5 per class): every
colour-shape query asked of every image, each patch's box kept after non-maximum suppression
(IoU 0.5), ranked by score over the split; AP50 of each pair with at least one object,
averaged over pairs:

    detect.ap50           the seen pairs on `split`
    heldout.detect.ap50   the 7 held-out pairs on the held-out split (never a training query)

The held-out split gets the segmentation figures too (heldout.segment.*): its first object is
a held-out pair, named only through words seen apart.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from visto.data.images import open_image
from visto.data.synth.prompts import (
    PROMPT_KINDS,
    Prompt,
    pair_phrase,
    prompt_mask,
    record_prompts,
    seen_pairs,
)
from visto.data.synth.vocab import heldout_pairs
from visto.eval import EvalResult
from visto.eval.metrics import box_iou, mean_or_nan
from visto.models.clipseg import nms

MAX_DETECTIONS = 10  # per image and query, after suppression (COCO keeps 100 of 80 classes)


def mask_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """IoU of two boolean masks; NaN when both are empty."""
    union = np.logical_or(pred, truth).sum()
    return float(np.logical_and(pred, truth).sum() / union) if union else float("nan")


def average_precision(scored: Sequence[tuple[float, bool]], n_truth: int) -> float:
    """VOC/COCO all-point AP: detections (score, is a true positive) over `n_truth` objects;
    precision made monotone from the right, integrated over recall."""
    if n_truth == 0:
        return float("nan")
    ranked = sorted(scored, key=lambda d: -d[0])
    tp = np.cumsum([hit for _, hit in ranked], dtype=float)
    fp = np.cumsum([not hit for _, hit in ranked], dtype=float)
    recall = np.concatenate([[0.0], tp / n_truth, [1.0]]) if ranked else np.array([0.0, 1.0])
    precision = (
        np.concatenate([[1.0], tp / np.maximum(tp + fp, 1e-9), [0.0]])
        if ranked
        else np.array([1.0, 0.0])
    )
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.nonzero(np.diff(recall))[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def detections(
    scores: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]
) -> list[tuple[float, list[float]]]:
    """One image and query: per-patch scores (N,) and boxes (N, 4) in 0..1 -> the kept
    (score, pixel box) pairs."""
    w, h = size
    px = (boxes * torch.tensor([w, h, w, h])).numpy()
    s = scores.numpy()
    return [(float(s[i]), px[i].tolist()) for i in nms(px, s, keep=MAX_DETECTIONS)]


def greedy_matches(kept: Sequence[tuple[float, Sequence[float]]],
                   truth: Sequence[Sequence[float]]) -> list[int | None]:  # fmt: skip
    """Which object of `truth` (pixel boxes) each detection of `kept` (`detections`: highest
    score first) finds, or None: the one it overlaps most at IoU >= 0.5 among those no
    detection before it found (VOC/COCO's rule; a later one on a found object is a duplicate)."""
    found = [False] * len(truth)
    matches: list[int | None] = []
    for _, box in kept:
        best, best_iou = None, 0.5
        for j, t in enumerate(truth):
            overlap = box_iou(box, t)
            if not found[j] and overlap >= best_iou:
                best, best_iou = j, overlap
        if best is not None:
            found[best] = True
        matches.append(best)
    return matches


def split_figures(model: Any, data_dir: str | os.PathLike, split: str, n: int,
                  pairs: Sequence[tuple[str, str]], batch_size: int,
                  log: Callable[[str], None]) -> dict[str, float]:  # fmt: skip
    """The segmentation figures and the detection AP50 over `pairs` on one split."""
    from visto.data.synth import iter_records

    ious: dict[str, list[float]] = {k: [] for k in PROMPT_KINDS}
    queries = [pair_phrase(*p) for p in pairs]
    found: dict[str, list[tuple[float, bool]]] = {q: [] for q in queries}
    n_truth = dict.fromkeys(queries, 0)
    records = []
    for k, record in enumerate(iter_records(data_dir, split)):
        if k >= n:
            break
        records.append(record)
    log(
        f"{split}: {len(records)} images, segmentation prompts and {len(queries)} detection queries each"
    )
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = [open_image(os.path.join(data_dir, r["image"])) for r in chunk]
        prompts: list[Prompt] = []
        owner: list[int] = []
        for i, r in enumerate(chunk):
            for p in record_prompts(r["truth"], r["id"]):
                prompts.append(p)
                owner.append(i)
        probs = model.segment(images, [p.text for p in prompts], owner)
        instances = {}
        for p, i, prob in zip(prompts, owner, probs, strict=True):
            r = chunk[i]
            if i not in instances:
                with Image.open(os.path.join(data_dir, r["mask"])) as m:
                    instances[i] = np.asarray(m, np.uint8)
            pred = prob > 0.5
            if p.kind == "absent":
                ious["absent"].append(float(not pred.any()))
            else:
                ious[p.kind].append(mask_iou(pred, prompt_mask(instances[i], r["truth"], p)))
        scores, boxes = model.detect(images, queries)  # (B, N, Q), (B, N, 4)
        for i, r in enumerate(chunk):
            for q, (pair, query) in enumerate(zip(pairs, queries, strict=True)):
                truth = [
                    o["box"] for o in r["truth"]["objects"] if (o["colour"], o["shape"]) == pair
                ]
                n_truth[query] += len(truth)
                kept = detections(scores[i, :, q], boxes[i], images[i].size)
                for (score, _), match in zip(kept, greedy_matches(kept, truth), strict=True):
                    found[query].append((score, match is not None))
    out = {f"segment.miou.{k}": mean_or_nan(v) for k, v in ious.items() if k != "absent"}
    out["segment.miou"] = mean_or_nan([x for k, v in ious.items() if k != "absent" for x in v])
    out["segment.absent.empty"] = mean_or_nan(ious["absent"])
    aps = [average_precision(found[q], n_truth[q]) for q in queries if n_truth[q]]
    out["detect.ap50"] = mean_or_nan(aps)
    return out


def evaluate_dense(
    model: Any,
    data_dir: str | os.PathLike,
    *,
    split: str = "test",
    n: int = 1000,
    batch_size: int = 32,
    seed: int = 0,
    log: Callable[[str], None] = lambda _msg: None,
) -> EvalResult:
    """Segmentation and detection on `split` (seen pairs) and on the held-out split (the
    held-out pairs); `seed` is unused (nothing is sampled)."""
    model.eval()
    runs = [(split, "heldout." if split == "heldout" else "")]
    if split != "heldout":
        runs.append(("heldout", "heldout."))
    metrics: dict[str, float] = {}
    notes = ["segmentation: a pixel is in the mask where its probability is above 0.5; "
             "detection: every query on every image, AP at IoU 0.5 per colour-shape pair, "
             "held-out pairs on the held-out split"]  # fmt: skip
    for split_name, prefix in runs:
        pairs = heldout_pairs() if split_name == "heldout" else seen_pairs()
        part = split_figures(model, data_dir, split_name, n, pairs, batch_size, log)
        metrics.update({prefix + k: v for k, v in part.items()})
    return EvalResult(metrics=metrics, notes=notes)


__all__ = ["average_precision", "evaluate_dense", "mask_iou"]
