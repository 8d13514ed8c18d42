"""`visto data`: make the synthetic world, look at it, and export it to the common formats."""

from __future__ import annotations

import argparse
from pathlib import Path

from visto.commands._common import add_command

ORDER = 20

DESCRIPTION = """\
Make, inspect and export data.

  visto data synth   render the synthetic world: shapes, colours, sizes, words and numbers
                     with complete ground truth, and every task derived from it
  visto data show    a PNG contact sheet: boxes, masks and one question per image
  visto data export  write a split as LLaVA JSON, WebDataset shards, parquet or COCO

Examples:
  visto data synth --out runs/world --n 2000 --seed 0
  visto data show runs/world --split heldout --n 16
  visto data export runs/world --split train --format llava --out runs/world-llava --tasks vqa caption
"""

SYNTH_DESCRIPTION = """\
Render the synthetic visual world into DIR.

Each image holds 1-5 objects (7 shapes x 8 colours x 3 sizes, bounded overlap) and, on some
images, words or numbers in four fonts. Ground truth: every object's shape, colour, size,
pixel box and instance mask; every text with its box and font. Tasks derived from it:
captions, VQA (count, colour, shape, exist, relation, read, attribute), referring
expression <-> box, OCR, JSON, and a class label (single-object images make zero-shot
classification well posed). Splits train/val/test/heldout: 7 colour-shape pairs appear
only in heldout, each of whose images has at least one of them.

Same --seed and settings give the same bytes, whatever --workers.

Layout:
  DIR/world.json  DIR/images/<id>.png  DIR/masks/<id>.png  DIR/<split>.jsonl

Examples:
  visto data synth --out runs/world --n 2000
  visto data synth --out runs/world64 --n 10000 --size 64 --background plain
"""

SHOW_DESCRIPTION = """\
Write a PNG grid of images from a world: instance masks tinted, boxes numbered, text boxes
outlined in blue, and one question with its answer under each image (a different VQA type
per cell).

Examples:
  visto data show runs/world
  visto data show runs/world --split heldout --n 8 --out heldout.png
"""

EXPORT_DESCRIPTION = """\
Export one split of a synthetic world to a common format, so other tools can train on it.
One sample per (image, task item); --tasks picks which (default: all but count and chat).

Formats: llava (JSON + images), webdataset (tar shards), parquet, coco (captions only).

Examples:
  visto data export runs/world --split train --format llava --out runs/world-llava
  visto data export runs/world --split val --format webdataset --out shards --tasks vqa
"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(sub, "data", "make, inspect and export data", DESCRIPTION)
    data_sub = parser.add_subparsers(title="data commands", metavar="<data command>")

    p = add_command(data_sub, "synth", "render the synthetic world", SYNTH_DESCRIPTION)
    p.add_argument("--out", required=True, type=Path, help="world directory to write (replaced)")
    p.add_argument("--n", type=int, default=2000, help="images over all splits (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument(
        "--max-objects", type=int, default=5, help="objects per image, at most (default 5)"
    )
    p.add_argument(
        "--background",
        choices=("plain", "mixed"),
        default="mixed",
        help="plain light colours, or mixed with gradients, noise and textures (default)",
    )
    p.add_argument(
        "--workers", type=int, default=2, help="processes (default 2); bytes do not depend on it"
    )
    p.set_defaults(run=run_synth)

    p = add_command(data_sub, "show", "a PNG grid of a world's images", SHOW_DESCRIPTION)
    p.add_argument("dir", type=Path, help="world directory")
    p.add_argument("--split", default="train", help="train, val, test or heldout (default train)")
    p.add_argument("--n", type=int, default=16, help="images in the grid (default 16)")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default DIR/show.png)")
    p.set_defaults(run=run_show)

    p = add_command(data_sub, "export", "write a split in a common format", EXPORT_DESCRIPTION)
    p.add_argument("dir", type=Path, help="world directory")
    p.add_argument("--split", default="train", help="train, val, test or heldout (default train)")
    p.add_argument(
        "--format", required=True, choices=("llava", "webdataset", "parquet", "coco"), dest="fmt"
    )
    p.add_argument("--out", required=True, type=Path, help="directory to write")
    p.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help="caption vqa count ground refdesc ocr json classify chat",
    )
    p.add_argument("--seed", type=int, default=0, help="picks the questions of chat samples")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=run_export)

    parser.set_defaults(run=lambda args: parser.print_help())


def synth_with_progress(cfg, out: Path, workers: int) -> dict:
    """generate_world with a rich progress bar; returns world.json's content."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from visto.data.synth import generate_world

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(f"rendering {out}", total=cfg.n)
        return generate_world(
            cfg, out, workers=workers, on_progress=lambda k: progress.update(task, completed=k)
        )


def run_synth(args: argparse.Namespace) -> int:
    import time

    from visto.data.synth import WorldConfig
    from visto.errors import UserError

    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    cfg = WorldConfig(
        n=args.n,
        seed=args.seed,
        size=args.size,
        max_objects=args.max_objects,
        background=args.background,
    ).validate()
    start = time.perf_counter()
    meta = synth_with_progress(cfg, args.out, args.workers)
    seconds = time.perf_counter() - start
    counts = ", ".join(f"{s} {c}" for s, c in meta["counts"].items())
    print(
        f"wrote {cfg.n} images to {args.out} in {seconds:.1f} s ({cfg.n / seconds:.0f} images/s): {counts}"
    )
    print(f"held-out pairs: {', '.join(' '.join(p) for p in meta['heldout_pairs'])}")
    print(f"next: visto data show {args.out}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from visto.data.synth.show import show_world
    from visto.errors import UserError

    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    out = args.out or args.dir / "show.png"
    path = show_world(args.dir, out, split=args.split, n=args.n)
    print(f"wrote {path}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from visto.data.formats import write_samples
    from visto.data.synth import iter_samples, load_world

    world = load_world(args.dir)
    samples = iter_samples(args.dir, args.split, tasks=args.tasks, seed=args.seed)
    with Progress(transient=True) as progress:
        task = progress.add_task(f"exporting {args.split}", total=world["counts"].get(args.split))
        last = [None]

        def counted():
            for sample in samples:
                if sample.truth["image_id"] != last[0]:
                    last[0] = sample.truth["image_id"]
                    progress.advance(task)
                yield sample

        n = write_samples(counted(), args.out, args.fmt, overwrite=args.overwrite)
    print(f"wrote {n} samples of {args.dir} ({args.split}) as {args.fmt} to {args.out}")
    return 0
