"""The object-token connector's OCR reader (visto.connectors.text_reader) on a world's test split.

Trains the reader as the quickstart's vision stage does (or reads it from a checkpoint that
holds one), then reads every test image and sorts the misses (`visto.train.reader.
evaluate_reader`: exact, miss_lines, miss_order, miss_misread, empty_right).

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
    from visto.train.reader import evaluate_reader, load_reader_data, train_reader

    size = json.loads((args.world / "world.json").read_text())["config"]["size"]
    test = load_reader_data(args.world, args.split, size)
    t0 = time.perf_counter()
    if args.model:
        reader, how = reader_from_checkpoint(args.model), f"reader of {args.model}"
        seconds = None
    else:
        result = train_reader(load_reader_data(args.world, "train", size), None, args.steps, batch_size=16)
        reader, how, seconds = result.reader, f"trained {args.steps} steps at batch 16", result.seconds
    figures = evaluate_reader(reader, test)  # in eval mode, as the connector runs it
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
