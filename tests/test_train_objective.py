"""A recipe's `model.objective`: the loop trains the named loss method of a family with several,
in one process and under torchrun with DDP and FSDP (which act on a module's forward), on the
same loss curve."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train_fixture import TinyConfig
from test_train_fsdp import STEPS, TinyStack, assert_same_curve, losses, recipe
from visto.errors import UserError
from visto.models.common import Objective
from visto.train.objective import FORWARD, select_objective

TESTS = Path(__file__).parent


class TwoWay(TinyStack):
    """TinyStack whose loss is a named objective; its forward must not be called."""

    family = "twoway"
    OBJECTIVES = {"plain": Objective(loss="plain_loss", batches="plain_batch")}
    default_objective = "plain"

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise AssertionError("the loop must call the recipe's objective, not forward")

    def plain_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return TinyStack.forward(self, batch)

    def collate(self, samples):
        raise AssertionError("the loop must make the objective's batches, not collate's")

    def plain_batch(self, samples):
        return TinyStack.collate(self, samples)


def register_two_way() -> None:
    from visto.models import FAMILIES

    FAMILIES["twoway"] = (TinyConfig, TwoWay)


def test_a_family_with_one_way_to_train_takes_no_objective():
    plain = TinyStack(TinyConfig())
    assert select_objective(plain, None) == FORWARD
    with pytest.raises(UserError, match="trains one way"):
        select_objective(plain, "plain")


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_train_fixture import tiny_source
from test_train_objective import register_two_way
from visto.train.distributed import leave_process_group
from visto.train.loop import train
from visto.train.recipe import recipe_from_dict

register_two_way()
train(recipe_from_dict({recipe!r}), {run!r}, source=tiny_source(n_train=40), show_progress=False)
leave_process_group()
"""


def run(tmp_path: Path, name: str, spec: dict, procs: int) -> Path:
    out = tmp_path / name
    script = tmp_path / f"{name}.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), recipe=spec, run=str(out)))
    command = [sys.executable, str(script)]
    if procs > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", str(procs), str(script)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_named_objective_trains_alike_in_one_process_and_under_ddp_and_fsdp(tmp_path):
    def spec(batch_size: int, **extra) -> dict:
        out = recipe(batch_size, grad_accum=2, checkpoint_every=None, **extra)
        out["model"] = {**out["model"], "family": "twoway", "objective": "plain"}
        return out

    one = losses(run(tmp_path, "one", spec(8), procs=1))
    assert len(one) == STEPS and one[-1] < one[0]
    assert_same_curve(losses(run(tmp_path, "ddp", spec(4, distributed="ddp"), procs=2)), one)
    assert_same_curve(losses(run(tmp_path, "fsdp", spec(4, distributed="fsdp"), procs=2)), one)
