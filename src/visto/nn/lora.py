"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on any family's
decoder and vision tower, through `peft`'s layers.

    lora = LoraConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"], modules=["language_model"])
    apply_lora(model, lora)      # in place: adapters in, everything else frozen
    ... train (only lora_A / lora_B, plus `lora.trainable` prefixes, get gradients) ...
    save_checkpoint(model, dir)  # config.json records the LoRA settings; load() re-applies them
    merge_lora(model)            # in place: W += (alpha / rank) * B @ A, plain nn.Linear again

Each targeted `nn.Linear` computes W x + (alpha / rank) * B(A(dropout(x))), with A (rank, in)
random and B (out, rank) zero at the start (§4.1), so a fresh adapter changes nothing.

Which layers: `targets` are leaf module names (q_proj, k_proj, v_proj, o_proj, gate_proj,
up_proj, down_proj in the decoder; q_proj, k_proj, v_proj, out_proj, fc1, fc2 in the vision
tower), searched under the `modules` prefixes (a family's module names, e.g. LLaVA's
"language_model" and "vision_tower"), so "q_proj" in the decoder does not also adapt the
vision tower unless asked. Only plain `nn.Linear` layers are adapted: a subclass may compute
rows its own way, which a merge into its weight would not reach, so it is refused. (CogVLM's
language projections are plain layers that compute the text positions; its `visual_expert`
computes the image positions and is adapted like any other module.)

The module lives in `nn/`, not `train/`: loading a checkpoint with adapters (inference)
re-applies them, and inference never imports `train/`.

peft's LoRA layers are used as is (`inject_adapter_in_model`, no `PeftModel` wrapper), so the
model keeps its class, `family`, `forward(batch)`, `collate` and engine protocol; state-dict
keys of adapted layers become `<name>.base_layer.weight`, `<name>.lora_A.default.weight`,
`<name>.lora_B.default.weight`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from visto.errors import UserError

ADAPTER = "default"  # peft's adapter name; one adapter per model here


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, training only
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    modules: list[str] = field(default_factory=lambda: ["language_model"])
    # Parameter-name prefixes that stay fully trainable beside the adapters (e.g. LLaVA's
    # "multi_modal_projector"); everything else is frozen.
    trainable: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            problems.append(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets or not self.modules:
            problems.append("targets and modules must each name at least one module")
        if problems:
            raise UserError("lora: " + "; ".join(problems))


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def target_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the linear layers `config` adapts (UserError if none, or a bad prefix)."""
    names = dict(model.named_modules())
    missing = [p for p in config.modules if p not in names]
    if missing:
        top = sorted(n for n in names if n and "." not in n)
        raise UserError(f"lora.modules {missing} are not modules of this model; its modules: {top}")
    chosen, refused = [], []
    for name, module in names.items():
        if name.rsplit(".", 1)[-1] not in config.targets or not _under(name, config.modules):
            continue
        if type(module) is nn.Linear:
            chosen.append(name)
        elif isinstance(module, nn.Linear):
            refused.append(f"{name} ({type(module).__name__})")
    if refused:
        raise UserError(
            f"lora cannot adapt {refused[:3]}: only plain Linear layers (a routed layer would "
            "apply the adapter to rows a merge cannot reach); narrow lora.modules"
        )
    if not chosen:
        raise UserError(
            f"lora.targets {config.targets} match no Linear layer under {config.modules}"
        )
    return chosen


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Add LoRA adapters to `model` in place and freeze all but them (and `config.trainable`).

    Returns the same model, which records `config` as `model.lora_config` so that
    `visto.checkpoint.save_checkpoint` saves it and `load` re-applies it.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    if getattr(model, "lora_config", None) is not None:
        raise UserError("this model already has LoRA adapters; merge_lora(model) first")
    names = target_names(model, config)
    peft_config = PeftLoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=names,  # full names: peft matches a name ending in a target
        bias="none",
    )
    inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER)
    # peft's new dropout modules start in training mode; follow the model's mode instead.
    model.train(model.training)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or _under(name, config.trainable))
    adapted = sum(1 for _, m in model.named_modules() if _is_lora_layer(m))
    assert adapted == len(names), f"peft adapted {adapted} layers, expected {len(names)}"
    model.lora_config = config
    return model


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def has_lora(model: nn.Module) -> bool:
    return getattr(model, "lora_config", None) is not None


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain `nn.Linear` back, in place.

    Afterwards the state dict has the family's own names again (what export key maps expect),
    `model.lora_config` is gone, and parameters are trainable as before the adapters came.
    """
    if not has_lora(model):
        return model
    layers = [(name, m) for name, m in model.named_modules() if _is_lora_layer(m)]
    for name, layer in layers:
        layer.merge(safe_merge=True, adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    del model.lora_config
    if hasattr(model, "peft_config"):  # peft's record of what it injected
        del model.peft_config
    return model


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' parameters by name (lora_A / lora_B of every adapted layer)."""
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def lora_summary(model: nn.Module) -> dict[str, Any]:
    """Counts for logs and cards: adapted layers, adapter and trainable parameters."""
    return {
        "layers": sum(1 for _, m in model.named_modules() if _is_lora_layer(m)),
        "adapter_params": sum(p.numel() for p in adapter_parameters(model).values()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


__all__ = [
    "LoraConfig",
    "adapter_parameters",
    "apply_lora",
    "has_lora",
    "lora_summary",
    "merge_lora",
    "target_names",
]
