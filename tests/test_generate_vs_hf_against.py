"""bench/generate_vs_hf.py --against SRC (issue 19): another source tree's visto imported beside
this one, timed in turns with this tree and transformers in one process, its greedy tokens
checked equal; its imports stay inside its own tree."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "generate_vs_hf.py"


def _copy_of_src(tmp_path: Path) -> Path:
    """This tree's package copied elsewhere: the 'other tree' (a git archive of a commit in use)."""
    src = tmp_path / "other" / "src"
    shutil.copytree(ROOT / "src" / "visto", src / "visto",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    return src


def test_the_other_tree_imports_its_own_modules(tmp_path):
    src = _copy_of_src(tmp_path)
    code = f"""
import sys
sys.path.insert(0, {str(BENCH.parent)!r})
from generate_vs_hf import import_tree
import visto.data.processor as ours
pkg = import_tree({str(src)!r})
import visto_against.data.processor as theirs
assert pkg.__name__ == "visto_against" and theirs is not ours
assert theirs.Processor is not ours.Processor
assert theirs.__file__.startswith({str(src)!r}), theirs.__file__
# the tree's own `from visto.data.images import ...` read its own images module
assert theirs.normalise_pixels.__module__ == "visto_against.data.images"
assert sys.modules["visto_against.data.images"].__file__.startswith({str(src)!r})
assert ours.normalise_pixels.__module__ == "visto.data.images"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_a_tree_without_visto_is_refused(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCH), "--preset", "tiny", "--against", str(tmp_path), "--repeats", "1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode != 0 and "no visto package there" in done.stdout + done.stderr
    done = subprocess.run(
        [sys.executable, str(BENCH), "--family", "decoder", "--against", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 2 and "--against compares LLaVA" in done.stderr


@pytest.mark.slow
def test_three_sides_in_turns_with_equal_tokens(tmp_path):
    src = _copy_of_src(tmp_path)
    out_json = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--family", "llava", "--preset", "tiny", "--vocab", "400",
         "--new-tokens", "6", "--repeats", "1", "--threads", "1", "--against", str(src),
         "--json", str(out_json)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("this/against") == 2  # batch 1 and 8
    figures = json.loads(out_json.read_text())
    assert figures["against"] == str(src)
    for batch in figures["batch"].values():
        mine, other = batch["ttft_ms"]["visto"], batch["against"]["ttft_ms"]["against"]
        assert batch["vs_against"]["ttft_ratio"] == pytest.approx(mine / other)
        assert batch["against"]["ttft_ratio"] == pytest.approx(
            other / batch["ttft_ms"]["transformers"]
        )
        assert batch["vs_against"]["ttft_ratio_cpu"] > 0
