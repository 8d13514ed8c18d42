"""Train the text reader (`visto.connectors.text_reader`) on a synthetic world's text boxes.

Two losses in one step, as the two parts never share weights:
  - find: per-cell binary cross-entropy against the cores of the world's text boxes;
  - read: CTC (Graves et al. 2006) on crops of the true boxes, jittered by a few pixels so
    the reader holds up against the finder's loose boxes.
The world's images are 128 px, as the processor feeds them to the vision tower, and
normalised as it normalises them (`ProcessorConfig.mean/std`, the `processor` arguments).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from visto.connectors.text_reader import (
    FIND_STRIDE,
    TextReader,
    crop_line,
    encode_text,
    text_core,
)
from visto.data.images import normalise_pixels
from visto.data.processor import ProcessorConfig


@dataclass
class ReaderData:
    images: torch.Tensor  # (N, 3, S, S) uint8
    lines: list[list[tuple[str, list[int]]]]  # per image: (text, pixel box) in reading order


@dataclass
class ReaderResult:
    reader: TextReader
    steps: int
    seconds: float
    val: dict[str, float]


def load_reader_data(world_dir: Path, split: str, size: int) -> ReaderData:
    """Images of a world split at `size` px and their texts with boxes scaled to match."""
    images, lines = [], []
    for row in map(json.loads, open(world_dir / f"{split}.jsonl")):  # noqa: SIM115
        truth = row["truth"]
        image = Image.open(world_dir / row["image"]).convert("RGB")
        scale = size / truth["width"]
        if image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        lines.append([(t["text"], [round(v * scale) for v in t["box"]]) for t in truth["texts"]])
    return ReaderData(torch.stack(images), lines)


def normalise(images: torch.Tensor, processor: ProcessorConfig | None = None) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> the pixel values `processor` makes (None: the default
    ProcessorConfig's mean/std, 0.5/0.5)."""
    p = processor or ProcessorConfig()
    return normalise_pixels(images, p.mean, p.std)


def text_mask(lines: list[list[tuple[str, list[int]]]], size: int) -> torch.Tensor:
    """The cells of the find grid whose centre lies in a line's core (`text_core`):
    (B, S / FIND_STRIDE, S / FIND_STRIDE)."""
    grid = size // FIND_STRIDE
    centres = (torch.arange(grid) + 0.5) * FIND_STRIDE
    mask = torch.zeros(len(lines), grid, grid)
    for i, image_lines in enumerate(lines):
        for _, box in image_lines:
            x1, y1, x2, y2 = text_core(box)
            rows = (centres >= y1) & (centres <= y2)
            cols = (centres >= x1) & (centres <= x2)
            mask[i] = torch.maximum(mask[i], (rows[:, None] & cols[None, :]).float())
    return mask


def jitter(box: list[int], rng: random.Random, size: int) -> list[int]:
    """The box moved out by up to 3 px on each side, as the finder's boxes come (cells + PAD)."""
    x1, y1, x2, y2 = box
    return [max(0, x1 - rng.randint(0, 3)), max(0, y1 - rng.randint(0, 3)),
            min(size, x2 + rng.randint(0, 3)), min(size, y2 + rng.randint(0, 3))]  # fmt: skip


def reader_loss(
    reader: TextReader, pixels: torch.Tensor, lines, rng: random.Random
) -> torch.Tensor:
    size = pixels.shape[-1]
    mask = text_mask(lines, size)
    find = F.binary_cross_entropy_with_logits(
        reader.text_logits(pixels), mask, pos_weight=torch.tensor(3.0)
    )
    crops, targets = [], []
    for i, image_lines in enumerate(lines):
        for text, box in image_lines:
            crops.append(crop_line(pixels[i], jitter(box, rng, size)))
            targets.append(encode_text(text))
    if not crops:
        return find
    logits = reader.read_logits(torch.stack(crops))  # (L, T, C)
    log_probs = logits.log_softmax(-1).transpose(0, 1)  # (T, L, C) as ctc_loss wants
    read = F.ctc_loss(
        log_probs, torch.tensor([k for t in targets for k in t]),
        torch.full((len(targets),), log_probs.shape[0], dtype=torch.long),
        torch.tensor([len(t) for t in targets]), zero_infinity=True,
    )  # fmt: skip
    return find + read


def evaluate_reader(
    reader: TextReader, data: ReaderData, batch_size: int = 64,
    processor: ProcessorConfig | None = None,
) -> dict[str, float]:  # fmt: skip
    """The reader as the connector runs it (eval mode) on every image of `data`, normalised
    as `processor` normalises (`normalise`):

    exact         the whole reading equal to the OCR answer (texts in reading order, joined
                  by spaces), over the images that hold text
    miss_lines    another number of lines than the truth's (lines merged, split or missed)
    miss_order    every text read, in another order
    miss_misread  the lines right, some text wrong
    empty_right   images without text that read nothing
    """
    counts = dict.fromkeys(("with_text", "exact", "lines", "order", "misread", "without", "empty"), 0)
    was_training = reader.training
    reader.eval()
    for start in range(0, len(data.lines), batch_size):
        found = reader(normalise(data.images[start : start + batch_size], processor))
        for got, want in zip(found, data.lines[start : start + batch_size], strict=True):
            got_texts, want_texts = [t for t, _ in got], [t for t, _ in want]
            if not want:
                counts["without"] += 1
                counts["empty"] += not got
                continue
            counts["with_text"] += 1
            if got_texts == want_texts:
                counts["exact"] += 1
            elif len(got_texts) != len(want_texts):
                counts["lines"] += 1
            elif sorted(got_texts) == sorted(want_texts):
                counts["order"] += 1
            else:
                counts["misread"] += 1
    reader.train(was_training)
    n, m = max(1, counts["with_text"]), max(1, counts["without"])
    return {
        "exact": counts["exact"] / n, "miss_lines": counts["lines"] / n,
        "miss_order": counts["order"] / n, "miss_misread": counts["misread"] / n,
        "empty_right": counts["empty"] / m, "images_with_text": counts["with_text"],
    }  # fmt: skip


def train_reader(
    train: ReaderData,
    val: ReaderData | None,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    processor: ProcessorConfig | None = None,
) -> ReaderResult:
    """AdamW with a cosine decay over `steps` steps of `batch_size` images, normalised as the
    model's `processor` normalises them (None: the default ProcessorConfig's mean/std)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    reader = TextReader()
    optimizer = torch.optim.AdamW(reader.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=0.05
    )
    t0 = time.perf_counter()
    order: list[int] = []
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += rng.sample(range(len(train.lines)), len(train.lines))
        batch, order = order[:batch_size], order[batch_size:]
        loss = reader_loss(
            reader, normalise(train.images[batch], processor), [train.lines[i] for i in batch], rng
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reader.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step, loss.item())
    seconds = time.perf_counter() - t0
    reader.eval()
    return ReaderResult(
        reader, steps, seconds,
        evaluate_reader(reader, val, processor=processor) if val is not None else {},
    )


__all__ = ["ReaderData", "ReaderResult", "evaluate_reader", "load_reader_data", "train_reader"]
