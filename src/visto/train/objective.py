"""What a training run computes: the recipe's `model.objective` names one of the family's
training objectives (BLIP-2: "representation", stage 1's ITC/ITM/ITG losses on image-caption
pairs; "generative", stage 2's LM loss on conversations), and the loop calls that objective's
loss and batch methods by name. Families with one way to train have no `OBJECTIVES`: their
`forward` is the loss and `collate` makes its batches.

DDP and FSDP act on a module's forward call, so a named loss method runs as the forward of a
thin `ObjectiveLoss` module (and, under FSDP, is registered as a forward method of the
sharded model, which gathers the parameters for it as for `forward`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from visto.errors import UserError
from visto.models.common import Objective

FORWARD = Objective(loss="forward", batches="collate")


def select_objective(model: nn.Module, name: str | None) -> Objective:
    """The objective `name` of `model`'s family; None = the one the model's config implies
    (recipes written before `model.objective` existed keep training as they did)."""
    objectives: dict[str, Objective] | None = getattr(model, "OBJECTIVES", None)
    if objectives is None:
        if name is not None:
            raise UserError(
                f"model.objective is {name!r} but a {model.family} model trains one way (its "
                "forward); leave model.objective null"
            )
        return FORWARD
    implied = model.default_objective
    if name is None:
        return objectives[implied]
    if name not in objectives:
        raise UserError(
            f"unknown model.objective {name!r} for {model.family}; choose one of "
            f"{', '.join(objectives)}"
        )
    if name != implied:
        # The saved config must say how the checkpoint was trained.
        raise UserError(
            f"model.objective is {name!r} but model.config.losses {model.config.losses} train "
            f"{implied!r}; make them agree"
        )
    return objectives[name]


class ObjectiveLoss(nn.Module):
    """`model.<objective.loss>(batch)` as this module's forward (the model is its only child)."""

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return getattr(self.model, self.objective.loss)(batch)


def loss_module(model: nn.Module, objective: Objective, sharded: bool) -> nn.Module:
    """The module whose forward is the objective's loss: the model itself for `forward`."""
    if objective.loss == FORWARD.loss:
        return model
    if sharded:
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, objective.loss)
    return ObjectiveLoss(model, objective)


def fsdp_root(model: nn.Module) -> nn.Module:
    """The module that may carry FSDP's gradient-sync switch (the model inside an ObjectiveLoss)."""
    return model.model if isinstance(model, ObjectiveLoss) else model
