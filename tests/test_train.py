"""The training loop: schedule, frozen modules and per-module lrs, grad accumulation, resume,
run directory (metrics.jsonl, checkpoints, report, plots), data stream, recipes."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from test_train_fixture import TinyConfig, TinyModel, make_samples, tiny_family, tiny_source  # noqa: F401
from visto.checkpoint import load
from visto.errors import UserError
from visto.train.data import BatchStream, buffered_shuffle
from visto.train.loop import train, train_step
from visto.train.optim import (
    build_optimizer,
    build_param_groups,
    lr_factor,
    schedule_progress,
)
from visto.train.recipe import (
    Recipe,
    apply_overrides,
    load_recipe,
    parse_override,
    recipe_from_dict,
)

pytestmark = pytest.mark.usefixtures("tiny_family")


def tiny_recipe(**overrides) -> Recipe:
    data = {
        "name": "tiny-test",
        "model": {"family": "tiny", "config": {"hidden": 8, "dropout": 0.1}},
        "optim": {"lr": 0.05, "weight_decay": 0.01},
        "schedule": {"warmup_steps": 2, "min_lr_ratio": 0.1},
        "batch_size": 8, "max_steps": 8, "log_every": 1, "eval_every": 4, "eval_batches": 2,
        "seed": 3, "num_threads": 1,
    }
    return recipe_from_dict(data, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def read_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- schedule


def test_warmup_then_cosine_to_min_lr():
    recipe = tiny_recipe(max_steps=12, **{"schedule.warmup_steps": 2, "schedule.min_lr_ratio": 0.1})
    factors = [lr_factor(s, schedule_progress(recipe, s, 0.0), 2, 0.1) for s in range(12)]
    assert factors[0] == pytest.approx(0.5) and factors[1] == pytest.approx(1.0)
    assert factors[2] == pytest.approx(1.0)  # cosine starts at its top
    mid = 2 + 5  # half way through the 10 post-warmup steps
    assert factors[mid] == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))
    assert lr_factor(12, schedule_progress(recipe, 12, 0.0), 2, 0.1) == pytest.approx(0.1)


def test_time_budget_drives_the_schedule():
    recipe = tiny_recipe(max_steps=None, max_minutes=2.0, **{"schedule.warmup_steps": 0})
    assert schedule_progress(recipe, 5, 60.0) == pytest.approx(0.5)
    assert schedule_progress(recipe, 5, 500.0) == 1.0
    both = tiny_recipe(max_steps=100, max_minutes=2.0, **{"schedule.warmup_steps": 0})
    assert schedule_progress(both, 80, 60.0) == pytest.approx(0.8)  # whichever is further along


# ----------------------------------------------------------------------------- parameters


def test_module_lrs_longest_prefix_wins_and_decay_only_on_matrices():
    model = TinyModel(TinyConfig())
    groups = build_param_groups(model, 1e-3, {"stem": 1e-2, "stem.bias": 5e-2, "body": 2e-3}, 0.1)
    lr_of = {name: (g["lr"], g["weight_decay"]) for g in groups for name in g["names"]}
    assert lr_of["stem.weight"] == (1e-2, 0.1)
    assert lr_of["stem.bias"] == (5e-2, 0.0)
    assert lr_of["body.2.weight"] == (2e-3, 0.0)  # LayerNorm gain: 1-d, not decayed
    assert lr_of["embed.weight"] == (1e-3, 0.1)  # tied with head.weight: listed once
    assert "head.weight" not in lr_of


def test_unknown_prefix_and_conflicting_tied_lrs_are_user_errors():
    model = TinyModel(TinyConfig())
    with pytest.raises(UserError, match="match no parameter.*stem"):
        build_param_groups(model, 1e-3, {"vision": 0.0}, 0.1)
    with pytest.raises(UserError, match="tied weight"):
        build_param_groups(model, 1e-3, {"head": 0.0}, 0.1)
    with pytest.raises(UserError, match="nothing to train"):
        build_param_groups(model, 0.0, {}, 0.1)


def test_modules_the_model_locks_itself_stay_out_of_the_optimizer():
    model = TinyModel(TinyConfig())
    model.stem.requires_grad_(False)  # as CLIP's lock_image does for its tower
    groups = build_param_groups(model, 1e-3, {}, 0.1)
    names = {name for g in groups for name in g["names"]}
    assert "stem.weight" not in names and "embed.weight" in names
    assert not model.stem.weight.requires_grad


def test_frozen_modules_get_no_gradient_no_state_and_stay_bit_identical():
    torch.manual_seed(0)
    model = TinyModel(TinyConfig(dropout=0.0))
    recipe = tiny_recipe(**{"optim.module_lrs": {"stem": 0, "body.2": 0.0}})
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("stem", "body"))}
    trained_before = model.embed.weight.detach().clone()
    optimizer = build_optimizer(model, recipe)
    batch = model.collate(make_samples(8, seed=0))
    for _ in range(3):
        train_step(model, optimizer, [batch], 1.0, torch.device("cpu"))
    assert not model.stem.weight.requires_grad and model.stem.weight.grad is None
    assert model.body[2].weight.grad is None
    frozen_ids = {id(p) for p in (*model.stem.parameters(), *model.body.parameters())}
    assert not frozen_ids & {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not frozen_ids & {id(p) for p in optimizer.state}
    for k, v in model.state_dict().items():
        if k in frozen_before:
            assert torch.equal(v, frozen_before[k]), k
    assert not torch.equal(model.embed.weight, trained_before)  # the rest did train


def test_grad_accumulation_matches_one_big_batch():
    samples = make_samples(16, seed=4)
    results = []
    for micro in ([samples], [samples[:8], samples[8:]]):
        torch.manual_seed(0)
        model = TinyModel(TinyConfig(dropout=0.0))
        optimizer = build_optimizer(model, tiny_recipe())
        out = train_step(model, optimizer, [model.collate(m) for m in micro], None, torch.device("cpu"))
        results.append((out, {k: v.clone() for k, v in model.state_dict().items()}))
    (big, big_w), (acc, acc_w) = results
    assert acc["loss"] == pytest.approx(big["loss"], rel=1e-6)
    assert acc["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-5)
    for k in big_w:
        torch.testing.assert_close(acc_w[k], big_w[k], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- data


def test_batch_stream_is_seeded_repeats_epochs_and_resumes_mid_epoch():
    samples = make_samples(10, seed=0)
    ids = lambda batch: [s.id for s in batch]  # noqa: E731

    def stream(**kw):
        return BatchStream(lambda role: iter(samples), "train", ids, 4, seed=1, shuffle_buffer=4, **kw)

    a, b = stream(), stream()
    first = [next(a) for _ in range(5)]  # 20 samples = two epochs of 10
    assert first == [next(b) for _ in range(5)]
    flat = [i for batch in first for i in batch]
    assert sorted(flat[:10]) == sorted(s.id for s in samples) == sorted(flat[10:])
    assert flat[:10] != flat[10:]  # each epoch is shuffled differently

    c = stream()
    next(c), next(c)
    resumed = stream(state=c.state())
    assert [next(resumed) for _ in range(3)] == first[2:]

    shards = [stream(rank=r, world_size=2) for r in range(2)]
    seen = [set(next(s)) for s in shards]
    assert not seen[0] & seen[1]


def test_buffered_shuffle_keeps_every_item():
    import random

    out = list(buffered_shuffle(iter(range(100)), 7, random.Random(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))


# ----------------------------------------------------------------------------- the run


def test_run_writes_metrics_checkpoints_report_and_plots(tmp_path):
    run = tmp_path / "run"
    result = train(tiny_recipe(checkpoint_every=3, keep_checkpoints=2), run,
                   source=tiny_source(), show_progress=False)
    assert result.step == 8
    rows = read_rows(run)
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert [r["step"] for r in val_rows] == [4, 8]
    for row in train_rows:
        assert {"loss", "acc", "lr", "samples_per_s", "elapsed_s", "grad_norm"} <= set(row)
        assert math.isfinite(row["loss"]) and row["samples_per_s"] > 0
    assert {"loss", "acc"} <= set(val_rows[-1])
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # it learns the colours

    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 0.05
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_3", "step_6"]
    model = load(run / "checkpoint")
    for k, v in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert "| acc |" in (run / "checkpoint" / "README.md").read_text()
    for name in ("loss", "acc"):
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{name}.png" in (run / "report.md").read_text()

    with pytest.raises(UserError, match="already holds a run"):
        train(tiny_recipe(), run, source=tiny_source(), show_progress=False)


def test_resume_continues_with_the_same_loss_curve(tmp_path):
    recipe = tiny_recipe(max_steps=9, checkpoint_every=4, keep_checkpoints=3, grad_accum=2,
                         log_every=3, **{"data.shuffle_buffer": 5})
    full = tmp_path / "full"
    train(recipe, full, source=tiny_source(n_train=20), show_progress=False)

    # An interrupted run: what the full run looked like when its step-4 checkpoint was the
    # latest, with rows it logged after step 4 (lost work) still in metrics.jsonl.
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(full / "config.json", cut / "config.json")
    shutil.copytree(full / "checkpoints" / "step_4", cut / "checkpoint")
    rows = read_rows(full)
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 6))

    result = train(recipe, cut, resume=True, source=tiny_source(n_train=20), show_progress=False)
    assert result.step == 9

    def curve(run):
        return [(r["step"], r["split"], r["loss"], r.get("acc"), r.get("lr")) for r in read_rows(run)]

    assert curve(cut) == curve(full)
    for k, v in load(full / "checkpoint").state_dict().items():
        assert torch.equal(load(cut / "checkpoint").state_dict()[k], v), k


@pytest.mark.parametrize("prefetch", [0, 2])
def test_ctrl_c_saves_a_checkpoint_that_resumes_the_same_curve(tmp_path, prefetch):
    import os
    import signal

    recipe = tiny_recipe(max_steps=6, eval_every=None,
                         **{"data.shuffle_buffer": 4, "data.prefetch": prefetch})  # fmt: skip
    full = tmp_path / "full"
    train(recipe, full, source=tiny_source(), show_progress=False)

    samples = tiny_source()
    taken = {"train": 0}
    trainer = os.getpid()  # the data may be read in a worker process (data.prefetch)

    def interrupted_once(role):
        for sample in samples(role):
            if role == "train":
                taken["train"] += 1
                # Step k reads up to sample 8k + 4 (4 wait in the shuffle buffer): so this
                # is during step 3, as if Ctrl-C was pressed then.
                if taken["train"] == 8 * 2 + 4 + 3:
                    os.kill(trainer, signal.SIGINT)
            yield sample

    cut = tmp_path / "cut"
    first = train(recipe, cut, source=interrupted_once, show_progress=False)
    assert first.stopped_early  # finished the step, saved, stopped
    # Read ahead by a worker, sample 23 is read up to `prefetch` batches before step 3 runs;
    # the checkpoint holds the position of the last batch trained on, not the worker's.
    assert first.step == 3 if not prefetch else 1 <= first.step <= 3
    train(recipe, cut, resume=True, source=tiny_source(), show_progress=False)
    def untimed(run):
        return [{k: v for k, v in r.items() if k not in ("samples_per_s", "elapsed_s")}
                for r in read_rows(run)]

    assert untimed(cut) == untimed(full)


def test_wall_clock_budget_stops_the_run(tmp_path):
    # log_every beyond any step count a 0.6 s run reaches: the only train row is the partial window
    recipe = tiny_recipe(max_steps=None, max_minutes=0.01, log_every=10**9, eval_every=None)
    result = train(recipe, tmp_path / "run", source=tiny_source(), show_progress=False)
    rows = read_rows(tmp_path / "run")
    assert result.step >= 1 and rows[0]["step"] == result.step  # the partial window is logged
    assert rows[0]["elapsed_s"] >= 0.6
    assert rows[0]["lr"] < 0.05 * 0.7  # the clock, not the step count, drove the cosine down
    assert rows[-1]["split"] == "val"


def test_a_minutes_cap_reports_the_steps_it_cut(tmp_path, capsys):
    from rich.console import Console

    # max_steps is the budget; a cap far below it stops the run and says by how much.
    recipe = tiny_recipe(max_steps=10**6, max_minutes=0.01, log_every=10**9, eval_every=None)
    console = Console(record=True, width=200)
    result = train(recipe, tmp_path / "run", source=tiny_source(), console=console, show_progress=False)
    assert result.steps_cut == 10**6 - result.step > 0
    assert f"stopped training at step {result.step} of max_steps 1000000: {result.steps_cut} steps cut" in (
        console.export_text()
    )
    card = (tmp_path / "run" / "checkpoint" / "README.md").read_text()
    assert f"| steps_cut | {result.steps_cut} |" in card
    assert f"| steps_cut | {result.steps_cut:,} |" in (tmp_path / "run" / "report.md").read_text()
    # A run that ends on its step budget cut nothing.
    assert train(tiny_recipe(), tmp_path / "full", source=tiny_source(), show_progress=False).steps_cut == 0


def test_a_diverging_loss_stops_with_a_clear_error(tmp_path):
    recipe = tiny_recipe(**{"optim.lr": 1e30, "optim.grad_clip": None, "schedule.warmup_steps": 0})
    with pytest.raises(UserError, match="loss became"):
        train(recipe, tmp_path / "run", source=tiny_source(), show_progress=False)


def test_extend_a_finished_run_with_resume(tmp_path):
    run = tmp_path / "run"
    train(tiny_recipe(max_steps=4), run, source=tiny_source(), show_progress=False)
    result = train(tiny_recipe(max_steps=6), run, resume=True, source=tiny_source(), show_progress=False)
    assert result.step == 6
    assert [r["step"] for r in read_rows(run) if r["split"] == "train"] == list(range(1, 7))
    with pytest.raises(UserError, match="already used its budget"):
        train(tiny_recipe(max_steps=6), run, resume=True, source=tiny_source(), show_progress=False)


def test_start_from_a_checkpoint_with_a_frozen_module(tmp_path):
    first = train(tiny_recipe(max_steps=2), tmp_path / "a", source=tiny_source(), show_progress=False)
    recipe = tiny_recipe(max_steps=3, **{"model.init_from": str(tmp_path / "a" / "checkpoint"),
                                         "optim.module_lrs": {"stem": 0}})
    second = train(recipe, tmp_path / "b", source=tiny_source(), show_progress=False)
    assert torch.equal(second.model.stem.weight, first.model.stem.weight)
    assert not torch.equal(second.model.embed.weight, first.model.embed.weight)


# ----------------------------------------------------------------------------- recipes


def test_every_shipped_recipe_budgets_in_steps():
    """Steps, not minutes: the same recipe and seed give the same model on any machine."""
    from visto.train.recipe import list_recipes

    for name in list_recipes():
        recipe = load_recipe(name)
        assert recipe.max_steps is not None and recipe.max_steps <= 5000, name
        assert recipe.max_minutes is None, f"{name}: max_minutes is a cap for --set, not a budget"


def test_recipe_overrides_and_validation(tmp_path):
    assert parse_override("optim.lr=3e-4") == (["optim", "lr"], 3e-4)
    assert parse_override("data.source=runs/world") == (["data", "source"], "runs/world")
    assert parse_override("optim.module_lrs.vision.encoder=0") == (["optim", "module_lrs", "vision.encoder"], 0)
    data = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=2", "model.config.width=16"])
    assert data == {"optim": {"lr": 2}, "model": {"config": {"width": 16}}}

    path = tmp_path / "r.json"
    path.write_text(json.dumps({"model": {"family": "tiny"}, "optim": {"lr": 1}}))
    recipe = load_recipe(str(path), ["optim.module_lrs.stem=0", "max_minutes=1.5"])
    assert recipe.name == "r" and recipe.optim.lr == 1.0 and recipe.optim.module_lrs == {"stem": 0}
    assert recipe.max_minutes == 1.5

    with pytest.raises(UserError, match="unknown setting.*'lrr'"):
        load_recipe(str(path), ["optim.lrr=1"])
    with pytest.raises(UserError, match="divisible"):
        load_recipe(str(path), ["batch_size=6", "grad_accum=4"])
    with pytest.raises(UserError, match="budget"):
        load_recipe(str(path), ["max_steps=null"])
    with pytest.raises(UserError, match="no recipe named 'nope'"):
        load_recipe("nope")


# ----------------------------------------------------------------------------- the command


def test_cli_trains_on_llava_files_then_resumes(tmp_path, capsys):
    from visto.cli import main
    from visto.data.formats import write_samples

    write_samples(make_samples(24, seed=0), tmp_path / "train-data", "llava")
    write_samples(make_samples(8, seed=0, split="val"), tmp_path / "val-data", "llava")
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({
        "description": "a tiny colour classifier",
        "model": {"family": "tiny", "config": {"hidden": 8}},
        "data": {"source": str(tmp_path / "train-data"), "val_source": str(tmp_path / "val-data")},
        "batch_size": 8, "max_steps": 3, "log_every": 1, "eval_every": 2, "num_threads": 1,
    }))
    run = tmp_path / "runs" / "tiny"
    args = ["train", "--recipe", str(recipe), "--out", str(run), "--no-progress"]
    assert main(args + ["--set", "optim.lr=0.02"]) == 0
    out = capsys.readouterr().out
    assert '"lr": 0.02' in out and "report:" in out  # the resolved recipe is printed
    rows = read_rows(run)
    assert [r["step"] for r in rows if r["split"] == "val"] == [2, 3]

    assert main(args) == 2  # refuses to overwrite a run
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--set", "max_steps=5", "--no-progress"]) == 0
    assert [r["step"] for r in read_rows(run) if r["split"] == "train"] == [1, 2, 3, 4, 5]
    assert main(["train", "--recipe", "no-such-recipe"]) == 2
    assert "no recipe named" in capsys.readouterr().err


DDP_SCRIPT = """
import hashlib, json, os, sys
import torch
sys.path.insert(0, {tests!r})
from test_train_fixture import TinyConfig, TinyModel, tiny_source
from visto.models import FAMILIES
from visto.train.distributed import leave_process_group
from visto.train.loop import train
from visto.train.recipe import recipe_from_dict

FAMILIES["tiny"] = (TinyConfig, TinyModel)
recipe = recipe_from_dict({recipe!r})
train(recipe, {run!r}, source=tiny_source(n_train=40), show_progress=False)
recipe.max_steps = 6  # then resume it, across both ranks, for two more steps
result = train(recipe, {run!r}, resume=True, source=tiny_source(n_train=40), show_progress=False)
digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in result.model.state_dict().values()))
with open(os.path.join({run!r}, "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump({{"digest": digest.hexdigest(), "step": result.step, "val": result.val_metrics}}, f)
leave_process_group()  # as `visto train` does: without it a rank can abort at exit
"""


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tmp_path):
    """torchrun --nproc_per_node 2 with gloo: train, resume; both ranks end with the same weights."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    run = tmp_path / "run"
    recipe = {
        "model": {"family": "tiny", "config": {"hidden": 8}},
        "optim": {"lr": 0.05}, "batch_size": 4, "grad_accum": 2, "max_steps": 4,
        "log_every": 2, "eval_every": 2, "checkpoint_every": 2, "num_threads": 1,
    }
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), recipe=recipe, run=str(run)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script)],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # DDP kept the replicas identical
    assert ranks[0]["step"] == ranks[1]["step"] == 6
    assert ranks[0]["val"] == ranks[1]["val"] and "acc" in ranks[0]["val"]  # reduced over ranks
    rows = read_rows(run)
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4, 6]  # rank 0 alone writes
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert len(state["ranks"]) == 2 and state["ranks"][0]["rng"] != state["ranks"][1]["rng"]
    assert load(run / "checkpoint").stem.weight.shape == (8, 3)


def test_data_section_errors_and_no_validation(tmp_path):
    from visto.data.formats import write_samples
    from visto.train.data import source_from_spec

    with pytest.raises(UserError, match="names no data"):
        source_from_spec(tiny_recipe().data, 0)
    write_samples(make_samples(16, seed=0), tmp_path / "data", "llava")
    with pytest.raises(UserError, match="tasks of the synthetic world"):
        source_from_spec(tiny_recipe(**{"data.source": str(tmp_path / "data"), "data.tasks": ["vqa"]}).data, 0)
    recipe = tiny_recipe(max_steps=2, **{"data.source": str(tmp_path / "data")})
    source, has_val = source_from_spec(recipe.data, 0)
    assert not has_val and len(list(source("train"))) == 16
    train(recipe, tmp_path / "run", show_progress=False)  # no val_source: trains, never evaluates
    assert {r["split"] for r in read_rows(tmp_path / "run")} == {"train"}
