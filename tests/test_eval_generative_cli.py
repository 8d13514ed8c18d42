"""`visto eval` for generative families: a tiny LLaVA (trained through the loop to answer
with one box) evaluated on a tiny world: eval.json, predictions.jsonl, report.md, examples."""

from __future__ import annotations

import json
import math
import re

import pytest
from PIL import Image

from test_chat import ANSWER_PLAIN, train_tiny_llava  # the shared tiny run
from visto.cli import main
from visto.commands.eval import finite_metrics, resolve_tasks
from visto.errors import UserError
from visto.eval import FAMILY_KIND, evaluator_for
from visto.eval.examples import example_boxes, pick_examples


def test_generative_families_dispatch_to_the_generative_evaluation():
    kind, evaluate = evaluator_for("llava")
    assert kind == "generative" and FAMILY_KIND["llava"] == "generative"
    assert evaluate.__name__ == "evaluate_generative_model"


def test_eval_json_keeps_numbers_only_and_tasks_are_checked():
    kept, dropped = finite_metrics({"a": 0.5, "b": float("nan"), "heldout.a": 1.0})
    assert kept == {"a": 0.5, "heldout.a": 1.0} and dropped == ["b"]
    # A model that never says "yes": POPE precision and F1 are 0 (as quickstart and compare report).
    never_yes = {"pope.f1": float("nan"), "heldout.pope.precision": float("nan"), "pope.recall": 0.0}
    kept, dropped = finite_metrics(never_yes)
    assert kept == {"pope.f1": 0.0, "heldout.pope.precision": 0.0, "pope.recall": 0.0} and dropped == []
    assert resolve_tasks(None) is None and resolve_tasks(["vqa", "vqa", "ocr"]) == ["vqa", "ocr"]
    with pytest.raises(UserError, match="unknown task"):
        resolve_tasks(["vqa", "poetry"])


def record(id_: str, task: str, split: str, prediction: str = "", references=("x",), **kw):
    return {"id": id_, "task": task, "split": split, "prediction": prediction,
            "references": list(references), "question": kw.get("question", "q"),
            "qtype": kw.get("qtype"), "score": kw.get("score", 0.0)}  # fmt: skip


def test_pick_examples_spreads_over_tasks_splits_and_images():
    records = [record(f"{i:06d}-vqa-{k}", "vqa", split) for i in range(3) for k in range(5)
               for split in ("test", "heldout")]  # fmt: skip
    records += [record(f"{i:06d}-ground-9", "ground", "test") for i in range(3)]
    picked = pick_examples(records, n=6, seed=0)
    assert len(picked) == 6
    assert [r["task"] for r in picked[:2]] == ["ground", "vqa"]  # box tasks first
    assert {r["split"] for r in picked if r["task"] == "vqa"} == {"test", "heldout"}
    vqa_images = [(r["split"], r["id"].split("-")[0]) for r in picked if r["task"] == "vqa"]
    assert len(vqa_images) == len(set(vqa_images))  # different scenes while there are some
    assert pick_examples(records, n=6, seed=0) == picked  # seeded
    assert pick_examples([], n=6) == []


def test_example_boxes_per_task():
    ground = record("1-ground-0", "ground", "test", "[1, 2, 3, 4]", ["[5, 6, 7, 8]"])
    assert example_boxes(ground) == ([[5, 6, 7, 8]], [[1, 2, 3, 4]])
    refdesc = record("1-refdesc-0", "refdesc", "test", "red star", question="What is at [9, 9, 20, 20]?")
    assert example_boxes(refdesc) == ([[9, 9, 20, 20]], [])
    target = {"objects": [{"shape": "star", "colour": "red", "size": "small", "box": [1, 1, 9, 9]}]}
    json_rec = record("1-json-0", "json", "test", json.dumps(target), [json.dumps(target)])
    assert example_boxes(json_rec) == ([[1, 1, 9, 9]], [[1, 1, 9, 9]])
    assert example_boxes(record("1-vqa-0", "vqa", "test", "[1, 2, 3, 4]")) == ([], [])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny_llava(tmp_path_factory.mktemp("evalgen"))


@pytest.mark.slow
def test_visto_eval_on_a_generative_checkpoint(tiny_run, capsys):
    world, run = tiny_run
    args = ["eval", "--model", str(run / "checkpoint"), "--data", str(world), "--n", "2",
            "--tasks", "vqa", "ground", "refdesc", "json", "--max-tokens", "6",
            "--json-max-tokens", "16", "--examples", "6"]  # fmt: skip
    assert main(args) == 0
    # --out defaults to the run directory holding the checkpoint (where metrics.jsonl is).
    metrics = json.loads((run / "eval.json").read_text())
    for prefix in ("", "heldout."):
        for name in ("vqa.overall", "vqa.count", "vqa.exist", "count.acc", "pope.f1",
                     "ground.acc50", "refdesc.acc", "json.valid", "json.field_acc",
                     "detect.recall"):  # fmt: skip
            value = metrics[prefix + name]
            assert isinstance(value, float) and math.isfinite(value), prefix + name
    assert all(math.isfinite(v) for v in metrics.values())
    # The blind twin (on by default): every figure again with the images swapped, and the gain.
    for name in ("vqa.overall", "heldout.vqa.overall", "ground.acc50", "json.valid"):
        assert 0.0 <= metrics["blind." + name] <= 1.0, name
        assert metrics["gain." + name] == pytest.approx(metrics[name] - metrics["blind." + name])
    # JSON: the model's own answers, and (xgrammar is installed here) under the grammar: 16
    # tokens cut the grammar's JSON short, while the own answer "[140, ...]" parses.
    assert metrics["json.valid"] == 1.0 and metrics["json.constrained.valid"] == 0.0
    assert "blind.json.constrained.field_acc" in metrics

    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"test", "heldout"}
    assert all(r["blind_image"] != r["id"].split("-")[0] for r in rows)
    json_rows = [r for r in rows if r["task"] == "json"]
    assert all(r["prediction"] == ANSWER_PLAIN for r in json_rows)
    assert all(r["constrained_prediction"].startswith('{"objects":') for r in json_rows)
    assert {r["task"] for r in rows} == {"vqa", "ground", "refdesc", "json"}
    ground = [r for r in rows if r["task"] == "ground" and r["split"] == "test"]
    assert all(r["prediction"] == ANSWER_PLAIN for r in ground)
    # The figure in eval.json is the per-question scores of predictions.jsonl, aggregated.
    hits = sum(r["score"] >= 0.5 for r in ground) / len(ground)
    assert metrics["ground.acc50"] == pytest.approx(hits)

    report = (run / "report.md").read_text()
    assert "| `vqa.overall` |" in report and "## Example predictions" in report
    assert "| seen | seen blind | seen gain | held-out |" in report and "blind twin" in report
    pngs = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert {"vqa.png", "curve.png", "examples.png"} <= set(pngs)
    assert all((run / p).is_file() for p in pngs)
    page = Image.open(run / "examples.png")
    assert page.width > 600 and page.height > 400
    out = capsys.readouterr().out
    assert "ground.acc50" in out and "examples.png" in out and "blind" in out


@pytest.mark.slow
def test_visto_eval_blind_blank_and_no_blind(tiny_run, tmp_path):
    world, run = tiny_run
    args = ["eval", "--model", str(run / "checkpoint"), "--data", str(world), "--n", "2",
            "--tasks", "vqa", "json", "--max-tokens", "4", "--json-max-tokens", "8",
            "--examples", "0"]  # fmt: skip
    assert main([*args, "--blind", "blank", "--no-constrain", "--out", str(tmp_path / "b")]) == 0
    blank = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert "blind.vqa.overall" in blank and "gain.heldout.vqa.overall" in blank
    assert not any(k.startswith("json.constrained.") for k in blank)  # --no-constrain
    rows = (tmp_path / "b" / "predictions.jsonl").read_text().splitlines()
    assert all(json.loads(r)["blind_image"] == "blank" for r in rows)
    assert main([*args, "--no-blind", "--out", str(tmp_path / "n")]) == 0
    seeing = json.loads((tmp_path / "n" / "eval.json").read_text())
    assert not any(k.startswith(("blind.", "gain.")) for k in seeing) and "vqa.overall" in seeing


def test_blind_modes_of_the_command_are_the_evaluations():
    from visto.commands.eval import BLIND_MODES
    from visto.eval.generative import BLIND_MODES as EVAL_BLIND_MODES

    assert BLIND_MODES == EVAL_BLIND_MODES


def test_visto_eval_generative_bad_options(tiny_run, capsys, tmp_path):
    world, run = tiny_run
    args = ["eval", "--model", str(run / "checkpoint"), "--data", str(world), "--out",
            str(tmp_path / "ev")]  # fmt: skip
    assert main([*args, "--tasks", "poetry"]) == 2
    assert main([*args, "--max-tokens", "0"]) == 2
    assert main([*args, "--examples", "-1"]) == 2
    with pytest.raises(SystemExit):  # argparse: not one of swap, blank
        main([*args, "--blind", "peek"])
    err = capsys.readouterr().err
    assert "invalid choice: 'peek'" in err
    assert "unknown task" in err and "--max-tokens must be at least 1" in err
    assert "--examples must be 0 or more" in err
    assert not (tmp_path / "ev").exists()
