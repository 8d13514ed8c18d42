"""Retrieval: an embedded, persistent vector store (LanceDB) and the pipeline that fills it.

    store = VectorStore("runs/index", model=embedder.name, dim=embedder.dim)
    store.add([Row(id, path, vector, metadata), ...])     # idempotent on id, one commit
    store.search(embedder.embed_texts(["a red circle"])[0], k=5) -> [Hit(path, score, metadata)]

`visto index build` and `visto search` are the command-line faces of this package.
"""

from visto.index.embedder import Embedder, ModelEmbedder, PixelEmbedder, load_embedder
from visto.index.store import Hit, IndexSettings, Row, VectorStore

__all__ = [
    "Embedder",
    "Hit",
    "IndexSettings",
    "ModelEmbedder",
    "PixelEmbedder",
    "Row",
    "VectorStore",
    "load_embedder",
]
