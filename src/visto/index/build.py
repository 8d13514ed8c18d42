"""Fill a VectorStore from items: decode, embed and commit one batch at a time.

Each batch is one commit, so a build killed mid-way keeps every finished batch; running it
again skips the items already stored (their keys are known before any pixel is decoded)
and merges the rest, so it completes the index without duplicates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from visto.data.images import BadImage
from visto.index.embedder import Embedder
from visto.index.sources import Item
from visto.index.store import Row, VectorStore


@dataclass
class BuildReport:
    seen: int = 0  # items read from the source
    added: int = 0  # rows newly inserted
    already_indexed: int = 0  # skipped: the same path and bytes were stored before
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) not indexed
    seconds: float = 0.0


def build_index(
    store: VectorStore,
    items: Iterable[Item | tuple[str, str]],
    embedder: Embedder,
    batch_size: int = 256,
    on_progress: Callable[[int], None] | None = None,
) -> BuildReport:
    """Embed and store `items` (an (path, reason) tuple is a file that could not be read)."""
    assert batch_size >= 1
    assert embedder.dim == store.dim and embedder.name == store.model, "store/embedder mismatch"
    report = BuildReport()
    start = time.perf_counter()
    batch: list[Item] = []

    def flush() -> None:
        stored = store.existing_ids([it.key for it in batch])
        todo = {it.key: it for it in batch if it.key not in stored}  # dedupe within the batch
        report.already_indexed += len(batch) - len(todo)
        images, kept = [], []
        for it in todo.values():
            try:
                images.append(it.decode())
                kept.append(it)
            except BadImage as e:
                report.bad.append((it.path, str(e)))
        if kept:
            vectors = embedder.embed_images(images)  # (N, dim)
            assert vectors.shape == (len(kept), store.dim), vectors.shape
            rows = [
                Row(it.key, it.path, v, it.metadata) for it, v in zip(kept, vectors, strict=True)
            ]
            report.added += store.add(rows)
        if on_progress is not None:
            on_progress(len(batch))
        batch.clear()

    for item in items:
        report.seen += 1
        if isinstance(item, tuple):
            report.bad.append(item)
            if on_progress is not None:
                on_progress(1)
            continue
        batch.append(item)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    store.optimize()  # compact the per-batch files; train the ANN index if large enough
    report.seconds = time.perf_counter() - start
    return report
