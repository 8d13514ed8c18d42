"""Patch embedding vs conv stem for the quickstart's dense vision pretraining, same budget.

    .venv/bin/python bench/dense_stem.py --world runs/world --minutes 4.5 --threads 2

Trains the quickstart's ViT (128 px, 16 px patches, 4x128) with `visto.train.dense` once per
stem, for the same wall-clock minutes on the same images, and prints the validation per-patch
accuracies (shape, colour, box centre, characters) and the steps each stem got through. The stems
run one after the other, so each has the machine to itself; the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from visto.nn.vision import ViTConfig
from visto.train.dense import load_dense_targets, pretrain_dense

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("shape_acc", "colour_acc", "centre_acc", "char_acc", "loss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, default=Path("runs/world"))
    parser.add_argument("--minutes", type=float, default=4.5, help="per stem (quickstart: 4.5)")
    parser.add_argument("--images", type=int, default=4000, help="training images (quickstart: 4000)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stems", nargs="+", default=["patch", "conv"])
    parser.add_argument("--json", type=Path, default=Path("bench/out/dense_stem.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    grid = 128 // 16
    train = load_dense_targets(args.world, "train", grid, limit=args.images)
    val = load_dense_targets(args.world, "val", grid, limit=500)
    results = {}
    for stem in args.stems:
        config = ViTConfig(
            image_size=128, patch_size=16, width=128, layers=4, heads=4, mlp_hidden=512,
            image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), stem=stem,
        )  # fmt: skip
        result = pretrain_dense(config, train, val, minutes=args.minutes, batch_size=64, lr=2e-3)
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
