"""bench/clip_figures.py and the two-tower recipes: oracle recall by hand, recipes that fit the
world's captions, and the whole bench (world -> train -> eval -> table + JSON) at a tiny size."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from visto.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "clip_figures.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("clip_figures", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_oracle_recall_by_hand():
    oracle_recall = bench_module().oracle_recall
    # "a" is shared by 3 images, "b" by 1, "c" by 2: R@1 = (3 * 1/3 + 1 + 2 * 1/2) / 6.
    captions = ["a", "a", "a", "b", "c", "c"]
    assert oracle_recall(captions, 1) == pytest.approx(3 / 6)
    assert oracle_recall(captions, 2) == pytest.approx((3 * 2 / 3 + 1 + 2) / 6)
    assert oracle_recall(captions, 5) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["clip-synth", "clip-lit-minilm"])
def test_two_tower_recipes_load(name):
    recipe = load_recipe(name)
    assert recipe.model.family == "clip"
    # A step budget (the same seed, the same model on any machine), about 10 reference minutes.
    assert recipe.max_steps <= 3000 and recipe.max_minutes is None
    assert recipe.data.tasks == ["caption"]
    text = recipe.model.config["text"]
    if name == "clip-lit-minilm":
        assert recipe.model.config["lock_text"] is True and text["pretrained"] == "minilm"
    else:
        # The world's longest caption (5 objects with positions and two texts) is about 60
        # byte-level BPE tokens; a shorter context would cut the identifying part off.
        assert text["context_length"] >= 64


@pytest.mark.slow
def test_bench_runs_end_to_end_on_a_tiny_world(tmp_path):
    world = tmp_path / "world"
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({
        "model": {"family": "clip", "config": {
            "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2,
                       "mlp_hidden": 64},
            "text": {"vocab_size": 512, "context_length": 64, "width": 32, "layers": 1,
                     "heads": 2, "mlp_hidden": 64},
            "embed_dim": 16}},
        "processor": {"config": {"image_size": 32, "resize_mode": "resize", "vocab_size": 512},
                      "tokenizer_samples": 200},
        "data": {"source": str(world), "format": "synth", "tasks": ["caption"]},
        "batch_size": 16, "max_steps": 3, "eval_every": None, "eval_batches": 1, "seed": 0,
    }))  # fmt: skip
    out_json = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--world", str(world), "--world-n", "200",
         "--recipes", str(recipe), "--runs", str(tmp_path / "runs"), "--n", "10",
         "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "zeroshot.shape" in done.stdout and "load average" in done.stdout
    results = json.loads(out_json.read_text())["results"]
    entry = results["tiny"]  # runs and results are named by the recipe file's stem
    metrics = entry["metrics"]
    for key in ("zeroshot.shape", "retrieval.t2i.r1", "heldout.retrieval.t2i.r5",
                "paraphrase.zeroshot.colour", "retrieval.t2i.positions.r1",
                "oracle.t2i.counts.r1"):  # fmt: skip
        assert 0.0 <= metrics[key] <= 1.0, key
    assert entry["train"]["steps"] == 3
    assert len(entry["load_before"]) == 3
