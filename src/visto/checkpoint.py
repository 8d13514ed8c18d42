"""A checkpoint is a directory; `save_checkpoint` writes one atomically, `load` opens it.

    my-checkpoint/
      config.json          {"family", "config", "visto_version", "processor"?, "lora"?,
                            "quantization"?: "int8"}
      model.safetensors    the weights (tied weights stored once; int8 layers as int8 + scales,
                           see visto.nn.quantize)
      processor.json ...   whatever `model.processor.save(dir)` writes (tokenizer.json, ...)
      README.md            a short card: family, parameters, data, recipe, metrics
      trainer_state.pt     training runs only: optimizer, step, RNG and data position (resume)

Train, infer, index and export all read checkpoints through here, so there is one format.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visto.errors import UserError
from visto.utils.io import atomic_directory

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
TRAINER_STATE_FILE = "trainer_state.pt"


def is_int8_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a checkpoint saved in int8 (`visto export --int8`): CPU only."""
    path = Path(path) / CONFIG_FILE
    try:
        return json.loads(path.read_text()).get("quantization") == "int8"
    except (OSError, ValueError, AttributeError):
        return False  # not a checkpoint (load says why)


def is_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied weight counts once)."""
    seen = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


def save_checkpoint(
    model: torch.nn.Module,
    path: str | Path,
    *,
    processor: Any = None,
    card: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (and its processor, card, trainer state) as the directory `path`.

    `processor` defaults to `model.processor` when the model carries one. `card` maps
    section titles ("data", "recipe", "metrics", ...) to values shown in README.md.
    The directory appears whole or not at all; an existing checkpoint at `path` is
    replaced only once the new one is complete.
    """
    import torch
    from safetensors.torch import save_file, save_model

    import visto
    from visto.config import to_dict
    from visto.nn.quantize import int8_tensors, is_int8

    for attr in ("family", "config"):
        assert hasattr(model, attr), f"a visto model needs .{attr}; {type(model).__name__} has none"
    if processor is None:
        processor = getattr(model, "processor", None)
    path = Path(path)
    meta: dict[str, Any] = {
        "family": model.family,
        "config": to_dict(model.config),
        "visto_version": visto.__version__,
    }
    if processor is not None:
        meta["processor"] = _qualified_name(type(processor))
    lora = getattr(model, "lora_config", None)
    if lora is not None:  # unmerged LoRA adapters: load() re-applies them before the weights
        meta["lora"] = to_dict(lora)
    int8 = is_int8(model)
    if int8:  # load() quantizes the model it builds before reading the int8 weights
        meta["quantization"] = "int8"
    with atomic_directory(path) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if int8:
            save_file(int8_tensors(model), str(tmp / WEIGHTS_FILE), metadata={"family": model.family})
        else:
            # safetensors refuses two names for one storage; save_model keeps one name per
            # storage and load_model accepts the dropped alias, so tied weights round-trip.
            save_model(model, str(tmp / WEIGHTS_FILE), metadata={"family": model.family})
        if processor is not None:
            processor.save(tmp)
        (tmp / CARD_FILE).write_text(render_card(model, card or {}))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE_FILE)
    return path


def render_card(model: torch.nn.Module, card: dict[str, Any]) -> str:
    """The README.md of a checkpoint: what it is, how it was made, how well it does."""
    lines = [
        f"# visto checkpoint: {model.family}",
        "",
        f"- family: `{model.family}`",
        f"- parameters: {count_parameters(model):,}",
        "",
        "Open it with `visto.load(path)`.",
    ]
    for title, value in card.items():
        lines += ["", f"## {title}", ""]
        if isinstance(value, dict) and value and all(
            isinstance(v, (int, float, str)) for v in value.values()
        ):
            lines += ["| name | value |", "|---|---|"]
            for k, v in value.items():
                shown = f"{v:.4g}" if isinstance(v, float) else str(v)
                lines.append(f"| {k} | {shown} |")
        elif isinstance(value, (dict, list)):
            lines += ["```json", json.dumps(value, indent=2, default=str), "```"]
        else:
            lines.append(str(value))
    return "\n".join(lines) + "\n"


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of the checkpoint at `path`, with a clear error when it is not one.

    For a directory transformers saved that `load` reads, {"family": the visto family,
    "config": transformers' config, "transformers": True}, so that commands can pick what
    to do with it (evaluate, chat) before loading it."""
    from visto.models.transformers_format import FAMILY_OF, read_hf_config

    path = Path(path)
    hf = read_hf_config(path)
    if hf is not None and hf["model_type"] in FAMILY_OF:
        return {"family": FAMILY_OF[hf["model_type"]], "config": hf, "transformers": True}
    if not path.is_dir():
        raise UserError(
            f"no checkpoint at {path}: a checkpoint is a directory with {CONFIG_FILE} and "
            f"{WEIGHTS_FILE} (make one with `visto train`)"
        )
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        if (path / "checkpoint" / CONFIG_FILE).is_file():
            raise UserError(f"{path} is a training run; its checkpoint is {path / 'checkpoint'}")
        raise UserError(f"{path} is not a visto checkpoint: it has no {CONFIG_FILE}")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path} is corrupt (not valid JSON: {e}); re-save the checkpoint") from None
    if not isinstance(meta, dict) or "family" not in meta or not isinstance(meta.get("config"), dict):
        raise UserError(
            f"{config_path} is not a visto checkpoint config: it needs "
            '{"family": ..., "config": {...}}'
        )
    return meta


def load(path: str | Path, device: str | torch.device | None = None) -> torch.nn.Module:
    """The model saved at `path`, in eval mode, on `device` (default: cpu), with `.processor`.

    `path` may also be a directory transformers saved (LLaVA, BLIP-2, Fuyu, Idefics; see
    visto.models.transformers_format); such a model has a processor when its tokenizer is
    visto's."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    from visto.models.transformers_format import is_transformers_dir, load_transformers

    if is_transformers_dir(path):  # saved by transformers: read as vLLM would, no conversion step
        model = load_transformers(path)
        model.to(torch.device(device) if device is not None else torch.device("cpu"))
        return model.eval()
    from visto.models import build_model

    meta = read_config(path)
    # A saved config names no files (visto.pretrained consumed them): the weights hold every part.
    model = build_model(meta["family"], meta["config"])
    if "lora" in meta:
        from visto.config import from_dict
        from visto.nn.lora import LoraConfig, apply_lora

        apply_lora(model, from_dict(LoraConfig, meta["lora"], where=f"{path / CONFIG_FILE} lora"))
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{path} has no {WEIGHTS_FILE}: the checkpoint is incomplete")
    int8 = meta.get("quantization") == "int8"
    if int8 and device is not None and torch.device(device).type != "cpu":
        raise UserError(f"{path} is an int8 checkpoint, which runs on the CPU: pass --device cpu")
    try:
        if int8:
            from safetensors.torch import load_file

            from visto.nn.quantize import load_int8_tensors, quantize_int8

            load_int8_tensors(quantize_int8(model), load_file(weights))
        else:
            load_model(model, weights, strict=True)
    except SafetensorError as e:
        raise UserError(f"{weights} is corrupt ({e}); re-save the checkpoint") from None
    except (RuntimeError, ValueError) as e:  # missing/unexpected keys or shape mismatches
        raise UserError(
            f"{weights} does not match a {meta['family']} model built from {CONFIG_FILE}: {e}"
        ) from None
    if "processor" in meta:
        model.processor = _processor_class(meta["processor"], path).load(path)
    model.to(torch.device(device) if device is not None else torch.device("cpu"))
    return model.eval()


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    import torch

    state_path = Path(path) / TRAINER_STATE_FILE
    if not state_path.is_file():
        raise UserError(
            f"{path} has no {TRAINER_STATE_FILE}: it is a model checkpoint, not a resumable "
            "training checkpoint (resume needs a run directory written by `visto train`)"
        )
    try:
        # weights_only: a trainer state is tensors, numbers and containers; never code.
        return torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{state_path} is corrupt or unreadable ({e})") from None


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _processor_class(name: str, path: Path) -> Any:
    """The processor class named in config.json.

    A checkpoint may only name a class inside visto or one already imported by the running
    program: opening a file never imports (runs) code the user did not choose to run.
    """
    module_name, _, qualname = name.partition(":")
    if not (module_name == "visto" or module_name.startswith("visto.")) and module_name not in sys.modules:
        raise UserError(
            f"{path / CONFIG_FILE} names processor {name!r}, outside visto; import its module "
            "before loading the checkpoint if you trust it"
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{path / CONFIG_FILE} names processor {name!r}, which is not available: {e}") from None
    if not hasattr(obj, "load"):
        raise UserError(f"processor {name!r} has no load(dir) method")
    return obj
