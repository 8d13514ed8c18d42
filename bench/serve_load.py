"""Load test for `visto serve`: throughput, latency and streamed time to first token, with
batching (--max-batch N: continuous batching for a LLaVA) against one request at a time
(--max-batch 1), and under overload (--soak N clients against 16), over real HTTP on 127.0.0.1.

    python bench/serve_load.py                                   # quickstart-size LLaVA, 1 4 16
    python bench/serve_load.py --concurrency 16 --duration 20 --max-batch 16
    python bench/serve_load.py --soak 50 --rounds 5 --json bench/out/serve_soak.json
    python bench/serve_load.py --soak 50 --max-queue 0           # no line: 429 + Retry-After only
    python bench/serve_load.py --model runs/llava/checkpoint --preset tiny

The server is `visto serve` in its own process (torch threads: --threads), so its peak RSS is
its own and the clients (threads of this process) do not share its interpreter. The model is
a random-weight LLaVA of `--preset` (small = the quickstart's size) unless --model is given.
Every request is the same short chat with one image and `ignore_eos`, so each generates
exactly --max-tokens tokens. Each client sends requests back to back for --duration seconds;
a 429 (slots and line full) is counted apart and retried after the server's Retry-After
(--retry-wait S: after S seconds instead, as an impatient client does); any other failure is
an error. A request's latency runs from its first attempt to its answer, waits included.

Figures per level: requests/s, generated tokens/s, p50/p95 latency, 429s, errors, the
server's peak RSS during the level. Levels mode: the ratio batched / one-at-a-time tokens/s
per concurrency and, with the server idle, the streamed time to first token against the
engine's own TTFT (prefill + first token, in this process, same prompt). Soak mode: 16 clients
and --soak clients take turns on one batched server for --rounds rounds; `soak_vs_batched` is
the median over rounds of (soak tokens/s) / (16 clients' tokens/s) of the same round.
--json FILE writes every figure.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
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


class ServerProcess:
    """`visto serve --model CKPT FLAGS` in its own process on a free port, until exit."""

    def __init__(self, checkpoint: Path, threads: int, *flags: str) -> None:
        from test_serve_support import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="visto-serve-")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "visto.cli", "serve", "--model", str(checkpoint),
             "--port", str(self.port), *flags],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"visto serve exited {self.proc.returncode}:\n{self.log.read()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"visto serve did not answer /health within {timeout:g} s")

    def _status_kb(self, field: str) -> int | None:
        """VmRSS (now) or VmHWM (the peak so far) of the server, from /proc (Linux)."""
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return None

    def rss_mb(self) -> float | None:
        kb = self._status_kb("VmRSS")
        return kb / 1024 if kb is not None else None

    def peak_rss_mb(self) -> float | None:
        kb = self._status_kb("VmHWM")
        return kb / 1024 if kb is not None else None

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@contextlib.contextmanager
def serving(checkpoint: Path, threads: int, *flags: str) -> Iterator[ServerProcess]:
    server = ServerProcess(checkpoint, threads, *flags)
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


class RssPeak:
    """Samples a server's RSS every 0.1 s while the block runs; `peak_mb` is the largest.
    (VmHWM is the peak since the process started, not during one level.)"""

    def __init__(self, server: ServerProcess | None) -> None:
        self.server, self.peak_mb = server, None
        self._done = threading.Event()

    def _sample(self) -> None:
        while True:
            now = self.server.rss_mb()
            if now is not None:
                self.peak_mb = max(self.peak_mb or 0.0, now)
            if self._done.wait(0.1):
                return

    def __enter__(self) -> RssPeak:
        if self.server is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self._done.set()
            self._thread.join()


def run_level(url: str, model: str, clients: int, duration: float, max_tokens: int,
              retry_wait: float | None = None, server: ServerProcess | None = None) -> dict:
    """`clients` threads sending requests back to back for `duration` seconds. A 429 is
    retried after the server's Retry-After (or `retry_wait` s); latency counts from a
    request's first attempt. With `server`, its peak RSS over the level is sampled."""
    body = chat_body(model, max_tokens)
    latencies: list[float] = []
    counts = {"tokens": 0, "429": 0, "errors": 0}
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + duration

    def failed(message: str) -> None:
        with lock:
            counts["errors"] += 1
            errors.append(message)

    def one_request(http: httpx.Client) -> None:
        start = time.perf_counter()
        while True:
            try:
                r = http.post(url + "/v1/chat/completions", json=body)
            except httpx.HTTPError as e:
                return failed(repr(e))
            if r.status_code != 429:
                break
            with lock:
                counts["429"] += 1
            if time.perf_counter() > deadline:
                return  # refused at the end of the level: not retried, not counted
            time.sleep(retry_wait if retry_wait is not None else float(r.headers["retry-after"]))
        if r.status_code != 200:
            return failed(f"{r.status_code} {r.text[:200]}")
        with lock:
            latencies.append(time.perf_counter() - start)
            counts["tokens"] += r.json()["usage"]["completion_tokens"]

    def client(_: int) -> None:
        with httpx.Client(timeout=600) as http:
            while time.perf_counter() < deadline:
                one_request(http)

    start = time.perf_counter()
    with RssPeak(server) as rss, ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    latencies.sort()
    n = len(latencies)
    return {
        "clients": clients,
        "requests": n,
        "rps": n / wall,
        "tok_s": counts["tokens"] / wall,
        "p50_s": statistics.median(latencies) if n else float("nan"),
        "p95_s": latencies[min(n - 1, int(0.95 * n))] if n else float("nan"),
        "429": counts["429"],
        "errors": counts["errors"],
        "server_peak_rss_mb": rss.peak_mb,
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
    from visto.tasks.runner import AnswerTokenizer

    model = load(checkpoint).eval()
    engine = Engine(model, AnswerTokenizer(model.processor.tokenizer))
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


def print_levels(rows: list[dict]) -> None:
    print(f"{'round':>5} {'max_batch':>9} {'clients':>7} {'requests':>8} {'req/s':>7} "
          f"{'tok/s':>8} {'p50 s':>7} {'p95 s':>7} {'429s':>5} {'errors':>6} {'RSS MB':>7}")
    for r in rows:
        rss = f"{r['server_peak_rss_mb']:.0f}" if r["server_peak_rss_mb"] else "?"
        print(f"{r['round']:>5} {r['max_batch']:>9} {r['clients']:>7} {r['requests']:>8} "
              f"{r['rps']:>7.2f} {r['tok_s']:>8.1f} {r['p50_s']:>7.3f} {r['p95_s']:>7.3f} "
              f"{r['429']:>5} {r['errors']:>6} {rss:>7}")
        for e in r["first_errors"]:
            print(f"    error: {e}")


def median_of(rows: list[dict], key: str, **match: int) -> float:
    return statistics.median(r[key] for r in rows if all(r[k] == v for k, v in match.items()))


def uptime() -> str:
    return os.popen("uptime").read().strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="LLaVA checkpoint (default: build a random one)")
    ap.add_argument("--preset", choices=["tiny", "small"], default="small")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per level")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the levels this many times, alternating their order")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-concurrency", type=int, default=32, help="server's requests in flight")
    ap.add_argument("--max-queue", type=int, help="server's line before 429 (default: its own)")
    ap.add_argument("--soak", type=int, default=0,
                    help="this many clients against --soak-base clients, batched (no levels)")
    ap.add_argument("--soak-base", type=int, default=16, help="the reference level of --soak")
    ap.add_argument("--retry-wait", type=float,
                    help="seconds before retrying a 429 (default: the server's Retry-After)")
    ap.add_argument("--threads", type=int, default=1, help="server's torch threads (1 wins under load)")
    ap.add_argument("--ttft-repeats", type=int, default=9)
    ap.add_argument("--json", type=Path, help="write every figure to this JSON file")
    args = ap.parse_args()
    if args.rounds < 1 or args.soak < 0 or args.duration <= 0:
        ap.error("--rounds must be at least 1, --soak not negative, --duration positive")

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from visto.commands.serve import run_name

    ckpt = args.model or make_checkpoint(
        Path(tempfile.mkdtemp()) / f"{args.preset}-llava" / "checkpoint", args.preset
    )
    name = run_name(ckpt)
    print(f"model {ckpt} | {args.max_tokens} tokens per request | {args.duration:g} s per level"
          f" | server torch threads {args.threads} | cpus {os.cpu_count()}")  # fmt: skip
    load_before = uptime()
    print(f"uptime: {load_before}")
    wall0 = time.perf_counter()

    def serve(max_batch: int) -> contextlib.AbstractContextManager[ServerProcess]:
        flags = ["--max-batch", str(max_batch), "--max-concurrency", str(args.max_concurrency)]
        if args.max_queue is not None:
            flags += ["--max-queue", str(args.max_queue)]
        return serving(ckpt, args.threads, *flags)

    def level(server: ServerProcess, clients: int, max_batch: int, round_: int) -> dict:
        row = run_level(server.url, name, clients, args.duration, args.max_tokens,
                        args.retry_wait, server)  # fmt: skip
        return {"round": round_, "max_batch": max_batch, **row}

    rows: list[dict] = []
    report: dict = {"model": str(ckpt), "max_tokens": args.max_tokens, "duration_s": args.duration,
                    "threads": args.threads, "cpus": os.cpu_count(), "max_batch": args.max_batch,
                    "max_concurrency": args.max_concurrency, "max_queue": args.max_queue,
                    "retry_wait_s": args.retry_wait}  # fmt: skip
    if args.soak:
        # One long-running server; the two levels take turns, so load drift hits both.
        with serve(args.max_batch) as server:
            run_level(server.url, name, 1, 1.0, args.max_tokens)  # warm up
            for round_ in range(args.rounds):
                order = [args.soak_base, args.soak][:: 1 if round_ % 2 == 0 else -1]
                for clients in order:
                    rows.append(level(server, clients, args.max_batch, round_))
            peak = server.peak_rss_mb()
        ratios = [
            median_of(rows, "tok_s", round=i, clients=args.soak)
            / median_of(rows, "tok_s", round=i, clients=args.soak_base)
            for i in range(args.rounds)
        ]
        print_levels(rows)
        summary = {str(c): {k: median_of(rows, k, clients=c) for k in
                            ("tok_s", "rps", "p50_s", "p95_s", "server_peak_rss_mb")}
                   for c in (args.soak_base, args.soak)}  # fmt: skip
        report.update(soak_vs_batched=statistics.median(ratios), soak_vs_batched_rounds=ratios,
                      medians=summary, server_peak_rss_mb=peak)  # fmt: skip
        for c, m in summary.items():
            print(f"{c} clients, median of {args.rounds}: {m['tok_s']:.1f} tok/s, "
                  f"p95 {m['p95_s']:.3f} s, server peak RSS {m['server_peak_rss_mb']:.0f} MB")
        print(f"soak / batched tokens/s ({args.soak} / {args.soak_base} clients), median of "
              f"{args.rounds} rounds: {statistics.median(ratios):.2f} "
              f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}); server peak RSS over the "
              f"whole run {peak:.0f} MB")  # fmt: skip
    else:
        # Batched and one-at-a-time take turns level by level, so load drift hits both.
        for round_ in range(args.rounds):
            for c in args.concurrency:
                batches = [args.max_batch, 1][:: 1 if round_ % 2 == 0 else -1]
                for max_batch in batches:
                    with serve(max_batch) as server:
                        run_level(server.url, name, 1, 1.0, args.max_tokens)  # warm up
                        rows.append(level(server, c, max_batch, round_))
        print_levels(rows)
        ratios = {}
        for c in args.concurrency:
            per_round = [median_of(rows, "tok_s", round=i, clients=c, max_batch=args.max_batch)
                         / median_of(rows, "tok_s", round=i, clients=c, max_batch=1)
                         for i in range(args.rounds)]  # fmt: skip
            ratios[str(c)] = statistics.median(per_round)
            print(f"{c} clients: batched / one-at-a-time tokens/s = {ratios[str(c)]:.2f}x "
                  f"(median of {args.rounds})")
        with serve(args.max_batch) as server:
            served = streamed_ttft(server.url, name, args.ttft_repeats)
        token, text = engine_ttft(ckpt, args.ttft_repeats)
        print(f"streamed time to first text {served * 1e3:.1f} ms (HTTP, image decode, "
              f"processor, queue, prefill) vs the engine's own (same prompt, image bytes in): "
              f"first token {token * 1e3:.1f} ms, first text {text * 1e3:.1f} ms: "
              f"{served / text:.2f}x")  # fmt: skip
        report.update(batched_vs_one=ratios, streamed_ttft_s=served, engine_ttft_s=token,
                      engine_first_text_s=text)  # fmt: skip
    load_after = uptime()
    print(f"wall {time.perf_counter() - wall0:.1f} s")
    print(f"uptime: {load_after}")
    errors = sum(r["errors"] for r in rows)
    if args.json:
        report.update(levels=rows, errors=errors, uptime_before=load_before,
                      uptime_after=load_after)  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"figures written to {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
