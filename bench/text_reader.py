"""The object-token connector's OCR reader (visto.connectors.text_reader) on a world's test split.

Trains the reader as the quickstart's vision stage does (or reads it from a checkpoint that
holds one), then reads every test image that has text and sorts the misses:

    exact        the whole reading equal to the OCR answer (texts in reading order, spaces)
    lines        the number of lines found equal to the truth's (a miss here: lines merged,
                 split, or not found)
    order        every text read but in another order
    misread      lines right, some text wrong
    empty_right  images without text that read nothing

    python bench/text_reader.py --world runs/quickstart/world --steps 1000 --json F
    python bench/text_reader.py --world runs/quickstart/world --model runs/quickstart/vision/checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def reader_from_checkpoint(path: str):
    from visto.checkpoint import load

    projector = getattr(load(path), "multi_modal_projector", None)
    reader = getattr(projector, "reader", None)
    if reader is None:
        raise SystemExit(f"{path} has no OCR reader (a regions connector with text_slots)")
    return reader


def sort_misses(reader, data) -> dict[str, float]:
    from visto.train.reader import normalise

    counts = dict.fromkeys(("with_text", "exact", "lines", "order", "misread", "without_text", "empty_right"), 0)
    for start in range(0, len(data.lines), 64):
        found = reader(normalise(data.images[start : start + 64]))
        for got, want in zip(found, data.lines[start : start + 64], strict=True):
            got_texts, want_texts = [t for t, _ in got], [t for t, _ in want]
            if not want:
                counts["without_text"] += 1
                counts["empty_right"] += not got
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
    n, m = max(1, counts["with_text"]), max(1, counts["without_text"])
    return {
        "images_with_text": counts["with_text"],
        "exact": counts["exact"] / n,
        "miss_lines": counts["lines"] / n,
        "miss_order": counts["order"] / n,
        "miss_misread": counts["misread"] / n,
        "empty_right": counts["empty_right"] / m,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=Path, required=True, help="a synthetic world (visto data make / quickstart)")
    p.add_argument("--model", help="read with the reader of this checkpoint instead of training one")
    p.add_argument("--steps", type=int, default=1000, help="training steps at batch 16 (default 1000)")
    p.add_argument("--split", default="test")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from visto.train.reader import load_reader_data, train_reader

    size = json.loads((args.world / "world.json").read_text())["config"]["size"]
    test = load_reader_data(args.world, args.split, size)
    t0 = time.perf_counter()
    if args.model:
        reader, how = reader_from_checkpoint(args.model).eval(), f"reader of {args.model}"
        seconds = None
    else:
        result = train_reader(load_reader_data(args.world, "train", size), None, args.steps, batch_size=16)
        reader, how, seconds = result.reader, f"trained {args.steps} steps at batch 16", result.seconds
    figures = sort_misses(reader, test)
    out = {
        "how": how, "world": str(args.world), "split": args.split, **figures,
        "train_seconds": seconds, "threads": args.threads, "load": os.getloadavg(),
        "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
