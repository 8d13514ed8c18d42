"""VectorStore on real random unit vectors: round trip, idempotence, identity checks, ANN."""

from __future__ import annotations

import json

import numpy as np
import pytest

from visto.errors import UserError
from visto.index import IndexSettings, Row, VectorStore

DIM = 32


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows_for(vectors: np.ndarray, prefix: str = "img") -> list[Row]:
    return [
        Row(id=f"{prefix}{i}", path=f"/data/{prefix}{i}.png", vector=v, metadata={"i": i})
        for i, v in enumerate(vectors)
    ]


def test_round_trip_finds_the_nearest_neighbour(tmp_path):
    vectors = unit_vectors(200)
    store = VectorStore(tmp_path / "db", model="test-model", dim=DIM)
    assert store.add(rows_for(vectors)) == 200
    assert store.count() == 200
    # A query near row 17 (a small perturbation) must return row 17 first.
    query = vectors[17] + 0.05 * unit_vectors(1, seed=1)[0]
    hits = store.search(query, k=5)
    assert [h.path for h in hits][0] == "/data/img17.png"
    assert hits[0].metadata == {"i": 17}
    exact = vectors @ (query / np.linalg.norm(query))
    assert [h.id for h in hits] == [f"img{i}" for i in np.argsort(-exact)[:5]]
    assert hits[0].score == pytest.approx(float(exact.max()), abs=1e-5)
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))


def test_reopen_and_reindex_is_idempotent(tmp_path):
    vectors = unit_vectors(100)
    VectorStore(tmp_path / "db", model="m", dim=DIM).add(rows_for(vectors))
    store = VectorStore(tmp_path / "db", model="m", dim=DIM)  # reopened from disk
    assert store.count() == 100
    # The same rows again (updated metadata), plus 10 new ones: no duplicates.
    again = rows_for(vectors)
    again[0] = Row(id="img0", path="/data/img0.png", vector=vectors[0], metadata={"i": "new"})
    inserted = store.add(again + rows_for(unit_vectors(10, seed=5), prefix="extra"))
    assert inserted == 10
    assert store.count() == 110
    ids = store.all_ids()
    assert len(ids) == len(set(ids)) == 110
    assert store.search(vectors[0], k=1)[0].metadata == {"i": "new"}
    assert store.existing_ids(["img3", "nope", "extra9"]) == {"img3", "extra9"}


def test_wrong_dim_and_wrong_model_are_refused(tmp_path):
    store = VectorStore(tmp_path / "db", model="clip-a", dim=DIM)
    store.add(rows_for(unit_vectors(5)))
    with pytest.raises(UserError, match="32-d vectors.*16-d"):
        store.search(unit_vectors(1, dim=16)[0], k=1)
    with pytest.raises(UserError, match="built with model 'clip-a'"):
        store.search(unit_vectors(1)[0], k=1, model="clip-b")
    with pytest.raises(UserError, match="built with model 'clip-a'"):
        VectorStore(tmp_path / "db", model="clip-b", dim=DIM)
    reopened = VectorStore(tmp_path / "db")  # no model given: read it from the index
    assert (reopened.model, reopened.dim) == ("clip-a", DIM)


def test_empty_and_missing_index_messages(tmp_path):
    with pytest.raises(UserError, match="no index at"):
        VectorStore(tmp_path / "missing")
    store = VectorStore(tmp_path / "db", model="m", dim=DIM)
    with pytest.raises(UserError, match="is empty"):
        store.search(unit_vectors(1)[0], k=3)


def test_ann_index_is_built_past_the_threshold_and_stays_accurate(tmp_path):
    # A tiny threshold so that the ANN path runs in a unit test.
    settings = IndexSettings(min_rows_for_index=1000)
    vectors = unit_vectors(2000, seed=2)
    store = VectorStore(tmp_path / "db", model="m", dim=DIM, settings=settings)
    store.add(rows_for(vectors[:500]))
    assert not store.has_ann_index()  # small: flat search
    for start in range(500, 2000, 500):
        store.add(rows_for(vectors)[start : start + 500])
    store.optimize()
    assert store.has_ann_index()
    # Trained at 1000 rows, retrained once the table doubled (new partitions for new data).
    assert json.loads((tmp_path / "db" / "ann_index.json").read_text())["trained_rows"] == 2000
    assert store.count() == 2000
    queries = unit_vectors(20, seed=3)
    recall = []
    for q in queries:
        exact = set(f"img{i}" for i in np.argsort(-(vectors @ q))[:10])
        recall.append(len(exact & {h.id for h in store.search(q, k=10)}) / 10)
    assert np.mean(recall) >= 0.9
