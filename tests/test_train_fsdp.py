"""FSDP2 under torchrun, on the CPU with gloo and 2 processes (recipe `distributed: "fsdp"`):
the loss curve of one process, checkpoints gathered whole, a rank killed with SIGKILL and
the run resumed on the same curve, and a resume on another number of processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from test_train_fixture import TinyConfig, TinyModel, tiny_source

TESTS = Path(__file__).parent
STEPS = 20


class TinyStack(TinyModel):
    """The fixture model with a ModuleList of residual blocks: FSDP's sharding units."""

    family = "tinystack"

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.blocks = nn.ModuleList(nn.Linear(config.hidden, config.hidden) for _ in range(2))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.body(self.stem(batch["pixels"]).mean(dim=1))
        for block in self.blocks:
            x = x + block(x)
        logits = self.head(x)
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        return {"loss": loss, "acc": (logits.argmax(-1) == batch["labels"]).float().mean()}


def register_tiny_stack() -> None:
    from visto.models import FAMILIES

    FAMILIES["tinystack"] = (TinyConfig, TinyStack)


class KillAfter:
    """A sample source that kills the process that made it (SIGKILL: no cleanup, no
    checkpoint) once it has been read for `n` training samples (read in that process or in
    its data worker, data.prefetch)."""

    def __init__(self, source, n: int) -> None:
        self.source, self.n, self.given = source, n, 0
        self.trainer = os.getpid()

    def __call__(self, role: str):
        for sample in self.source(role):
            if role == "train":
                self.given += 1
                if self.given > self.n:
                    os.kill(self.trainer, signal.SIGKILL)
            yield sample


def recipe(batch_size: int, **extra) -> dict:
    # No dropout, no shuffle: 2 processes of 4 samples see the batches of 1 process of 8.
    return {
        "model": {"family": "tinystack", "config": {"hidden": 8, "dropout": 0.0}},
        "data": {"shuffle_buffer": 1}, "optim": {"lr": 0.05}, "batch_size": batch_size,
        "max_steps": STEPS, "log_every": 1, "eval_every": None, "eval_batches": 2,
        "checkpoint_every": 10, "num_threads": 1, **extra,
    }  # fmt: skip


SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
from test_train_fixture import tiny_source
from test_train_fsdp import KillAfter, register_tiny_stack
from visto.train.distributed import leave_process_group
from visto.train.loop import train
from visto.train.recipe import recipe_from_dict

register_tiny_stack()
source = tiny_source(n_train=40)
if {kill_after} and os.environ.get("RANK") == "1":
    source = KillAfter(source, {kill_after})
train(recipe_from_dict({recipe!r}), {run!r}, resume={resume}, source=source, show_progress=False)
leave_process_group()
"""


def launch(tmp_path, run: Path, spec: dict, *, procs: int = 2, resume: bool = False,
           kill_after: int = 0) -> subprocess.CompletedProcess:  # fmt: skip
    script = tmp_path / f"fsdp_{run.name}_{int(resume)}.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), recipe=spec, run=str(run), resume=resume,
                                    kill_after=kill_after))  # fmt: skip
    command = [sys.executable, str(script)]
    if procs > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", str(procs), str(script)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in train_rows]


def assert_same_curve(a: list[float], b: list[float], rtol: float = 1e-4) -> None:
    assert a == pytest.approx(b, rel=rtol), [f"{x:.6f} {y:.6f}" for x, y in zip(a, b, strict=True)]


@pytest.mark.slow
def test_fsdp_on_two_processes_matches_one_and_resumes_after_a_rank_is_killed(tmp_path):
    from visto.checkpoint import load, load_trainer_state

    register_tiny_stack()
    one = tmp_path / "one"
    proc = launch(tmp_path, one, recipe(8), procs=1)
    assert proc.returncode == 0, proc.stderr[-3000:]

    sharded = tmp_path / "fsdp"
    proc = launch(tmp_path, sharded, recipe(4, distributed="fsdp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_curve(losses(sharded), losses(one))
    # The checkpoint holds the whole model, not a shard, with the one-process weights.
    whole, reference = load(sharded / "checkpoint"), load(one / "checkpoint")
    for name, tensor in reference.state_dict().items():
        assert torch.allclose(whole.state_dict()[name], tensor, rtol=1e-4, atol=1e-6), name
    state = load_trainer_state(sharded / "checkpoint")
    assert len(state["ranks"]) == 2 and state["step"] == STEPS
    assert set(state["optimizer"]["state"]) == set(range(len(list(whole.parameters()))))

    # Rank 1 dies with SIGKILL during step 14 (after the checkpoint at step 10); the run
    # resumes from it and ends on the uninterrupted curve.
    killed = tmp_path / "killed"
    # (each rank reads the whole source and keeps every other sample: 8 read a step)
    proc = launch(tmp_path, killed, recipe(4, distributed="fsdp"), kill_after=14 * 8)
    assert proc.returncode != 0
    logged = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    # Its data worker reads up to data.prefetch (2) batches ahead: it died in step 12 to 14,
    # after its checkpoint.
    assert 11 <= logged[-1]["step"] <= 13
    assert load_trainer_state(killed / "checkpoint")["step"] == 10
    proc = launch(tmp_path, killed, recipe(4, distributed="fsdp"), resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_curve(losses(killed), losses(sharded), rtol=1e-6)

    # The step-10 checkpoint of a 2-process FSDP run resumes in one process, and the other
    # way round (different shards, the same whole checkpoint).
    for source, procs in ((killed, 1), (one, 2)):
        moved = tmp_path / f"moved-{procs}"
        (moved / "checkpoint").mkdir(parents=True)
        for path in (source / "checkpoints" / "step_10").iterdir():
            (moved / "checkpoint" / path.name).write_bytes(path.read_bytes())
        (moved / "config.json").write_text((source / "config.json").read_text())
        (moved / "metrics.jsonl").write_text("")
        spec = recipe(8 // procs, distributed="fsdp")
        proc = launch(tmp_path, moved, spec, procs=procs, resume=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert load_trainer_state(moved / "checkpoint")["step"] == STEPS


def test_an_unknown_distributed_mode_is_refused():
    from visto.errors import UserError
    from visto.train.recipe import recipe_from_dict

    with pytest.raises(UserError, match='distributed must be "ddp" or "fsdp"'):
        recipe_from_dict({"model": {"family": "tiny"}, "distributed": "zero3"})


def test_fsdp_leaves_a_single_process_run_as_it_is(tmp_path):
    from visto.train.loop import train
    from visto.train.recipe import recipe_from_dict

    register_tiny_stack()
    spec = recipe(8, distributed="fsdp", max_steps=2, checkpoint_every=None)
    result = train(recipe_from_dict(spec), tmp_path / "run", source=tiny_source(40),
                   show_progress=False)  # fmt: skip
    assert result.step == 2 and not hasattr(result.model, "unshard")


@pytest.mark.slow
def test_visto_train_under_torchrun_shards_a_llava_with_lora_and_resumes_in_one_process(
    tmp_path, capsys
):
    import foreign_data
    from test_train_foreign_data import tiny_llava_recipe
    from visto.checkpoint import load
    from visto.cli import main
    from visto.nn.lora import has_lora

    data, images = foreign_data.write_llava_mix(tmp_path)
    recipe_path = tiny_llava_recipe(tmp_path / "recipe.json", data, image_root=str(images))
    lora = '{"rank": 4, "targets": ["q_proj", "v_proj"], "trainable": ["multi_modal_projector"]}'
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", "-m", "visto.cli", "train", "--recipe", recipe_path, "--out", str(run),
               "--no-progress", "--set", "distributed=fsdp", "--set", "max_steps=3",
               "--set", f"lora={lora}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout and has_lora(load(run / "checkpoint"))
    assert main(["train", "--resume", str(run), "--set", "max_steps=5", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5]
