"""`load_by_key_map`: the one loader of weights by key map, on a two-tensor module."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from visto.errors import UserError
from visto.nn.weights import load_by_key_map, tensor_names


def _save(directory, tensors):
    directory.mkdir(exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def test_copies_renames_and_transforms(tmp_path):
    layer = nn.Linear(3, 2)
    weight, bias = torch.randn(2, 3), torch.randn(2)
    stored = {
        "old.proj": torch.cat([weight, weight]),  # (4, 3): a fused matrix, ours is the top half
        "old.bias_a": bias[:1], "old.bias_b": bias[1:],  # one tensor stored in two
        "old.buffer": torch.ones(1),  # recomputed on our side
    }  # fmt: skip
    d = _save(tmp_path / "a", stored)
    load_by_key_map(
        layer, d, {"weight": "new.proj", "bias": ("new.bias_a", "new.bias_b")},
        {"weight": lambda w: w[:2], "bias": lambda a, b: torch.cat([a, b])},
        rename=lambda key: key.replace("old.", "new."), ignore=lambda key: key == "new.buffer",
    )  # fmt: skip
    assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)
    assert tensor_names(d) == set(stored)


def test_one_error_names_what_is_missing_left_over_and_misshapen(tmp_path):
    d = _save(tmp_path / "b", {"w": torch.zeros(5, 3), "extra": torch.zeros(1)})
    with pytest.raises(UserError) as e:
        load_by_key_map(nn.Linear(3, 2), d, {"weight": "w", "bias": "b"})
    message = str(e.value)
    assert "1 tensor(s) missing, e.g. b" in message
    assert "1 tensor(s) not read by visto, e.g. extra" in message
    assert "w (5, 3) (visto expects (2, 3))" in message


def test_no_weights_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no model.safetensors"):
        load_by_key_map(nn.Linear(3, 2), tmp_path, {"weight": "w"})
