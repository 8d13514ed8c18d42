"""Fully sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`) from outside the
model, for a recipe's `distributed: "fsdp"` under torchrun.

Each rank holds 1/world_size of every parameter, gradient and optimizer state; a block's
parameters are gathered for its forward and backward and freed after. As torchtitan does,
every block (each element of the model's `nn.ModuleList`s: transformer layers, in every
family) is one sharding unit and the root holds the rest (embeddings, heads, tied weights).

Checkpoints stay what every other run writes: the weights gathered whole into a plain copy of
the model (`Shell`), and the optimizer state gathered whole and keyed by position as
`optimizer.state_dict()` keys it. So an FSDP run resumes on any number of processes, with or
without FSDP, and a checkpoint of any run resumes under FSDP.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

FULL = {"full_state_dict": True, "cpu_offload": True}  # whole tensors, on rank 0's CPU


def shard_model(model: nn.Module) -> nn.Module:
    """Shard `model` in place: each block of every ModuleList, then the root."""
    from torch.distributed.fsdp import fully_shard

    blocks = [block for module in model.modules() if isinstance(module, nn.ModuleList)
              for block in module]  # fmt: skip
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


class Shell:
    """A plain copy of the model, on the meta device (no memory) until a checkpoint is saved:
    the gathered weights are put in it and it is saved as any model is."""

    def __init__(self, model: nn.Module) -> None:
        # Tied weights (one parameter under two names) come back gathered as two tensors:
        # each name's first name, to tie them again.
        first: dict[int, str] = {}
        self.tied_to = {name: first.setdefault(id(p), name)
                        for name, p in model.named_parameters(remove_duplicate=False)}  # fmt: skip
        self.model = copy.deepcopy(model).to("meta")

    def filled(self, state: dict[str, torch.Tensor]) -> nn.Module:
        # Gathered tensors may be views into one buffer, which safetensors refuses to save:
        # each gets a storage of its own, and tied names share one.
        state = {k: v.clone() for k, v in state.items() if self.tied_to.get(k, k) == k}
        state.update({k: state[t] for k, t in self.tied_to.items() if t != k})
        self.model.load_state_dict(state, assign=True)
        return self.model


def gathered_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on rank 0's CPU (empty on the others); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(**FULL))


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter of `optimizer`, in the order its state dict numbers them."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gathered_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state on rank 0 (empty on the others), keyed by position as an
    unsharded `optimizer.state_dict()` is; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**FULL))
    if not full:
        return {}
    position = {name: k for k, name in enumerate(parameter_names(model, optimizer))}
    groups = [{**g, "params": [position[name] for name in g["params"]]}
              for g in full["param_groups"]]  # fmt: skip
    return {"state": {position[name]: s for name, s in full["state"].items()},
            "param_groups": groups}  # fmt: skip


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a position-keyed optimizer state (any run's checkpoint) into a sharded optimizer:
    every rank passes the whole state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = parameter_names(model, optimizer)
    if len(names) != sum(len(g["params"]) for g in state["param_groups"]):
        raise ValueError(
            f"the checkpoint's optimizer has {sum(len(g['params']) for g in state['param_groups'])}"
            f" parameters, this model trains {len(names)}"
        )
    full = {
        "state": {names[k]: s for k, s in state["state"].items()},
        "param_groups": [
            {**g, "params": [names[k] for k in g["params"]]} for g in state["param_groups"]
        ],
    }
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=full, options=options)


def equal_batch_counts(batches: list[Any], dist_info: Any) -> list[Any]:
    """The first batches every rank has: a sharded forward is collective, so each rank must
    run as many as the others (the last rank of an uneven split has one fewer)."""
    import torch.distributed as dist

    count = torch.tensor([len(batches)])
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    return batches[: int(count)]
