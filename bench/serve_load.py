"""Load test for `visto serve`: throughput and latency at several concurrency levels, with
dynamic batching on (--max-batch N) against off (--max-batch 1), on the same server code.

    python bench/serve_load.py                         # a tiny random LLaVA it builds itself
    python bench/serve_load.py --model runs/llava/checkpoint --requests 64 --concurrency 1 4 8

Every request is the same short chat with one image and `ignore_eos`, so each generates
exactly --max-tokens tokens; the figures are requests/s, generated tokens/s and latency
percentiles (client-side, over real HTTP on 127.0.0.1). Prints one table and the ratio
batched / unbatched at each concurrency.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def image_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run_level(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "ignore_eos": True, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url()}},
                                     {"type": "text", "text": "what is in the image?"}]}]}  # fmt: skip
    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()

    def one(_: int) -> None:
        nonlocal tokens
        start = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        with lock:
            latencies.append(time.perf_counter() - start)
            tokens += r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "rps": requests / wall,
        "tok_s": tokens / wall,
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="LLaVA checkpoint (default: build a tiny random one)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    args = ap.parse_args()

    from test_serve_support import make_llava_checkpoint, running
    from visto.cli import build_parser
    from visto.commands.serve import build_app, run_name

    ckpt = args.model or make_llava_checkpoint(Path(tempfile.mkdtemp()) / "tiny-llava" / "checkpoint")
    name = run_name(ckpt)
    print(f"model {ckpt} | {args.requests} requests x {args.max_tokens} tokens | "
          f"cpus {os.cpu_count()} | load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    rows = []
    for max_batch in (args.max_batch, 1):
        app = build_app(build_parser().parse_args(
            ["serve", "--model", str(ckpt), "--max-batch", str(max_batch),
             "--max-concurrency", "1024"]))  # fmt: skip
        with running(app) as url:
            run_level(url, name, 1, 2, args.max_tokens)  # warm up
            for c in args.concurrency:
                rows.append((max_batch, c, run_level(url, name, c, args.requests, args.max_tokens)))
    print(f"{'max_batch':>9} {'conc':>5} {'req/s':>8} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7}")
    for max_batch, c, r in rows:
        print(f"{max_batch:>9} {c:>5} {r['rps']:>8.2f} {r['tok_s']:>8.1f} {r['p50']:>7.3f} {r['p95']:>7.3f}")
    by = {(b, c): r for b, c, r in rows}
    for c in args.concurrency:
        ratio = by[(args.max_batch, c)]["tok_s"] / by[(1, c)]["tok_s"]
        print(f"concurrency {c}: batched / unbatched throughput = {ratio:.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
