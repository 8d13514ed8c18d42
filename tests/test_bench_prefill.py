"""bench/ttft_profile.py and bench/preprocess_speed.py end to end at tiny sizes (issue 19):
every stage is found in the call, and both preprocessors give the same pixels (photos, which
visto downscales with torch's bicubic: within a level)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, args: list[str]) -> str:
    done = subprocess.run([sys.executable, str(BENCH / script), *args, "--threads", "1"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_ttft_profile_splits_the_call(tmp_path):
    out = tmp_path / "ttft.json"
    _run("ttft_profile.py", ["--preset", "tiny", "--calls", "2", "--json", str(out)])
    figures = json.loads(out.read_text())
    for batch in ("1", "8"):
        split = figures["split_ms"][batch]
        stages = split["stages"]
        marked = ("preprocess", "vision tower", "projector", "kv cache allocation",
                  "decoder prefill")  # fmt: skip
        assert all(stages[name] > 0 for name in marked)  # every mark fired in the call
        assert stages["total"] > stages["vision tower"] + stages["decoder prefill"]
        assert split["gflop"] > 0 and 0 < split["fraction_of_gemm_rate"] < 1.5
    assert figures["split_ms"]["8"]["gflop"] > figures["split_ms"]["1"]["gflop"]


@pytest.mark.slow
def test_preprocess_speed_same_pixels_as_transformers(tmp_path):
    out = tmp_path / "pre.json"
    _run(
        "preprocess_speed.py",
        ["--sizes", "32", "--rounds", "1", "--calls", "1", "--json", str(out)],
    )
    figures = json.loads(out.read_text())["sizes"]["32"]
    for images in ("photos", "model size"):
        assert figures[images]["max_abs_diff_pil"] == 0.0  # visto with PIL's resize
        assert figures[images]["images_per_s"]["visto"] > 0
    assert figures["model size"]["max_abs_diff"] == 0.0  # no resize: the same numbers
    assert figures["photos"]["levels_max"] <= 1.001  # the fast downscale: within a level
