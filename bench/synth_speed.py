"""How fast does the synthetic world render? Target: 10,000 images with all tasks in <= 60 s on 2 cores.

    .venv/bin/python bench/synth_speed.py                 # 10k images, 2 workers, 3 runs
    .venv/bin/python bench/synth_speed.py --n 2000 --runs 1

Times `generate_world` end to end (render, masks, tasks, PNG encoding, jsonl, atomic rename)
into a temp directory, and prints the median of the runs with the machine's load average,
since other processes on a small machine change the figure; the CPU time per image (which
they do not change much) gives the figure for idle cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from visto.data.synth import WorldConfig, generate_world


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    cfg = WorldConfig(n=args.n, size=args.size, seed=0)
    seconds, cpu = [], []
    for run in range(args.runs):
        root = Path(tempfile.mkdtemp(prefix="visto-synth-bench-"))
        try:
            load_before = os.getloadavg()[0]
            start, cpu_start = time.perf_counter(), _cpu_seconds()
            generate_world(cfg, root / "world", workers=args.workers)
            seconds.append(time.perf_counter() - start)
            cpu.append(_cpu_seconds() - cpu_start)
            size_mb = (
                sum(p.stat().st_size for p in (root / "world").rglob("*") if p.is_file()) / 1e6
            )
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(
            f"run {run + 1}: {seconds[-1]:.1f} s ({args.n / seconds[-1]:.0f} images/s), "
            f"{size_mb:.0f} MB, {1000 * cpu[-1] / args.n:.2f} CPU ms per image, "
            f"load average before {load_before:.2f}"
        )
    median = statistics.median(seconds)
    rate = args.n / median
    print(
        f"median of {args.runs}: {rate:.0f} images/s with {args.workers} workers on {os.cpu_count()} CPUs "
        f"at {args.size}px -> {10_000 / rate:.1f} s per 10,000 images (target <= 60 s); "
        f"load average now {os.getloadavg()[0]:.2f}"
    )
    # On a shared machine the wall clock measures the neighbours too; CPU time does not.
    cpu_per_image = statistics.median(cpu) / args.n
    print(
        f"CPU time {1000 * cpu_per_image:.2f} ms per image (all processes) -> "
        f"{10_000 * cpu_per_image / args.workers:.1f} s per 10,000 images on {args.workers} idle cores"
    )


if __name__ == "__main__":
    main()
