"""Reading safetensors weights into a module through a key map: the one loader behind every
pretrained part and every transformers directory visto opens.

    load_by_key_map(model, directory, {"ours.weight": "theirs.weight", ...})

The map is the documentation of a format (nanoGPT's `from_pretrained`): each family or tower
writes its own, `ours -> theirs`, and where a tensor is stored differently (split, joined,
reshaped) a transform beside the map says how. This module only copies, and checks that
nothing is missing, left over or of another shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from visto.errors import UserError

MAX_NAMED = 4  # tensors named per kind of mismatch in an error

# ours -> their key, or their keys when a transform builds ours from several tensors
KeyMap = Mapping[str, str | tuple[str, ...]]


def read_config_json(directory: Path) -> dict[str, Any]:
    """The config.json of a model directory, or a UserError that says why it cannot be read."""
    path = directory / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def safetensors_files(directory: Path) -> list[Path]:
    """model.safetensors, or the shards a model.safetensors.index.json names."""
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / s for s in shards]
    raise UserError(
        f"{directory} has no model.safetensors (nor a sharded index); visto reads safetensors "
        "weights only (convert .bin files with transformers first)"
    )


def tensor_names(directory: str | Path) -> set[str]:
    """The names of the tensors stored in `directory`, without reading them."""
    from safetensors import safe_open

    names: set[str] = set()
    for file in safetensors_files(Path(directory)):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


def load_by_key_map(
    module: nn.Module,
    directory: str | Path,
    key_map: KeyMap,
    transforms: Mapping[str, Callable[..., Tensor]] | None = None,
    *,
    rename: Callable[[str], str] = lambda key: key,
    ignore: Callable[[str], bool] = lambda key: False,
) -> None:
    """Fill `module`'s state dict from the safetensors in `directory` through `key_map`.

    Their keys are read after `rename` (one layout of a format named like another).
    `transforms[ours]` makes our tensor from the tensors of its keys, in order (a reshape, a
    slice of a fused matrix, a concatenation); without one, the single tensor is ours as is.
    Every key of `key_map` must be filled, with its shape, and every tensor in the files must
    be read unless `ignore(their key)` (buffers that are recomputed, a tied copy); otherwise
    one UserError names what is missing, what is left over and what has another shape.
    """
    from safetensors import safe_open

    directory = Path(directory)
    transforms = transforms or {}
    state = module.state_dict()
    assert set(transforms) <= set(key_map), "a transform without a key in the map"
    with ExitStack() as stack, torch.no_grad():
        stored: dict[str, tuple[Any, str]] = {}  # their key (renamed) -> (open file, key in it)
        for file in safetensors_files(directory):
            f = stack.enter_context(safe_open(str(file), framework="pt"))
            stored.update({rename(k): (f, k) for k in f.keys()})  # noqa: SIM118 (not a dict)

        read: set[str] = set()
        missing: list[str] = []
        mismatched: list[str] = []
        for ours, theirs in key_map.items():
            sources = (theirs,) if isinstance(theirs, str) else tuple(theirs)
            if any(s not in stored for s in sources):
                missing += [s for s in sources if s not in stored]
                continue
            tensors = [stored[s][0].get_tensor(stored[s][1]) for s in sources]
            read.update(sources)
            if ours in transforms:
                value = transforms[ours](*tensors)
            else:
                assert len(tensors) == 1, f"{ours} is made of {sources}: it needs a transform"
                value = tensors[0]
            if value.shape != state[ours].shape:
                mismatched.append(
                    f"{' + '.join(sources)} {tuple(value.shape)} "
                    f"(visto expects {tuple(state[ours].shape)})"
                )
                continue
            state[ours].copy_(value.to(state[ours].dtype))
        unexpected = [stored[k][1] for k in stored if k not in read and not ignore(k)]

    problems = [
        f"{len(keys)} tensor(s) {what}, e.g. {', '.join(sorted(keys)[:MAX_NAMED])}"
        for what, keys in (
            ("missing", sorted(set(missing))),
            ("not read by visto", unexpected),
            ("of another shape than config.json implies", mismatched),
        )
        if keys
    ]
    if problems:
        raise UserError(
            f"{directory} does not match the model its config.json describes: "
            + "; ".join(problems)
        )
