"""Dense pretraining of a vision tower on the synthetic world's masks, boxes and texts.

A VLM learns to *talk* about what its vision tower already *sees*. On a CPU budget the tower
learns fastest from per-patch labels, which the synthetic world has for free (every pixel's
object is in its instance mask). Each patch of the ViT's grid gets (heads on the last layer):

    shape    which shape covers most of the patch (0 = background)         cross-entropy
    colour   that object's colour (0 = background)                         cross-entropy
    size     that object's size class (0 = background)                      cross-entropy
    centre   1 on the patch holding an object's box centre (CenterNet,      binary CE
             Zhou et al. 2019 "Objects as Points"), with the object's
    box      (x1, y1, x2, y2) / image side regressed there                   L1
    centre_shape  the shape of the object centred on the patch (0 = none):   cross-entropy
             CenterNet's per-class centre heatmap, so that mean-pooled
             features can hold "how many circles" linearly
    chars    the two characters of a text under the patch's left and right  cross-entropy
             quarter points (0 = no text): a reading signal for OCR

Shapes and colours are separate targets, so a held-out colour-shape pair is two seen facts.
Images and targets are read once into memory (uint8 pixels, int8 labels): an epoch costs
only the forward and backward passes. The tower trains on pixels normalised as the processor
it will be used with normalises them (`ProcessorConfig.mean/std`, the `processor` argument of
`pretrain_dense`): the same float32 values, so its features do not shift after training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

# The heads and their character set live with the connector that reads them at inference
# (object tokens); this module trains them. Class k + 1 is the world's k-th shape, colour, size.
from visto.connectors.regions import CHARS, DenseHeads
from visto.data.images import normalise_pixels
from visto.data.processor import ProcessorConfig
from visto.data.synth.vocab import COLOURS, SHAPES, SIZES
from visto.nn.vision import ViT, ViTConfig
from visto.train.optim import lr_factor

MIN_LR_RATIO = 0.05  # the cosine ends at 5% of lr


@dataclass
class DenseTargets:
    """Per-image, per-patch labels for a grid of g x g patches (N images)."""

    pixels: Tensor  # (N, 3, S, S) uint8
    shape: Tensor  # (N, g*g) int64, 0 = background
    colour: Tensor  # (N, g*g)
    size: Tensor  # (N, g*g)
    centre: Tensor  # (N, g*g) float 0/1
    centre_shape: Tensor  # (N, g*g) int64, 0 = no object centre, else 1 + shape
    box: Tensor  # (N, g*g, 4) float, box / side on centre patches (0 elsewhere)
    chars: Tensor  # (N, g*g, 2) int64, 0 = no text, else 1 + CHARS index


def record_targets(record: dict, mask: np.ndarray, grid: int) -> dict[str, np.ndarray]:
    """The per-patch labels of one world record (its instance mask as a (S, S) array)."""
    truth = record["truth"]
    side = truth["width"]
    assert mask.shape == (side, side) and side % grid == 0, (mask.shape, side, grid)
    p = side // grid
    objs = truth["objects"]
    # Majority object per patch: histogram of mask values in each p x p block.
    blocks = mask.reshape(grid, p, grid, p).transpose(0, 2, 1, 3).reshape(grid * grid, p * p)
    n_vals = len(objs) + 1
    counts = np.stack([(blocks == v).sum(axis=1) for v in range(n_vals)], axis=1)  # (g*g, n+1)
    # An object owns the patch when it covers at least a quarter of it (small shapes count).
    counts[:, 0] = np.where(counts[:, 0] > 0.75 * p * p, counts[:, 0], 0)
    owner = counts.argmax(axis=1)  # 0 = background, i+1 = object i
    shape = np.zeros(grid * grid, np.int64)
    colour = np.zeros(grid * grid, np.int64)
    size = np.zeros(grid * grid, np.int64)
    for i, o in enumerate(objs):
        hit = owner == i + 1
        shape[hit] = 1 + SHAPES.index(o["shape"])
        colour[hit] = 1 + list(COLOURS).index(o["colour"])
        size[hit] = 1 + list(SIZES).index(o["size"])
    centre = np.zeros(grid * grid, np.float32)
    centre_shape = np.zeros(grid * grid, np.int64)
    box = np.zeros((grid * grid, 4), np.float32)
    for o in objs:
        x1, y1, x2, y2 = o["box"]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        k = min(grid - 1, int(cy // p)) * grid + min(grid - 1, int(cx // p))
        centre[k] = 1.0
        centre_shape[k] = 1 + SHAPES.index(o["shape"])
        box[k] = np.asarray([x1, y1, x2, y2], np.float32) / side
    chars = np.zeros((grid * grid, 2), np.int64)
    for t in truth["texts"]:
        x1, y1, x2, y2 = t["box"]
        text = t["text"]
        for row in range(grid):
            cy = row * p + p / 2
            if not (y1 - p / 4 <= cy <= y2 + p / 4):
                continue
            for col in range(grid):
                for j, qx in enumerate((col * p + p / 4, col * p + 3 * p / 4)):
                    if x1 <= qx < x2:
                        c = text[min(len(text) - 1, int((qx - x1) / (x2 - x1) * len(text)))]
                        if c.upper() in CHARS:
                            chars[row * grid + col, j] = 1 + CHARS.index(c.upper())
    return {"shape": shape, "colour": colour, "size": size, "centre": centre,
            "centre_shape": centre_shape, "box": box, "chars": chars}  # fmt: skip


def load_dense_targets(
    world_dir: str | Path, split: str, grid: int, limit: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> DenseTargets:
    """Read a split's images, masks and truth into memory as `DenseTargets`."""
    from PIL import Image

    from visto.data.synth import iter_records

    root = Path(world_dir)
    pixels, rows = [], []
    for k, record in enumerate(iter_records(root, split)):
        if limit is not None and k >= limit:
            break
        with Image.open(root / record["image"]) as im:
            pixels.append(np.asarray(im.convert("RGB"), np.uint8).transpose(2, 0, 1))
        with Image.open(root / record["mask"]) as m:
            mask = np.asarray(m, np.uint8)
        rows.append(record_targets(record, mask, grid))
        if on_progress is not None:
            on_progress(k + 1)
    assert rows, f"split {split!r} of {world_dir} has no images"
    stack = {key: torch.from_numpy(np.stack([r[key] for r in rows])) for key in rows[0]}
    return DenseTargets(pixels=torch.from_numpy(np.stack(pixels)), **stack)


def dense_loss(out: dict[str, Tensor], t: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Sum of the per-head losses; also per-patch accuracies on the object patches."""
    ce = F.cross_entropy
    loss_shape = ce(out["shape"].flatten(0, 1), t["shape"].flatten())
    loss_colour = ce(out["colour"].flatten(0, 1), t["colour"].flatten())
    loss_size = ce(out["size"].flatten(0, 1), t["size"].flatten())
    # Centres are rare (1-5 of 64 patches): weight positives up so they are not ignored.
    loss_centre = F.binary_cross_entropy_with_logits(
        out["centre"], t["centre"], pos_weight=torch.tensor(8.0)
    )
    # Per-class centres: as rare as centres, weighted up alike.
    centre_weight = torch.tensor([1.0] + [8.0] * len(SHAPES))
    loss_centre_shape = ce(
        out["centre_shape"].flatten(0, 1), t["centre_shape"].flatten(), weight=centre_weight
    )
    on = t["centre"] > 0  # (B, N)
    loss_box = (
        F.l1_loss(out["box"][on], t["box"][on], reduction="sum") / on.sum().clamp(min=1) * 4
    )
    loss_chars = ce(out["chars"].flatten(0, 2), t["chars"].flatten())
    loss = loss_shape + loss_colour + loss_size + loss_centre + loss_centre_shape + loss_box + loss_chars
    with torch.no_grad():
        obj = t["shape"] > 0
        texty = t["chars"] > 0
        stats = {
            "shape_acc": float((out["shape"].argmax(-1) == t["shape"])[obj].float().mean()),
            "colour_acc": float((out["colour"].argmax(-1) == t["colour"])[obj].float().mean()),
            "centre_acc": float(((out["centre"] > 0) == on).float().mean()),
            "centre_shape_acc": float(
                (out["centre_shape"].argmax(-1) == t["centre_shape"])[on].float().mean()
            ) if on.any() else float("nan"),
            "box_l1": float(loss_box) / 4,
            "char_acc": float((out["chars"].argmax(-1) == t["chars"])[texty].float().mean())
            if texty.any() else float("nan"),
        }  # fmt: skip
    return loss, stats


def batch_of(
    targets: DenseTargets, index: Tensor, processor: ProcessorConfig | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """The images at `index`, normalised with `processor`'s mean/std (the default
    ProcessorConfig's when None), and their targets."""
    p = processor or ProcessorConfig()
    fields = ("shape", "colour", "size", "centre", "centre_shape", "box", "chars")
    pixels = normalise_pixels(targets.pixels[index], p.mean, p.std)
    return pixels, {f: getattr(targets, f)[index] for f in fields}


@dataclass
class DenseResult:
    vit: ViT
    heads: DenseHeads
    steps: int
    seconds: float
    last: dict[str, float]
    val: dict[str, float]


def pretrain_dense(
    vit_config: ViTConfig,
    train: DenseTargets,
    val: DenseTargets | None,
    *,
    minutes: float,
    processor: ProcessorConfig | None = None,
    max_steps: int = 100_000,
    batch_size: int = 64,
    lr: float = 2e-3,
    warmup_steps: int = 30,
    seed: int = 0,
    log: Callable[[dict[str, Any]], None] = lambda _row: None,
    log_every: int = 10,
    on_step: Callable[[int, float, float], None] | None = None,
) -> DenseResult:
    """Train a fresh ViT + dense heads for `minutes` or `max_steps`, whichever ends first
    (warmup, then a cosine to 5% of `lr` over that budget: `train.optim.lr_factor`).

    `processor`: the settings of the processor the tower will be used with (a model config's
    `processor`); the images are normalised with its mean/std (None: the default
    ProcessorConfig's, 0.5/0.5). `log` receives a metrics row (train every `log_every` steps,
    val at the end); `on_step(step, fraction_of_budget, loss)` drives a progress bar.
    """
    torch.manual_seed(seed)
    vit = ViT(vit_config)
    heads = DenseHeads(vit_config.width)
    params = list(vit.parameters()) + list(heads.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98),
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    n = train.pixels.shape[0]
    order = torch.randperm(n, generator=g)
    cursor, step, start = 0, 0, time.perf_counter()
    budget = 60 * minutes
    sums: dict[str, float] = {}
    last: dict[str, float] = {}
    vit.train()
    while step < max_steps:
        elapsed = time.perf_counter() - start
        progress = min(1.0, max(elapsed / budget, step / max_steps))
        if progress >= 1.0:
            break
        # recipes' schedule (train/optim.py), its progress the time or the steps used
        factor = lr_factor(step, progress, warmup_steps, MIN_LR_RATIO)
        for group in opt.param_groups:
            group["lr"] = lr * factor
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=g), 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        x, t = batch_of(train, index, processor)
        out = heads(vit(x, feature_layer=-1, pooled=False).features)
        loss, stats = dense_loss(out, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        for k, v in {"loss": float(loss.detach()), **stats}.items():
            if not math.isnan(v):
                sums[k] = sums.get(k, 0.0) + v
        if step % log_every == 0:
            last = {k: v / log_every for k, v in sums.items()}
            log({"step": step, "split": "train", **last, "lr": lr * factor,
                 "elapsed_s": round(time.perf_counter() - start, 2)})  # fmt: skip
            sums = {}
        if on_step is not None:
            on_step(step, min(1.0, (time.perf_counter() - start) / budget), float(loss.detach()))
    if sums and step % log_every:
        # The steps since the last log row: a short run (or a slow machine) still gets a row.
        n_tail = step % log_every
        last = {k: v / n_tail for k, v in sums.items()}
        log({"step": step, "split": "train", **last, "lr": lr * factor,
             "elapsed_s": round(time.perf_counter() - start, 2)})  # fmt: skip
    val_stats: dict[str, float] = {}
    if val is not None:
        val_stats = evaluate_dense(vit, heads, val, processor=processor)
        log({"step": step, "split": "val", **val_stats,
             "elapsed_s": round(time.perf_counter() - start, 2)})  # fmt: skip
    vit.eval()
    return DenseResult(vit, heads, step, time.perf_counter() - start, last, val_stats)


@torch.no_grad()
def evaluate_dense(
    vit: ViT, heads: DenseHeads, data: DenseTargets, batch_size: int = 128,
    processor: ProcessorConfig | None = None,
) -> dict:  # fmt: skip
    """Mean loss and accuracies over `data`, its images normalised with `processor`'s mean/std."""
    vit.eval()
    sums: dict[str, float] = {}
    batches = 0
    for i in range(0, data.pixels.shape[0], batch_size):
        index = torch.arange(i, min(i + batch_size, data.pixels.shape[0]))
        x, t = batch_of(data, index, processor)
        loss, stats = dense_loss(heads(vit(x, feature_layer=-1, pooled=False).features), t)
        for k, v in {"loss": float(loss), **stats}.items():
            if not math.isnan(v):
                sums[k] = sums.get(k, 0.0) + v
        batches += 1
    vit.train()
    return {k: v / batches for k, v in sums.items()}


__all__ = [
    "DenseHeads",
    "DenseResult",
    "DenseTargets",
    "batch_of",
    "dense_loss",
    "evaluate_dense",
    "load_dense_targets",
    "pretrain_dense",
    "record_targets",
]
