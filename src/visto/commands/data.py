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
  visto data inspect read any dataset once: what loads, what is skipped and why, lengths

Examples:
  visto data synth --out runs/world --n 2000 --seed 0
  visto data show runs/world --split heldout --n 16
  visto data inspect llava_v1_5_mix665k.json --image-root data/ --limit 10000
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

INSPECT_DESCRIPTION = """\
Read a dataset in any format once, streaming, and report what it holds: the format
detected, samples loaded, records skipped by reason (with the first few of each), tasks,
exchanges and images per sample, image sizes, and a histogram of sequence lengths against
max_length. Lengths are counted in a model's tokens (images included) with --processor,
else in words. Exits 1 when nothing loads.

Formats: llava (JSON / JSON lines), coco (captions JSON), webdataset (.tar shards), parquet,
synth (a world directory, its train split). Caption-only records (an image and a caption)
read as samples of the caption task.

Examples:
  visto data inspect train.parquet
  visto data inspect shards/ --show 12 --out runs/shards.png
  visto data inspect llava_v1_5_mix665k.json --image-root data/ --limit 10000
  visto data inspect captions_train2017.json --image-root coco/train2017 \\
      --processor runs/quickstart/checkpoint
  visto data inspect my.parquet --caption-key alt_text --image-key picture
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

    p = add_command(data_sub, "inspect", "report what a dataset holds", INSPECT_DESCRIPTION)
    p.add_argument("path", type=Path, help="a dataset file or folder, in any format")
    p.add_argument(
        "--format",
        dest="fmt",
        default=None,
        choices=("llava", "coco", "webdataset", "parquet", "synth"),
        help="the format (default: detected from the path)",
    )
    p.add_argument("--image-root", type=Path, help="where LLaVA JSON / COCO image paths point")
    p.add_argument(
        "--caption-key", help="the caption's field, column or .EXT (default: txt, caption, text)"
    )
    p.add_argument(
        "--image-key", help="the image's field, column or .EXT (default: image(s), png/jpg)"
    )
    p.add_argument(
        "--processor",
        metavar="DIR",
        type=Path,
        help="a checkpoint (or processor directory): count lengths in its tokens, images included",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="compare lengths with this (default: the processor's max_length)",
    )
    p.add_argument("--limit", type=int, default=None, help="read at most this many samples")
    p.add_argument("--show", type=int, default=0, metavar="N", help="draw the first N samples")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the PNG --show writes (default runs/inspect/<name>.png)",
    )
    p.set_defaults(run=run_inspect)

    parser.set_defaults(run=lambda args: parser.print_help())


def run_synth(args: argparse.Namespace) -> int:
    import time

    from visto.data.synth import WorldConfig
    from visto.data.synth.generate import generate_world_with_progress
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
    meta = generate_world_with_progress(cfg, args.out, args.workers)
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


def run_inspect(args: argparse.Namespace) -> int:
    import logging

    from visto.data.dataset_report import render_report, survey, write_sheet
    from visto.data.formats.stats import MISSING_IMAGE, log
    from visto.errors import UserError

    for flag in ("limit", "max_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.show < 0:
        raise UserError(f"--show must be 0 or more, got {args.show}")
    if not args.path.exists():
        raise UserError(f"{args.path} does not exist; give a dataset file or folder")
    processor = None
    if args.processor is not None:
        from visto.data.processor import Processor

        processor = Processor.load(args.processor)
    read_options = {
        name: value
        for name in ("image_root", "caption_key", "image_key")
        if (value := getattr(args, name)) is not None
    }
    level = log.level
    log.setLevel(logging.ERROR)  # the report lists the skipped records: no second copy as warnings
    try:
        report = survey(
            args.path,
            args.fmt,
            processor=processor,
            max_length=args.max_length,
            limit=args.limit,
            keep=args.show,
            **read_options,
        )
    finally:
        log.setLevel(level)
    print(render_report(report))
    images_elsewhere = report.format in ("llava", "coco") and args.image_root is None
    if report.stats.reasons.get(MISSING_IMAGE) and images_elsewhere:
        print("images not found: pass --image-root DIR, the folder the image paths start from")
    if not report.stats.read:
        print("nothing loaded: see the reasons above")
        return 1
    if args.show:
        out = args.out or Path("runs") / "inspect" / f"{args.path.name}.png"
        print(f"wrote {write_sheet(report, out)}")
    return 0
