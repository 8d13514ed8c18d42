"""The benchmark script end to end at a tiny size: visto's greedy tokens equal transformers',
for a plain decoder and for LLaVA with an image (each side through its own processor)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "generate_vs_hf.py"


def _run(args: list[str]) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCH), *args, "--repeats", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_generate_vs_hf_bench_runs_and_tokens_agree(tmp_path):
    args = ["--family", "decoder", "--vocab", "300", "--hidden", "64", "--layers", "2"]
    args += ["--heads", "4", "--kv-heads", "2", "--intermediate", "128", "--prompt-len", "12"]
    out = _run([*args, "--new-tokens", "6", "--json", str(tmp_path / "figures.json")])
    assert out.count("tokens identical") == 2  # batch 1 and batch 8
    # issue 19's machine-readable figures: ours / transformers per batch size
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert set(figures["batch"]) == {"1", "8"}
    for batch in figures["batch"].values():
        assert batch["ttft_ratio"] > 0 and batch["tokps_ratio"] > 0
        assert batch["ttft_ratio"] == pytest.approx(
            batch["ttft_ms"]["visto"] / batch["ttft_ms"]["transformers"]
        )
    assert len(figures["load"]) == 2


@pytest.mark.slow
def test_llava_with_images_gives_transformers_tokens():
    out = _run(["--family", "llava", "--preset", "tiny", "--vocab", "400", "--new-tokens", "8"])
    assert out.count("tokens identical") == 2
    assert "CLIPImageProcessorPil" in out  # their own image preprocessing, inside the timing
