"""The optimizer side of a recipe: per-module learning rates (0 = frozen), AdamW groups,
and the warmup + cosine schedule over a step and/or wall-clock budget."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from visto.errors import UserError
from visto.train.recipe import Recipe


def schedule_progress(recipe: Recipe, step: int, elapsed_s: float) -> float:
    """How far through the post-warmup budget a run is, in [0, 1] (steps or minutes)."""
    progress = 0.0
    if recipe.max_steps is not None:
        span = max(1, recipe.max_steps - recipe.schedule.warmup_steps)
        progress = (step - recipe.schedule.warmup_steps) / span
    if recipe.max_minutes is not None:
        progress = max(progress, elapsed_s / (60 * recipe.max_minutes))
    return min(1.0, max(0.0, progress))


def lr_factor(step: int, progress: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """The multiplier on each group's lr for optimizer step `step` (0-based).

    Linear warmup over `warmup_steps` (the first step already gets 1/warmup_steps), then a
    cosine from 1 down to `min_lr_ratio` as `progress` goes from 0 to 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return min_lr_ratio + (1 - min_lr_ratio) * cosine




def module_lr(name: str, base_lr: float, module_lrs: dict[str, float]) -> float:
    """The lr for parameter `name`: the longest prefix in module_lrs that matches it whole."""
    best, best_len = base_lr, -1
    for prefix, lr in module_lrs.items():
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = lr, len(prefix)
    return best


def build_param_groups(
    model: nn.Module, base_lr: float, module_lrs: dict[str, float], weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups by (lr, decayed?). Parameters whose lr is 0 are frozen and left out, as
    are those the model itself keeps frozen (requires_grad False).

    Only matrices (dim >= 2: linear and embedding weights) are decayed; biases and norm
    gains are not (as in GPT-2/nanoGPT). Each group records its `peak_lr` for the schedule.
    """
    names_by_param: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(p), []).append(name)
        params[id(p)] = p
    all_names = [n for names in names_by_param.values() for n in names]
    unmatched = [
        prefix for prefix in module_lrs
        if not any(n == prefix or n.startswith(prefix + ".") for n in all_names)
    ]
    if unmatched:
        top = sorted({n.split(".")[0] for n in all_names})
        raise UserError(
            f"optim.module_lrs names {unmatched}, which match no parameter of this model; "
            f"its top-level modules are {top}"
        )

    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for key, p in params.items():
        names = names_by_param[key]
        lrs = {module_lr(n, base_lr, module_lrs) for n in names}
        if len(lrs) > 1:
            raise UserError(
                f"parameters {names} are one tied weight but optim.module_lrs gives them "
                f"different learning rates {sorted(lrs)}; give them the same one"
            )
        lr = lrs.pop()
        if lr == 0:
            p.requires_grad_(False)  # frozen: no gradient is computed, AdamW never sees it
        if not p.requires_grad:  # frozen here, or locked by the model itself (LiT towers)
            continue
        decay = p.ndim >= 2
        group = groups.setdefault(
            (lr, decay),
            {"params": [], "names": [], "lr": lr, "peak_lr": lr,
             "weight_decay": weight_decay if decay else 0.0},
        )
        group["params"].append(p)
        group["names"].append(names[0])
    if not groups:
        raise UserError("every parameter is frozen (lr 0): there is nothing to train")
    return list(groups.values())


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    o = recipe.optim
    groups = build_param_groups(model, o.lr, o.module_lrs, o.weight_decay)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor
