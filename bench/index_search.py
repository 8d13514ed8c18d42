"""Vector search speed and recall of visto's VectorStore against exact (numpy) search.

    .venv/bin/python bench/index_search.py                       # 100k x 256-d, both datasets
    .venv/bin/python bench/index_search.py --n 20000 --queries 100 --sweep

Two datasets of L2-normalized vectors, reported separately:
  clustered  a mixture of Gaussians on the sphere (like real embeddings: images of the same
             kind sit together); each point has cosine ~0.7 to its cluster centre
  uniform    uniform on the sphere: no structure at all, the worst case for any ANN index

For each: ingest through `VectorStore.add` (merge_insert commits), build the ANN index with
the store's own settings (timed), then run the queries through `VectorStore.search` and
report median / p95 latency and recall@10 against numpy brute force on the same vectors.
`--sweep` also tries other search parameters on the built index. Figures go to stdout and
to bench/out/index_search.json, with `uptime` (these machines are shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from visto.index import IndexSettings, Row, VectorStore
from visto.utils.io import atomic_write_json


def normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(kind: str, n: int, n_queries: int, dim: int, clusters: int, seed: int):
    """(base (n, dim), queries (q, dim)); queries are fresh draws from the same distribution."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return normalize(rng.normal(size=(n, dim))), normalize(rng.normal(size=(n_queries, dim)))
    centres = normalize(rng.normal(size=(clusters, dim)))

    def draw(m: int) -> np.ndarray:
        # noise of norm ~1 around a unit centre: cosine to the centre ~ 1/sqrt(2) ~ 0.7
        noise = rng.normal(size=(m, dim)) / np.sqrt(dim)
        return normalize(centres[rng.integers(0, clusters, m)] + noise)

    return draw(n), draw(n_queries)


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Brute-force top-k ids per query and the median seconds per query."""
    out, times = [], []
    for q in queries:
        start = time.perf_counter()
        scores = base @ q  # (n,)
        top = np.argpartition(-scores, k)[:k]
        out.append(top[np.argsort(-scores[top])])
        times.append(time.perf_counter() - start)
    return np.stack(out), float(np.median(times))


def timed_queries(
    store: VectorStore, queries: np.ndarray, k: int
) -> tuple[list[list[int]], list[float], float]:
    """Ids found, wall seconds per query, and median CPU seconds per query (all threads):
    on a shared machine the wall time swells with the load, the CPU time much less."""
    ids, times, cpu = [], [], []
    for q in queries:
        start, start_cpu = time.perf_counter(), time.process_time()
        hits = store.search(q, k=k)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        ids.append([int(h.id) for h in hits])
    return ids, times, float(np.median(cpu))


def recall_at_k(found: list[list[int]], truth: np.ndarray, k: int) -> float:
    return float(
        np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth, strict=True)])
    )


def summary(times: list[float]) -> dict[str, float]:
    ms = np.asarray(times) * 1000
    return {
        "median_ms": round(float(np.median(ms)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
    }


def run_dataset(kind: str, args: argparse.Namespace, settings: IndexSettings, root: Path) -> dict:
    base, queries = make_data(kind, args.n, args.queries, args.dim, args.clusters, args.seed)
    truth, numpy_s = exact_top_k(base, queries, args.k)
    db = root / kind
    # Ingest with the index threshold out of reach, so the index build is timed on its own.
    ingest = dataclasses.replace(settings, min_rows_for_index=args.n + 1)
    store = VectorStore(db, model="bench", dim=args.dim, settings=ingest)
    start = time.perf_counter()
    for lo in range(0, args.n, args.ingest_batch):
        hi = min(lo + args.ingest_batch, args.n)
        store.add([Row(str(i), f"v{i}", base[i]) for i in range(lo, hi)])
    store.optimize()  # compaction only (below the threshold)
    ingest_s = time.perf_counter() - start

    flat_ids, flat_times, flat_cpu = timed_queries(store, queries[: args.flat_queries], args.k)
    # (--n below the store's threshold: index anyway, this benchmark is about the index)
    settings = dataclasses.replace(
        settings, min_rows_for_index=min(settings.min_rows_for_index, args.n)
    )
    store = VectorStore(db, settings=settings)
    start = time.perf_counter()
    store.optimize()  # trains the ANN index: n >= min_rows_for_index
    build_s = time.perf_counter() - start
    assert store.has_ann_index(), "the store did not build an ANN index"
    ids, times, cpu = timed_queries(store, queries, args.k)
    result = {
        "dataset": kind,
        "rows": store.count(),
        "ingest_s": round(ingest_s, 1),
        "index_build_s": round(build_s, 1),
        **summary(times),
        "cpu_median_ms": round(cpu * 1000, 2),
        f"recall@{args.k}": round(recall_at_k(ids, truth, args.k), 4),
        "flat": {
            **summary(flat_times),
            "cpu_median_ms": round(flat_cpu * 1000, 2),
            f"recall@{args.k}": recall_at_k(flat_ids, truth[: len(flat_ids)], args.k),
        },
        "numpy_bruteforce_median_ms": round(numpy_s * 1000, 2),
    }
    if kind == "clustered":
        cos = float(np.median(np.max(queries @ make_centres(args).T, axis=1)))
        result["median_cosine_to_cluster_centre"] = round(cos, 3)
    if args.sweep:
        result["sweep"] = []
        hnsw = "HNSW" in settings.index_type
        for nprobes in (5, 10, 20, 40, 80, 160):
            for ef, refine in [(100, 1), (100, 5), (200, 5)] if hnsw else [(None, None)]:
                s = dataclasses.replace(settings, nprobes=nprobes, ef=ef, refine_factor=refine)
                ids, times, cpu = timed_queries(VectorStore(db, settings=s), queries, args.k)
                row = {"nprobes": nprobes, "ef": ef, "refine_factor": refine, **summary(times),
                       "cpu_median_ms": round(cpu * 1000, 2),
                       f"recall@{args.k}": round(recall_at_k(ids, truth, args.k), 4)}  # fmt: skip
                print("   sweep", kind, row, flush=True)
                result["sweep"].append(row)
    return result


def make_centres(args: argparse.Namespace) -> np.ndarray:
    # The same first draw as make_data's, from the same seed.
    return normalize(np.random.default_rng(args.seed).normal(size=(args.clusters, args.dim)))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--flat-queries", type=int, default=20, help="queries timed before the index")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ingest-batch", type=int, default=4096)
    p.add_argument("--datasets", nargs="+", default=["clustered", "uniform"])
    p.add_argument("--index-type", default=IndexSettings.index_type)
    p.add_argument("--nprobes", type=int, default=IndexSettings.nprobes)
    p.add_argument("--ef", type=int, default=IndexSettings.ef)
    p.add_argument("--refine-factor", type=int, default=IndexSettings.refine_factor)
    p.add_argument("--sweep", action="store_true", help="also try other search parameters")
    p.add_argument("--out", type=Path, default=Path("bench/out/index_search.json"))
    args = p.parse_args()

    settings = IndexSettings(
        index_type=args.index_type,
        nprobes=args.nprobes,
        ef=args.ef,
        refine_factor=args.refine_factor,
    )
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"{args.n:,} x {args.dim}-d, {args.queries} queries, k={args.k}; {settings}")
    print(f"machine: {os.cpu_count()} CPUs; {uptime_before}", flush=True)
    results = []
    root = Path(tempfile.mkdtemp(prefix="visto-bench-index-"))
    try:
        for kind in args.datasets:
            r = run_dataset(kind, args, settings, root)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "sweep"}), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    report = {
        "n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k, "seed": args.seed,
        "settings": dataclasses.asdict(settings), "cpus": os.cpu_count(),
        "uptime_before": uptime_before, "uptime_after": uptime_after, "results": results,
        "targets": {"median_ms": 20, f"recall@{args.k}": 0.95},
    }  # fmt: skip
    recall = f"recall@{args.k}"
    print(
        f"\n{'dataset':<10} {'build s':>8} {'median ms':>10} {'p95 ms':>8} {'cpu ms':>7} {recall:>10}"
    )
    for r in results:
        print(f"{r['dataset']:<10} {r['index_build_s']:>8} {r['median_ms']:>10} {r['p95_ms']:>8} "
              f"{r['cpu_median_ms']:>7} {r[recall]:>10}")  # fmt: skip
    print(f"machine after: {uptime_after}")
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
