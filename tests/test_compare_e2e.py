"""visto compare end to end: two families, seconds-long budgets, one report; a re-run reuses."""

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def test_compare_two_families_end_to_end(tmp_path):
    from rich.console import Console

    from visto.compare import CompareConfig, family_budget, run_compare
    from visto.data.synth import iter_records
    from visto.train.recipe import load_recipe

    cfg = CompareConfig(
        families=["llava", "fuyu"], steps=2, n=600, vision_steps=40,
        reader_steps=5, eval_images=1,
        eval_batch=64, tasks=["vqa", "ground"], probe_images=1, probe_points=2,
        latency_prompts=1, latency_tokens=2, threads=1,
    )  # fmt: skip
    console = Console(record=True, width=120)
    result = run_compare(cfg, tmp_path, console=console)

    data = json.loads((tmp_path / "compare.json").read_text())
    assert list(data["families"]) == ["llava", "fuyu"]
    # LLaVA's object tokens come from the detector trained with the shared tower.
    from safetensors.torch import load_file

    tower = load_file(tmp_path / "vision" / "checkpoint" / "model.safetensors")
    llava = load_file(tmp_path / "llava" / "train" / "checkpoint" / "model.safetensors")
    heads = [k for k in tower if k.startswith("multi_modal_projector.heads.")]
    assert heads and all(torch.equal(llava[k], tower[k]) for k in heads)
    for family, s in data["families"].items():
        assert (tmp_path / family / "eval.json").is_file()
        assert "vqa.overall" in s["metrics"] and "heldout.vqa.overall" in s["metrics"]
        assert s["parameters"] >= s["trained_parameters"] > 0
        # LLaVA reads one token per detected object (10 slots); Fuyu its 8x8 patches of 16 px
        assert s["visual_tokens"] == {"llava": 10, "fuyu": 64}[family]
        assert s["ttft_ms"] > 0 and s["steps"] >= 1
        assert s["probe_curve"] and all(0 <= p["vqa"] <= 1 for p in s["probe_curve"])
    # The shared tower is frozen in LLaVA, and in Fuyu, whose question_focus reads it (its
    # detector and reader): Fuyu takes it, so it is not credited the tower's time (a plain
    # Fuyu is: tests/test_fuyu_focus.py).
    assert data["families"]["llava"]["trained_parameters"] < data["families"]["llava"]["parameters"]
    assert data["families"]["llava"]["steps"] == 2
    assert load_recipe("compare-fuyu").model.config["question_focus"]
    assert family_budget(cfg, load_recipe("compare-fuyu").max_steps, takes_tower=True)[0] == 2
    assert data["families"]["fuyu"]["steps"] == 2 and data["families"]["fuyu"]["takes_shared_vision"]
    assert data["families"]["fuyu"]["trained_parameters"] < data["families"]["fuyu"]["parameters"]
    # Each family trained on the compare mix, and its checkpoint card says so.
    card = (tmp_path / "llava" / "train" / "checkpoint" / "README.md").read_text()
    assert '"name": "instruct+caption"' in card and '"independent_turns": true' in card
    # LLaVA copies the JSON its detector writes, so its JSON labels write that detector's boxes
    # (the shared tower's heads): a row per training image, named in its card; so does Fuyu's
    # question_focus.
    boxes = (tmp_path / "llava" / "json-boxes.jsonl").read_text().splitlines()
    assert len(boxes) == sum(1 for _ in iter_records(tmp_path / "world", "train"))
    assert f'"json_boxes": "{tmp_path / "llava" / "json-boxes.jsonl"}"' in card
    assert (tmp_path / "fuyu" / "json-boxes.jsonl").read_text().splitlines() == boxes
    rows = {r["key"]: r for r in data["tasks"]}
    assert set(rows["vqa.overall"]["values"]) == {"llava", "fuyu"}
    assert all("winner" in r for r in data["tasks"])

    report = result.report.read_text()
    assert "| task | llava | llava blind | fuyu | fuyu blind | winner | by |" in report
    # One test image: no other to swap in, so the blind twin saw a blank one.
    assert any("blank grey image" in n for n in data["families"]["llava"]["notes"])
    assert all("blind.vqa.overall" in s["metrics"] for s in data["families"].values())
    assert "| VQA overall |" in report and "Held-out colour-shape combinations" in report
    assert (tmp_path / "plots" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"

    # Resumable: the same settings again train and evaluate nothing.
    console = Console(record=True, width=120)
    again = run_compare(cfg, tmp_path, console=console)
    out = console.export_text()
    assert "llava: reusing" in out and "fuyu: reusing" in out and "training" not in out
    assert again.summaries == result.summaries
