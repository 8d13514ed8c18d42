"""Typed dataclass configs: JSON in and out, printed at the start of every run.

Every config in visto is a (possibly nested) dataclass. `to_dict`/`from_dict` turn them into
plain JSON-able dicts and back, checking field names so that a typo in a recipe file is an
error, not a silently ignored setting. A class whose saved layout changed gives `from_dict` an
`upgrade` that turns the old layout into the new one (see ViTConfig.upgrade).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from visto.errors import UserError

T = TypeVar("T")


def to_dict(cfg: Any) -> Any:
    """A dataclass (nested, with lists/tuples/dicts) as plain JSON-able values."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    return cfg


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        others = [arg for arg in args if arg is not type(None)]
        if len(others) == 1:  # X | None: X's own error (an unknown key) is the one to show
            return _convert(others[0], value, where)
        for arg in others:
            try:
                return _convert(arg, value, where)
            except (TypeError, ValueError, UserError):
                continue
        return value
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        inner = args[0] if args else Any
        items = [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict and isinstance(value, dict):
        inner = args[1] if len(args) == 2 else Any
        return {k: _convert(inner, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str | None = None) -> T:
    """Build dataclass `cls` from a dict, rejecting unknown keys with a helpful message."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected an object with fields, got {type(data).__name__}")
    # A config class that changed layout reads the old one with a static `upgrade(dict) -> dict`
    # (e.g. ViTConfig.upgrade): checkpoints and runs saved before the change load as they are.
    upgrade = getattr(cls, "upgrade", None)
    if upgrade is not None:
        data = upgrade(data)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(
            f"{where}: unknown setting(s) {unknown}; known settings are {sorted(names)}"
        )
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def load_json(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    return from_dict(cls, data, where=path.name)


def format_config(cfg: Any, title: str = "config") -> str:
    """The resolved config as indented JSON, for printing at the start of a run."""
    return f"{title}:\n" + json.dumps(to_dict(cfg), indent=2)
