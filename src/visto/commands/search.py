"""`visto search`: text -> image or image -> image search over an index."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from visto.commands._common import add_command
from visto.errors import UserError

ORDER = 61

DESCRIPTION = """\
Search an index built by `visto index build`: the images closest (cosine similarity) to a
text query, or to a query image with --image. Prints a ranked table: rank, score, path and
a short summary of the image's metadata (caption, objects, split).

The index remembers which model built it, so --model is needed only when the checkpoint
has moved; a different model is refused (its vectors would not be comparable).

Examples:
  visto search --db runs/index "a red circle left of a blue square"
  visto search --db runs/index "two green stars" -k 10 --json
  visto search --db runs/index --image query.png -k 5
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "search", "find images by text or by example image", DESCRIPTION)
    p.add_argument("query", nargs="?", help="text query (omit when using --image)")
    p.add_argument("--db", required=True, type=Path, help="index directory")
    p.add_argument("--image", type=Path, help="query image file: image -> image search")
    p.add_argument("-k", type=int, default=5, help="number of results (default 5)")
    p.add_argument("--model", help="checkpoint to embed the query (default: the index's own)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(run=run_search)


def _query_embedder(store, model: str | None):
    from visto.index import load_embedder

    spec = model or store.model_source
    if not spec:
        raise UserError(f"the index at {store.path} does not record its model; pass --model CKPT")
    try:
        embedder = load_embedder(spec)
    except UserError as e:
        if model is None:
            raise UserError(
                f"cannot load the model this index was built with ({spec}): {e}. "
                "If the checkpoint moved, pass --model with its new location"
            ) from None
        raise
    if embedder.name != store.model:
        raise UserError(
            f"--model {spec} is {embedder.name!r}, but the index at {store.path} was built "
            f"with {store.model!r}: their vectors are not comparable; use that model, or "
            "rebuild the index with this one"
        )
    return embedder


def run_search(args: argparse.Namespace) -> int:
    from visto.data.images import open_image
    from visto.index import VectorStore
    from visto.index.sources import metadata_summary

    if (args.query is None) == (args.image is None):
        raise UserError('give either a text query ("a red circle") or --image FILE, not both')
    if args.query is not None and not args.query.strip():
        raise UserError("the text query is empty")
    if args.k < 1:
        raise UserError(f"-k must be at least 1, got {args.k}")
    store = VectorStore(args.db)
    if store.count() == 0:
        raise UserError(f"the index at {args.db} is empty: add images with `visto index build`")
    embedder = _query_embedder(store, args.model)
    if args.image is not None:
        vector = embedder.embed_images([open_image(args.image)])[0]  # (dim,)
    else:
        vector = embedder.embed_texts([args.query])[0]  # (dim,)
    hits = store.search(vector, k=args.k, model=embedder.name)

    if args.json:
        results = [
            {"rank": r, "score": round(h.score, 6), "path": h.path, "metadata": h.metadata}
            for r, h in enumerate(hits, 1)
        ]
        query = {"text": args.query} if args.query is not None else {"image": str(args.image)}
        print(json.dumps({"query": query, "db": str(args.db), "results": results}, indent=2))
        return 0

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    title = f'"{args.query}"' if args.query is not None else f"like {args.image}"
    table = Table(title=f"{title} in {args.db} ({store.count():,} images)")
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("path", overflow="fold")
    table.add_column("about")
    for rank, hit in enumerate(hits, 1):
        table.add_row(
            str(rank), f"{hit.score:.3f}", Text(hit.path), Text(metadata_summary(hit.metadata))
        )
    Console().print(table)
    return 0
