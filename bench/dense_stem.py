"""Patch embedding vs conv stem for the quickstart's dense vision pretraining, same budget.

    .venv/bin/python bench/dense_stem.py --world runs/world --minutes 4.5 --threads 2

Trains the quickstart's ViT (its `llava_config` tower, batch and lr; only the stem differs)
with `visto.train.dense` once per stem, for the same wall-clock minutes on the same images,
and prints the validation per-patch accuracies (shape, colour, box centre, characters) and the
steps each stem got through. The stems run one after the other, so each has the machine to
itself; the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from visto.nn.vision import STEMS
from visto.quickstart import QuickstartConfig, llava_config
from visto.train.dense import load_dense_targets, pretrain_dense

KEYS = ("shape_acc", "colour_acc", "centre_acc", "char_acc", "loss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, default=Path("runs/world"), help="a 128-px world")
    parser.add_argument("--minutes", type=float, default=4.5, help="per stem (quickstart: 4.5)")
    parser.add_argument("--images", type=int, default=4000, help="training images (quickstart: 4000)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stems", nargs="+", default=list(STEMS), choices=STEMS)
    parser.add_argument("--json", type=Path, default=Path("bench/out/dense_stem.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = QuickstartConfig()
    grid = base.size // base.patch_size
    train = load_dense_targets(args.world, "train", grid, limit=args.images)
    val = load_dense_targets(args.world, "val", grid, limit=500)
    results = {}
    for stem in args.stems:
        cfg = QuickstartConfig(vision_stem=stem).validate()
        vision = llava_config(cfg, cfg.vocab_size).vision
        result = pretrain_dense(vision, train, val, minutes=args.minutes,
                                batch_size=cfg.vision_batch, lr=cfg.vision_lr)  # fmt: skip
        results[stem] = {"steps": result.steps, **{k: round(result.val.get(k, float("nan")), 4) for k in KEYS}}
        print(stem, results[stem], "load", [round(x, 2) for x in os.getloadavg()], flush=True)

    print(f"\n{'stem':<8}{'steps':>7}" + "".join(f"{k:>12}" for k in KEYS))
    for stem, row in results.items():
        print(f"{stem:<8}{row['steps']:>7}" + "".join(f"{row[k]:>12.3f}" for k in KEYS))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": " ".join(sys.argv), "minutes": args.minutes,
                                     "threads": args.threads, "results": results}, indent=2))


if __name__ == "__main__":
    main()
