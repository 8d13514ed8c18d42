"""Load test for `visto serve`: throughput, latency and streamed time to first token, with
batching (--max-batch N: continuous batching for a LLaVA) against one request at a time
(--max-batch 1), on the same server code, over real HTTP on 127.0.0.1.

    python bench/serve_load.py                                   # quickstart-size LLaVA, 1 4 16
    python bench/serve_load.py --concurrency 16 --duration 20 --max-batch 16
    python bench/serve_load.py --soak 50 --duration 60            # 50 clients for 60 s, batched only
    python bench/serve_load.py --model runs/llava/checkpoint --preset tiny

The model is a random-weight LLaVA of `--preset` (small = the quickstart's size) unless --model
is given. Every request is the same short chat with one image and `ignore_eos`, so each
generates exactly --max-tokens tokens. Each client sends requests back to back for --duration
seconds; a 429 (server busy, --max-concurrency) is counted apart and retried after 50 ms; any
other failure is an error. Figures: requests/s, generated tokens/s, p50/p95 latency; the ratio
batched / one-at-a-time tokens/s per concurrency; and, with the server idle, the streamed time
to first token against the engine's own TTFT (prefill + first token, in this process, same
prompt) and wall vs CPU seconds of the whole run (server and clients share this process).
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

QUESTION = "what is in the image?"


def image_png() -> bytes:
    buf = io.BytesIO()
    image = Image.new("RGB", (64, 48), (200, 40, 40))
    image.paste((30, 30, 220), (10, 10, 30, 30))
    image.save(buf, format="PNG")
    return buf.getvalue()


def chat_body(model: str, max_tokens: int, stream: bool = False) -> dict:
    url = "data:image/png;base64," + base64.b64encode(image_png()).decode()
    return {"model": model, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": QUESTION}]}]}  # fmt: skip


def make_checkpoint(path: Path, preset: str, seed: int = 0) -> Path:
    """A LLaVA of `preset` with a tokenizer trained on a small corpus and random weights."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_serve_support import corpus
    from visto.checkpoint import save_checkpoint
    from visto.data.processor import Processor
    from visto.data.tokenizer import train_tokenizer
    from visto.models import build_model
    from visto.models.llava import LlavaConfig

    config = LlavaConfig.preset(preset)
    tokenizer = train_tokenizer(
        corpus(), vocab_size=config.processor.vocab_size, loc_bins=config.processor.loc_bins
    )
    model = build_model("llava", config, seed=seed)
    model.processor = Processor(config.processor, tokenizer)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    return save_checkpoint(model, path)


def run_level(url: str, model: str, clients: int, duration: float, max_tokens: int) -> dict:
    body = chat_body(model, max_tokens)
    latencies: list[float] = []
    counts = {"tokens": 0, "429": 0, "errors": 0}
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + duration

    def client(_: int) -> None:
        with httpx.Client(timeout=600) as http:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    r = http.post(url + "/v1/chat/completions", json=body)
                except httpx.HTTPError as e:
                    with lock:
                        counts["errors"] += 1
                        errors.append(repr(e))
                    continue
                with lock:
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - start)
                        counts["tokens"] += r.json()["usage"]["completion_tokens"]
                    elif r.status_code == 429:
                        counts["429"] += 1
                    else:
                        counts["errors"] += 1
                        errors.append(f"{r.status_code} {r.text[:200]}")
                if r.status_code == 429:
                    time.sleep(0.05)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "rps": n / wall,
        "tok_s": counts["tokens"] / wall,
        "p50": statistics.median(latencies) if n else float("nan"),
        "p95": latencies[min(n - 1, int(0.95 * n))] if n else float("nan"),
        "429": counts["429"],
        "errors": counts["errors"],
        "first_errors": errors[:3],
    }


def streamed_ttft(url: str, model: str, repeats: int) -> float:
    """Median seconds from sending a streamed request to its first content piece."""
    import json

    body = chat_body(model, 4, stream=True)
    times = []
    with httpx.Client(timeout=60) as http:
        for _ in range(repeats + 1):
            start = time.perf_counter()
            first = None
            with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():  # read to the end: the next request finds it idle
                    if first is None and line.startswith("data: {"):
                        if json.loads(line[6:])["choices"][0]["delta"].get("content"):
                            first = time.perf_counter() - start
            assert first is not None, "the stream had no content"
            times.append(first)
    return statistics.median(times[1:])  # the first is a warm-up


def engine_ttft(checkpoint: Path, repeats: int) -> tuple[float, float]:
    """Medians of the engine alone on the request's prompt (preprocessing included): seconds
    to its first token, and to its first streamed text piece. They differ when the first
    tokens decode to no text (a random model often starts with special tokens), and the
    server streams text, so its TTFT compares with the second."""
    from visto.checkpoint import load
    from visto.data.sample import Sample, Turn
    from visto.infer import Engine, SamplingParams
    from visto.serve.app import _AnswerTokenizer

    model = load(checkpoint).eval()
    engine = Engine(model, _AnswerTokenizer(model.processor.tokenizer))
    sample = Sample("q", [image_png()], [Turn("user", "<image>\n" + QUESTION)])
    first_token, first_text = [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        batch = model.prompt_batch([sample])
        prepared = time.perf_counter() - start
        stream = engine.stream(batch, SamplingParams(4, ignore_eos=True))
        for _piece in stream:
            first_text.append(time.perf_counter() - start)
            break
        for _piece in stream:
            pass
        assert stream.completion is not None
        first_token.append(prepared + stream.completion.timing.ttft_s)
    return statistics.median(first_token[1:]), statistics.median(first_text[1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="LLaVA checkpoint (default: build a random one)")
    ap.add_argument("--preset", choices=["tiny", "small"], default="small")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-concurrency", type=int, default=32, help="server's; more -> 429")
    ap.add_argument("--soak", type=int, default=0,
                    help="only this many clients for --duration s, batched (skips the levels)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 wins under load)")
    ap.add_argument("--ttft-repeats", type=int, default=9)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_serve_support import running
    from visto.cli import build_parser
    from visto.commands.serve import build_app, run_name

    ckpt = args.model or make_checkpoint(
        Path(tempfile.mkdtemp()) / f"{args.preset}-llava" / "checkpoint", args.preset
    )
    name = run_name(ckpt)
    print(f"model {ckpt} | {args.max_tokens} tokens per request | {args.duration:g} s per level"
          f" | torch threads {args.threads} | cpus {os.cpu_count()}")  # fmt: skip
    print(f"uptime: {os.popen('uptime').read().strip()}")
    wall0, cpu0 = time.perf_counter(), time.process_time()

    def serve(max_batch: int):
        return running(build_app(build_parser().parse_args(
            ["serve", "--model", str(ckpt), "--max-batch", str(max_batch),
             "--max-concurrency", str(args.max_concurrency)])))  # fmt: skip

    rows = []
    if args.soak:
        with serve(args.max_batch) as url:
            run_level(url, name, 1, 1.0, args.max_tokens)  # warm up
            rows.append((args.max_batch, args.soak,
                         run_level(url, name, args.soak, args.duration, args.max_tokens)))  # fmt: skip
    else:
        # Batched and one-at-a-time take turns level by level, so load drift hits both.
        for c in args.concurrency:
            for max_batch in (args.max_batch, 1):
                with serve(max_batch) as url:
                    run_level(url, name, 1, 1.0, args.max_tokens)  # warm up
                    rows.append((max_batch, c, run_level(url, name, c, args.duration, args.max_tokens)))
    print(f"{'max_batch':>9} {'clients':>7} {'requests':>8} {'req/s':>7} {'tok/s':>8} "
          f"{'p50 s':>7} {'p95 s':>7} {'429s':>5} {'errors':>6}")  # fmt: skip
    for max_batch, c, r in rows:
        print(f"{max_batch:>9} {c:>7} {r['requests']:>8} {r['rps']:>7.2f} {r['tok_s']:>8.1f} "
              f"{r['p50']:>7.3f} {r['p95']:>7.3f} {r['429']:>5} {r['errors']:>6}")  # fmt: skip
        for e in r["first_errors"]:
            print(f"    error: {e}")
    if not args.soak:
        by = {(b, c): r for b, c, r in rows}
        for c in args.concurrency:
            ratio = by[(args.max_batch, c)]["tok_s"] / by[(1, c)]["tok_s"]
            print(f"{c} clients: batched / one-at-a-time tokens/s = {ratio:.2f}x")
        with serve(args.max_batch) as url:
            served = streamed_ttft(url, name, args.ttft_repeats)
        token, text = engine_ttft(ckpt, args.ttft_repeats)
        print(f"streamed time to first text {served * 1e3:.1f} ms (HTTP, image decode, "
              f"processor, queue, prefill) vs the engine's own (same prompt, image bytes in): "
              f"first token {token * 1e3:.1f} ms, first text {text * 1e3:.1f} ms: "
              f"{served / text:.2f}x")  # fmt: skip
    print(f"wall {time.perf_counter() - wall0:.1f} s, CPU {time.process_time() - cpu0:.1f} s "
          f"(this process: server + clients)")
    print(f"uptime: {os.popen('uptime').read().strip()}")
    return 1 if any(r["errors"] for _, _, r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
