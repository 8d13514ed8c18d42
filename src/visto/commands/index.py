"""`visto index`: build and inspect a vector index of images for `visto search`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from visto.commands._common import add_command
from visto.errors import UserError

ORDER = 60

DESCRIPTION = """\
Build and inspect a vector index of images (an embedded LanceDB table on disk).

  visto index build   embed images with a model and store the vectors plus metadata
  visto index info    what an index holds: model, dimension, rows, ANN index or flat

Examples:
  visto index build --model runs/clip/checkpoint --data runs/world --split test --db runs/index
  visto index info runs/index
  visto search --db runs/index "a red circle left of a blue square"
"""

BUILD_DESCRIPTION = """\
Embed images in batches with a CLIP-family checkpoint and store one vector per image, with
its path and metadata (for --data: split, caption, objects, label), in the index at --db.

Re-running is safe and cheap: images are keyed on path + content, so those already stored
are skipped and nothing is duplicated; a build that was interrupted (Ctrl-C, a crash) keeps
every finished batch and the next run completes it. Files that cannot be decoded are skipped
and listed. Past 10,000 rows an approximate (IVF) index is trained so that search stays
fast; below, search is exact.

--model pixels uses an 8x8 colour thumbnail instead of a model: image-to-image search for
near duplicates, no text queries.

Examples:
  visto index build --model runs/clip/checkpoint --images photos/ --db runs/photos-index
  visto index build --model runs/clip/checkpoint --data runs/world --split test --db runs/index
  visto index build --model pixels --images photos/ --db runs/dupes --batch 512
"""

INFO_DESCRIPTION = """\
Print what an index holds: the model it was built with, the vector dimension, the number of
rows and whether an ANN index is in use.

Examples:
  visto index info runs/index
  visto index info runs/index --json
"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(sub, "index", "build and inspect a vector index of images", DESCRIPTION)
    index_sub = parser.add_subparsers(title="index commands", metavar="<index command>")

    p = add_command(
        index_sub, "build", "embed images and store them in an index", BUILD_DESCRIPTION
    )
    p.add_argument("--model", required=True, help="checkpoint directory (CLIP family), or 'pixels'")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="a folder of images (searched recursively)")
    source.add_argument("--data", type=Path, help="a synthetic world (visto data synth --out)")
    p.add_argument("--split", default="test", help="split of --data to index (default test)")
    p.add_argument("--db", required=True, type=Path, help="index directory (created if missing)")
    p.add_argument("--batch", type=int, default=256, help="images per batch and commit (256)")
    p.set_defaults(run=run_build)

    p = add_command(index_sub, "info", "what an index holds", INFO_DESCRIPTION)
    p.add_argument("db", type=Path, help="index directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_info)

    parser.set_defaults(run=lambda args: parser.print_help())


def _items_and_total(args: argparse.Namespace):
    from visto.index import sources

    if args.images is not None:
        return sources.folder_items(args.images), len(sources.image_files(args.images))
    from visto.data.synth.reader import iter_records

    total = sum(1 for _ in iter_records(args.data, args.split))
    return sources.world_items(args.data, args.split), total


def run_build(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from visto.index import VectorStore, load_embedder
    from visto.index.build import build_index

    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    console = Console(stderr=True, soft_wrap=True)  # paths stay whole, copyable
    items, total = _items_and_total(args)  # checks the source before loading a model
    embedder = load_embedder(args.model)
    source = str(Path(args.model).resolve()) if Path(args.model).is_dir() else embedder.name
    store = VectorStore(args.db, model=embedder.name, dim=embedder.dim, model_source=source)
    before = store.count()
    console.print(
        f"indexing {total:,} images with [bold]{embedder.name}[/] ({embedder.dim}-d) "
        f"into {args.db} ({before:,} rows already), batches of {args.batch}"
    )
    columns = (*Progress.get_default_columns()[:2], BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("embedding", total=total)
        report = build_index(
            store, items, embedder, args.batch, lambda n: progress.advance(task, n)
        )
    if store.count() == 0:
        raise UserError(
            f"none of the {report.seen:,} files could be read as an image, so the index is "
            "empty; check the folder (the first problems: "
            + "; ".join(f"{p}: {r}" for p, r in report.bad[:3])
            + ")"
        )
    for path, reason in report.bad[:20]:
        console.print(f"[yellow]skipped[/] {path}: {reason}")
    if len(report.bad) > 20:
        console.print(f"[yellow]... and {len(report.bad) - 20} more unreadable files[/]")
    console.print(
        f"added {report.added:,}, already indexed {report.already_indexed:,}, "
        f"unreadable {len(report.bad):,}; the index now holds {store.count():,} rows "
        f"({'ANN index' if store.has_ann_index() else 'exact search'}) "
        f"in {report.seconds:.1f} s"
    )
    console.print(f'next: visto search --db {args.db} "a red circle" -k 5')
    return 0


def run_info(args: argparse.Namespace) -> int:
    from visto.index import VectorStore

    info = VectorStore(args.db).info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>12}: {value}")
    return 0
