"""The benchmark script end to end at a tiny size: visto's greedy tokens equal transformers'."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "generate_vs_hf.py"


@pytest.mark.slow
def test_generate_vs_hf_bench_runs_and_tokens_agree():
    args = ["--vocab", "300", "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2"]
    args += ["--intermediate", "128", "--prompt-len", "12", "--new-tokens", "6", "--repeats", "1"]
    args += ["--threads", "1"]
    done = subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("tokens identical") == 2  # batch 1 and batch 8
