"""Model families: name -> (config dataclass, model class), and `build_model`.

Every model class has `family: str`, `config` (its dataclass), `forward(batch) -> dict` with a
scalar "loss", and `collate(samples) -> batch`; the training loop, checkpoints and export rely
on nothing else, but for a family that trains in several ways: its `OBJECTIVES` (name ->
models.common.Objective: the loss and batch methods) and `default_objective`, which a recipe's
`model.objective` picks from (visto.train.objective). Add a family by adding one line here.

A constructor takes its config and, as keyword arguments, parts built elsewhere (`vision`,
`language`, ...: visto.pretrained reads them from the paths a config names); it never opens a
file. `build_model` here builds from a config alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from visto.config import from_dict
from visto.errors import UserError
from visto.models.blip2 import Blip2, Blip2Config
from visto.models.clip import CLIP, CLIPConfig
from visto.models.clipseg import CLIPSeg, CLIPSegConfig
from visto.models.cogvlm import CogVLM, CogVLMConfig
from visto.models.flamingo import Flamingo, FlamingoConfig
from visto.models.fuyu import Fuyu, FuyuConfig
from visto.models.llava import Llava, LlavaConfig

FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "clip": (CLIPConfig, CLIP),
    "llava": (LlavaConfig, Llava),
    "blip2": (Blip2Config, Blip2),
    "fuyu": (FuyuConfig, Fuyu),
    "cogvlm": (CogVLMConfig, CogVLM),
    "flamingo": (FlamingoConfig, Flamingo),
    "clipseg": (CLIPSegConfig, CLIPSeg),
}


def family_config(family: str, config: Any = None) -> Any:
    """The config dataclass of `family` from a dataclass, a dict (unknown keys rejected) or
    None (the defaults)."""
    if family not in FAMILIES:
        raise UserError(f"unknown model family {family!r}; known families: {sorted(FAMILIES)}")
    config_cls, _ = FAMILIES[family]
    if config is None:
        return config_cls()
    if isinstance(config, dict):
        return from_dict(config_cls, config, where=f"{family} config")
    if not isinstance(config, config_cls):
        raise TypeError(f"{family} needs a {config_cls.__name__}, got {type(config).__name__}")
    return config


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """With `seed`, the global RNG's draws inside depend on it alone and are undone after;
    with None, they come from the global RNG as it is."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_model(family: str, config: Any = None, seed: int | None = None) -> nn.Module:
    """A freshly initialised model of `family` from its config (dataclass, dict, or None for
    the defaults). With `seed`, the initial weights depend on it alone, not on the global RNG.
    A config naming pretrained parts on disk (`vision_init`, ...) is built by
    visto.pretrained.build_model, which reads them."""
    config = family_config(family, config)
    with seeded(seed):
        return FAMILIES[family][1](config)
