"""bench/decode_speed.py's helpers: the family variants it times beside the recipes' own."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from visto.models.flamingo import Flamingo, FlamingoConfig
from visto.train.recipe import load_recipe

BENCH = Path(__file__).resolve().parents[1] / "bench" / "decode_speed.py"


def _bench():
    spec = importlib.util.spec_from_file_location("decode_speed_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_focus_drops_the_focus_and_keeps_the_rest():
    ds = _bench()
    config = dict(load_recipe("compare-flamingo").model.config)
    assert config["question_focus"] is not None and config["resampler_input"] == "objects"
    plain = ds.without_focus(config)
    assert plain["question_focus"] is None
    assert plain["resampler_input"] == "patches"
    assert plain["processor"]["focus_tokens"] == 0
    # everything else as the recipe has it, and the recipe's config left alone
    for key in ("decoder", "resampler", "cross_attn_every", "vision"):
        assert plain[key] == config[key]
    assert config["question_focus"] is not None and config["processor"]["focus_tokens"] == 12
    assert ds.without_focus(plain) is None
    assert ds.without_focus(dict(load_recipe("compare-cogvlm").model.config)) is None


def test_open_gates_opens_flamingos_gates_only():
    ds = _bench()
    model = Flamingo(FlamingoConfig.preset("tiny"))
    before = {n: p.clone() for n, p in model.named_parameters()}
    ds.open_gates(model)
    gates = [n for n in before if n.rsplit(".", 1)[-1].startswith("alpha_")]
    assert gates
    for name, p in model.named_parameters():
        if name in gates:
            assert torch.all(before[name] == 0) and torch.all(p == 0.5)
        else:
            assert torch.equal(p, before[name])
