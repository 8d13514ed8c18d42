"""Fine-tuning on your own images in one command: `visto train --recipe llava-lora` on a
world exported as LLaVA JSON (`visto data export`) trains LoRA adapters, scores the held-out
file before and after, and exports the model merged; from a visto or a transformers LLaVA."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_chat import train_tiny_llava  # a tiny LLaVA that answers every question with a box
from visto.cli import main

# The recipe's settings scaled to the tiny model and a test's budget.
TINY = ["--set", "optim.lr=0.003", "--set", "batch_size=8", "--set", "max_steps=300",
        "--set", "log_every=50", "--set", "finish.eval_n=40", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """(root, starting checkpoint, train JSON, held-out JSON)."""
    root = tmp_path_factory.mktemp("lora")
    world, run = train_tiny_llava(root)
    for split, name in (("train", "train"), ("test", "heldout")):
        assert main(["data", "export", str(world), "--split", split, "--format", "llava",
                     "--out", str(root / name), "--tasks", "vqa"]) == 0  # fmt: skip
    return root, run / "checkpoint", root / "train", root / "heldout"


def data_flags(train, heldout) -> list[str]:
    return ["--set", f"data.source={train / 'data.json'}", "--set", f"data.image_root={train}",
            "--set", f"finish.eval_source={heldout / 'data.json'}",
            "--set", f"finish.eval_image_root={heldout}"]  # fmt: skip


def batch_logits(model, sample) -> torch.Tensor:
    batch = model.eval().collate([sample])
    with torch.no_grad():
        embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"])
        logits, _ = model.language_model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"]
        )
    return logits


@pytest.mark.slow
def test_llava_lora_trains_adapters_scores_the_heldout_file_and_exports_merged(start, capsys):
    import visto
    from visto.data.formats import read_samples
    from visto.nn.lora import has_lora

    root, init, train, heldout = start
    run = root / "tuned"
    # Without the recipe's replay: the start's card names the world (all its tasks) while it
    # was trained on one constant answer, and half of each batch from there keeps the tiny
    # model below 0.1 at 300 steps; replay is tested in test_lora_replay and the bench below.
    args = ["train", "--recipe", "llava-lora", "--set", f"model.init_from={init}",
            *data_flags(train, heldout), "--out", str(run), *TINY, "--set", "data.replay=null"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "held-out figures: start -> trained" in out

    # The held-out file, before and after: the start model answers every question with a
    # box (VQA 0); 300 LoRA steps on the world's questions teach it answers (the tiny model
    # learns the answers' priors: its blind twin scores as well).
    before = json.loads((run / "eval-start" / "eval.json").read_text())
    after = json.loads((run / "eval.json").read_text())
    assert before["vqa.overall"] == 0.0 and after["vqa.overall"] > 0.1
    assert "blind.vqa.overall" in after and "vqa.count" in after  # scored as the world
    assert "## Example predictions" in (run / "report.md").read_text()

    # Adapters trained (and the connector, at its own lr: lora.trainable), every other
    # weight frozen as it was.
    tuned, base = visto.load(run / "checkpoint"), visto.load(init)
    assert has_lora(tuned)
    state, base_state = tuned.state_dict(), base.state_dict()
    b_norms = [state[k].norm() for k in state if "lora_B" in k]
    assert b_norms and all(n > 0 for n in b_norms)
    for key, value in state.items():
        original = key.replace(".base_layer.", ".")
        if "lora_" not in key and not key.startswith("multi_modal_projector."):
            assert torch.equal(value, base_state[original]), key

    # Exported with the adapters merged: plain weights, the same logits.
    merged = visto.load(run / "export")
    assert not has_lora(merged)
    sample = next(iter(read_samples(heldout / "data.json")))
    assert torch.allclose(batch_logits(merged, sample), batch_logits(tuned, sample), atol=1e-5)


@pytest.mark.slow
def test_llava_lora_from_a_transformers_directory_exports_one(start, capsys):
    import visto
    from visto.data.formats import read_samples
    from visto.models.transformers_format import is_transformers_dir

    root, init, train, heldout = start
    hf_start = root / "start-hf"
    assert main(["export", str(init), "--out", str(hf_start)]) == 0
    run = root / "run-hf"
    args = ["train", "--recipe", "llava-lora", "--set", f"model.init_from={hf_start}",
            *data_flags(train, heldout), "--set", "finish.eval_source=null",
            "--set", "finish.eval_image_root=null", "--set", "finish.eval_start=false",
            "--set", "finish.export=hf", "--out", str(run), *TINY, "--set", "max_steps=3"]  # fmt: skip
    # The recipe replays what the model was trained on, which a transformers directory does
    # not record: the user is told what to set.
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "a transformers directory records no training data" in err
    assert "set data.replay to null to fine-tune without replay" in err and not run.exists()
    args += ["--set", "data.replay=null"]
    assert main(args) == 0
    assert is_transformers_dir(run / "export") and not (run / "eval.json").exists()
    sample = next(iter(read_samples(heldout / "data.json")))
    exported, tuned = visto.load(run / "export"), visto.load(run / "checkpoint")
    assert torch.allclose(batch_logits(exported, sample), batch_logits(tuned, sample), atol=1e-4)


def test_bad_finish_settings_are_clear_errors(tmp_path, capsys):
    def error(*sets: str) -> str:
        args = ["train", "--recipe", "llava-lora", "--out", str(tmp_path / "r")]
        for s in sets:
            args += ["--set", s]
        assert main(args) == 2
        return capsys.readouterr().err

    assert "finish.export must be one of visto, hf or null" in error("finish.export=onnx")
    assert "finish.eval_start scores the model.init_from" in error("model.init_from=null")
    assert "finish.eval_source runs/nowhere.json does not exist" in error(
        "finish.eval_source=runs/nowhere.json", "data.replay=null"
    )
    # The recipe's replay reads the starting checkpoint's card: a missing one is named (when
    # training starts, after the recipe's own checks).
    assert "there is no checkpoint there; fix model.init_from" in error(
        f"model.init_from={tmp_path / 'nowhere'}", "finish=null"
    )
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- bench/lora_finetune.py
# The user's set of questions the model never saw (issue 18): each answer must be what the
# picture shows, or the before/after figures measure noise.

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("lora_finetune_bench", BENCH / "lora_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def obj(shape, colour, box, area, visible=1.0):
    return {"shape": shape, "colour": colour, "size": "medium", "box": box, "area": area,
            "visible": visible}  # fmt: skip


def truth(*objects):
    return {"width": 96, "height": 96, "objects": list(objects)}


# 96 px: the cell lines at 32 and 64, the margin 4.8 px. The star's centre (33, 50) is on a line.
SCENE = truth(obj("circle", "red", [5, 5, 30, 30], 500), obj("square", "blue", [70, 70, 80, 80], 100),
              obj("star", "green", [28, 45, 38, 55], 200))  # fmt: skip


def test_where_asks_the_cell_of_named_objects_clear_of_the_lines(bench):
    seen = set()
    for seed in range(30):
        for q, a, family in bench.where_questions(SCENE, random.Random(seed)):
            assert family == "where"
            assert "star" not in q  # its centre is 1 px from the line x = 32
            assert a == ("top left" if "circle" in q else "bottom right"), q
            seen.add(a)
    assert seen == {"top left", "bottom right"}
    half_hidden = truth(obj("circle", "red", [5, 5, 30, 30], 500, visible=0.7))
    assert bench.where_questions(half_hidden, random.Random(0)) == []


def test_superlatives_only_where_one_object_is_clearly_the_largest_or_smallest(bench):
    answers = set()
    for seed in range(30):
        for q, a, _ in bench.superlative_questions(SCENE, random.Random(seed)):
            expected = ("blue", "square") if "smallest" in q else ("red", "circle")
            assert a == (expected[0] if "colour" in q else expected[1]), q
            answers.add(a)
    assert answers == {"red", "circle", "blue", "square"}
    close = truth(
        obj("circle", "red", [5, 5, 30, 30], 500), obj("square", "blue", [70, 70, 80, 80], 400)
    )
    assert bench.superlative_questions(close, random.Random(0)) == []  # 1.25x: neither asked
    assert bench.superlative_questions(truth(SCENE["objects"][0]), random.Random(0)) == []


def test_cell_names_an_object_alone_in_its_cell(bench):
    answers = set()
    for seed in range(30):
        ((q, a, _),) = bench.cell_questions(SCENE, random.Random(seed))
        expected = {"in the top left": ("red", "circle"), "in the bottom right": ("blue", "square")}
        cell = q.removeprefix("What colour is the object ").removeprefix(
            "What shape is the object "
        )
        assert a == expected[cell.rstrip("?")][0 if "colour" in q else 1]
        answers.add(a)
    assert answers == {"red", "circle", "blue", "square"}
    shared = truth(
        obj("circle", "red", [5, 5, 25, 25], 400), obj("square", "blue", [8, 8, 28, 28], 100)
    )
    assert bench.cell_questions(shared, random.Random(0)) == []  # both in the top left


def test_paired_figures_count_fixed_and_broke_per_family(bench, tmp_path):
    def write(path, scores):
        path.write_text("".join(json.dumps({"id": k, "score": s, "blind_score": b}) + "\n"
                                for k, (s, b) in scores.items()))  # fmt: skip

    ids = [f"00000{i}-where-0-vqa-0" for i in range(4)] + ["000009-cell-1-vqa-0"]
    # (score, blind score) of each question, before and after
    write(
        tmp_path / "a.jsonl", dict(zip(ids, [(0, 0), (0, 0), (1, 0), (0, 1), (1, 0)], strict=True))
    )
    write(
        tmp_path / "b.jsonl", dict(zip(ids, [(1, 0), (1, 1), (1, 0), (0, 0), (0, 0)], strict=True))
    )
    figures = bench.paired_figures(tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    assert figures["where"] == {
        "questions": 4, "before": 0.25, "after": 0.75, "fixed": 2, "broke": 0,
        "sign_test_p": 0.5, "blind_before": 0.25, "blind_after": 0.25, "blind_fixed": 1,
        "blind_broke": 1, "blind_sign_test_p": 1.0,
    }  # fmt: skip
    assert (figures["cell"]["fixed"], figures["cell"]["broke"]) == (0, 1)
    assert (figures["all"]["fixed"], figures["all"]["broke"]) == (2, 1)
    assert bench.exact_sign_test(20, 12) == pytest.approx(0.21533, abs=1e-5)  # McNemar, exact
    assert bench.exact_sign_test(10, 0) == pytest.approx(0.001953, abs=1e-6)
    assert bench.exact_sign_test(0, 0) == 1.0


@pytest.mark.slow
def test_bench_trains_on_new_questions_with_replay_and_scores_old_and_new(start, bench, tmp_path):
    """The bench end to end on the tiny model: parquet files written by `datasets`, the
    recipe from the CLI, the new and the old held-out questions before and after."""
    root, init, _, _ = start
    world = root / "world"
    out, figures_file = tmp_path / "bench", tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "lora_finetune.py"), "--model", str(init), "--n", "120", "--size", "48",
         "--steps", "3", "--batch", "4", "--eval-n", "12", "--replay", "0.5", "--out", str(out),
         "--json", str(figures_file)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(figures_file.read_text())
    # Replay through the recipe: the parquet holds the new questions only, and the run drew
    # half its samples from what the start checkpoint was trained on (its card's world).
    assert set(figures["rows"]["train"]) <= set(bench.FAMILIES)
    assert figures["replay_from"] == "init_from"
    assert [(r["source"], r["share"]) for r in figures["replayed"]] == [(str(world), 0.5)]
    assert set(figures["rows"]["heldout"]) <= set(bench.FAMILIES)
    assert "exist" in figures["rows"]["heldout_vqa"]
    for paired, run in ((figures["paired"], out / "run"),
                        (figures["old_vqa"]["paired"], out / "run" / "old")):  # fmt: skip
        scored = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
        assert paired["all"]["questions"] == len(scored) == 12
        assert paired["all"]["after"] == pytest.approx(
            sum(r["score"] for r in scored) / 12, abs=1e-4
        )
    assert figures["steps"] == 3 and figures["last_loss"] is not None


@pytest.mark.slow
def test_bench_levers_share_the_starts_evaluations(start, bench, tmp_path):
    """Levers measured one at a time (--set) against one baseline: the starting model is
    scored once into --start and reused, the trained one by the bench (RUN/new, RUN/old, no
    blind twins), the old questions --old-n; another model or size in the same --start is
    refused."""
    root, init, _, _ = start
    data, shared = tmp_path / "data", tmp_path / "start"

    def run(name: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(BENCH / "lora_finetune.py"), "--model", str(init), "--n", "120",
             "--size", "48", "--steps", "2", "--batch", "4", "--eval-n", "8", "--old-n", "10",
             "--replay", "0.5", "--data", str(data), "--start", str(shared), "--no-blind",
             "--out", str(tmp_path / name), "--json", str(tmp_path / f"{name}.json"), *extra],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    first = run("base")
    assert first.returncode == 0, first.stdout + first.stderr
    scored_at = (shared / "new" / "eval.json").stat().st_mtime_ns
    second = run("rank2", "--set", "lora.rank=2", "--set", "lora.alpha=4")
    assert second.returncode == 0, second.stdout + second.stderr
    assert (shared / "new" / "eval.json").stat().st_mtime_ns == scored_at  # not scored again
    figures = json.loads((tmp_path / "rank2.json").read_text())
    assert figures["lora"]["rank"] == 2 and figures["settings"] == ["lora.rank=2", "lora.alpha=4"]
    # the recipe's default: the connector trained at a tenth of the lr
    assert figures["lora"]["trainable"] == ["multi_modal_projector"]
    assert figures["module_lrs"] == {"multi_modal_projector": 0.0001}
    assert figures["old_vqa"]["paired"]["all"]["questions"] == 10
    assert figures["paired"]["all"]["questions"] == 8
    assert "blind_before" not in figures["paired"]["all"]  # --no-blind
    assert figures["summary"]["old.all"].endswith("n 10)") and "new.all" in figures["summary"]
    for path in ("run/new/eval.json", "run/old/eval.json"):
        assert (tmp_path / "rank2" / path).exists()
    assert not (tmp_path / "rank2" / "run" / "eval-start").exists()  # the recipe only trained

    # A run short of its budget (as one cut by a timeout's SIGINT; here its budget raised by
    # a step) goes on under --reuse, and the trained model is scored again, not kept.
    recipe_file = tmp_path / "rank2" / "run" / "config.json"
    recipe_file.write_text(json.dumps(json.loads(recipe_file.read_text()) | {"max_steps": 3}))
    scored = {p: (tmp_path / "rank2" / "run" / p / "eval.json").stat().st_mtime_ns
              for p in ("new", "old")}  # fmt: skip
    again = run("rank2", "--set", "lora.rank=2", "--set", "lora.alpha=4", "--reuse")
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads((tmp_path / "rank2.json").read_text())["last_step"] == 3
    for p, mtime in scored.items():
        assert (tmp_path / "rank2" / "run" / p / "eval.json").stat().st_mtime_ns != mtime, p
    assert (shared / "new" / "eval.json").stat().st_mtime_ns == scored_at

    refused = run("other", "--eval-n", "9")
    assert refused.returncode != 0 and "holds the evaluations of other settings (eval_n" in refused.stderr
