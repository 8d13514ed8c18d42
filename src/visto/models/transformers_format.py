"""Directories saved by transformers (`save_pretrained`: config.json with a `model_type`,
safetensors weights) opened as visto models, and visto models written as such directories.

    model = load_transformers("llava-hf-dir")      # what visto.load does for such a directory
    export_transformers(model, "out-dir")           # what `visto export` does (native classes)

A model no transformers class computes (the quickstart's) is written with custom code
instead: visto.models.remote_code.

One loader per family lives beside that family's export (`llava.load_hf` next to
`llava.export_hf`, both driven by `llava.hf_key_map`); this module holds what they share:
which `model_type` each family reads and the key renames between transformers' on-disk and
in-memory layouts. The tensors are copied by `visto.nn.weights.load_by_key_map`.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from visto.errors import UserError
from visto.nn.transformer import act_from_hf, act_to_hf  # noqa: F401 (the families import them here)

# transformers model_type -> (module, function) that reads such a directory.
LOADERS = {
    "llava": ("visto.models.llava", "load_hf"),
    "blip-2": ("visto.models.blip2", "load_hf"),
    "fuyu": ("visto.models.fuyu", "from_transformers"),
    "idefics": ("visto.models.flamingo", "from_idefics"),
    "clip": ("visto.models.clip", "load_hf"),
    "siglip": ("visto.models.clip", "load_hf"),
    # visto's own export with custom code (visto.models.remote_code): read back as visto
    "visto": ("visto.models.remote_code", "load_remote_code"),
}
# transformers model_type -> the visto family its loader returns ("visto": the remote-code
# export covers LLaVA only, remote_code.FAMILIES).
FAMILY_OF = {"llava": "llava", "blip-2": "blip2", "fuyu": "fuyu", "idefics": "flamingo",
             "clip": "clip", "siglip": "clip", "visto": "llava"}  # fmt: skip
# visto family -> (module, function) that writes a transformers directory of it.
EXPORTERS = {
    "llava": ("visto.models.llava", "export_hf"),
    "blip2": ("visto.models.blip2", "export_hf"),
    "fuyu": ("visto.models.fuyu", "export_hf"),
    "flamingo": ("visto.models.flamingo", "export_idefics"),
}
def read_hf_config(directory: str | Path) -> dict[str, Any] | None:
    """config.json of a transformers directory, or None when `directory` is not one."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(config, dict) or "family" in config or "model_type" not in config:
        return None  # a visto checkpoint, or not a model config at all
    return config


def is_transformers_dir(directory: str | Path) -> bool:
    return read_hf_config(directory) is not None


def load_transformers(directory: str | Path) -> nn.Module:
    """The visto model of the transformers checkpoint in `directory`, in eval mode."""
    config = read_hf_config(directory)
    if config is None:
        raise UserError(
            f"{directory} is not a transformers model directory (no config.json with a model_type)"
        )
    model_type = config["model_type"]
    if model_type not in LOADERS:
        raise UserError(
            f"{directory} holds a transformers {model_type!r} model; visto reads "
            f"{', '.join(sorted(LOADERS))} (LLaVA, BLIP-2, Fuyu, Idefics as Flamingo, CLIP and "
            "SigLIP as two-tower models, and visto's own custom-code export) directories"
        )
    module, function = LOADERS[model_type]
    return getattr(importlib.import_module(module), function)(directory).eval()


def export_transformers(model: nn.Module, directory: str | Path) -> Path:
    """Write `model` as a directory transformers loads (`from_pretrained`), atomically."""
    family = getattr(model, "family", type(model).__name__)
    if family not in EXPORTERS:
        raise UserError(
            f"visto has no transformers export for {family!r} models; it exports "
            f"{', '.join(sorted(EXPORTERS))} (Flamingo as Idefics); keep this one as a visto "
            "checkpoint (`visto export --format visto`), or train one of those families to take "
            "a model to transformers or vLLM"
        )
    if family == "llava":
        refuse_without_counterpart(model)
    vision = getattr(getattr(model, "config", None), "vision", None)
    if family == "llava" and vision is not None and not vision.cls_token:
        # llava.export_hf writes a CLIP vision config; this tower has SigLIP's layout.
        raise UserError(
            "cannot export this LLaVA to the transformers format: its vision tower has SigLIP's "
            "layout (no class token, no pre-LayerNorm, a biased patch embedding), and visto "
            "writes LLaVA's tower as transformers' CLIPVisionModel; build it on a CLIP tower "
            "(vision_init a CLIP directory or checkpoint), or keep it as a visto checkpoint"
        )
    module, function = EXPORTERS[family]
    return getattr(importlib.import_module(module), function)(model, directory)


def parts_without_counterpart(model: nn.Module) -> list[str]:
    """The parts of a LLaVA that no setting of transformers' `LlavaForConditionalGeneration`
    computes (empty: none). Its connector is a two-layer MLP over the tower's patch features,
    and its CLIP vision tower embeds each patch with one linear map of that patch's pixels;
    the parts below compute something else, so no exact export exists, only a different model."""
    cfg = model.config
    parts = []
    projector = cfg.projector
    if projector.kind == "regions":
        extra = [name for name, on in (
            ("the question focus", projector.focus), ("named words (filter, count, relate)", projector.named),
            ("a pointer head beside the LM head", projector.pointer),
            ("read slots from its OCR reader", projector.read_slots or projector.text_slots),
        ) if on]  # fmt: skip
        parts.append(
            "its connector is visto's regions connector (an object detector over the tower's "
            "patches that writes each object as the decoder's own words"
            + (", with " + ", ".join(extra) if extra else "")
            + "), where transformers' Llava has a two-layer MLP over the patch features"
        )
    if cfg.vision.stem == "conv":
        parts.append(
            "its vision tower has a conv stem (3x3 stride-2 convolutions with GELUs between: each "
            "patch's embedding sees its neighbours' pixels), where transformers' CLIP vision tower "
            "embeds each patch by one linear map of its own pixels (a tower trained with "
            "vision.stem 'patch' exports)"
        )
    return parts


def refuse_without_counterpart(model: nn.Module) -> None:
    """A UserError when a LLaVA has parts that transformers cannot compute at all (what no
    setting of the export changes, `parts_without_counterpart`): which parts, and what does
    export instead. The quickstart's model is such a LLaVA, whatever its flags."""
    parts = parts_without_counterpart(model)
    if not parts:
        return
    regions = model.config.projector.kind == "regions"
    raise UserError(
        "cannot export this LLaVA to the transformers format: "
        + "; ".join(parts)
        + ". No transformers class computes "
        + ("these parts" if len(parts) > 1 else "this part")
        + ", so a native export would be another model with other answers, and visto writes "
        "none. "
        + ("This is the model `visto quickstart` trains, whatever its flags (its connector is "
           "always the regions connector); " if regions else "")  # fmt: skip
        + "`visto export` without `--remote-code never` writes it with custom code instead "
        "(modeling_visto.py imports visto: transformers loads it with trust_remote_code=True "
        "wherever visto is installed; vLLM does not serve it); or keep it as a visto "
        "checkpoint: `visto chat` / `visto serve --model CKPT` (an OpenAI-compatible server), "
        "`visto export --format visto` (LoRA merged) or `--int8`. "
        "What exports to transformers and vLLM: a LLaVA with projector kind 'mlp' and a "
        "patch-stem CLIP tower, such as a transformers LLaVA directory fine-tuned with `visto "
        "train --recipe llava-lora` (LoRA merged on export), and BLIP-2, Fuyu and Flamingo "
        "models (`visto export --help`)"
    )


def legacy_key(key: str) -> str:
    """A key of transformers' in-memory layout (`model.language_model.*`, `model.<part>.*`,
    `lm_head.weight`) in the hub layout its checkpoints use (`language_model.model.*`,
    `<part>.*`, `language_model.lm_head.weight`). Hub-layout keys come back unchanged."""
    key = key.removeprefix("model.")
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if key.startswith("language_model.") and not key.startswith(
        ("language_model.model.", "language_model.lm_head.")
    ):
        return "language_model.model." + key.removeprefix("language_model.")
    return key


def merged(model: nn.Module) -> nn.Module:
    """`model`, or a copy with its LoRA adapters merged (transformers' models have none); the
    model passed in is left as it is."""
    import copy

    from visto.nn.lora import has_lora, merge_lora

    return merge_lora(copy.deepcopy(model)) if has_lora(model) else model


def refuse_export(family: str, problems: list[str]) -> None:
    """One UserError naming every part of the model that transformers' class cannot hold."""
    if problems:
        raise UserError(f"cannot export this {family} to the transformers format: " + "; ".join(problems))


def write_transformers_dir(
    model: nn.Module,
    directory: str | Path,
    config: dict[str, Any],
    tensors: dict[str, Any],
    extra_json: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write config.json, model.safetensors (fp32, contiguous, on the CPU) and, when the model
    has a tokenizer, its transformers tokenizer files and `extra_json` (processor settings),
    atomically."""
    from safetensors.torch import save_file

    from visto.utils.io import atomic_directory, atomic_write_json

    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    with atomic_directory(directory) as tmp:
        atomic_write_json(tmp / "config.json", {**config, "torch_dtype": "float32"})
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config
        if getattr(model, "_processor", None) is not None or cfg.tokenizer_dir or cfg.tokenizer_corpus:
            model.processor.tokenizer.to_hf_tokenizer().save_pretrained(str(tmp))
            for name, content in (extra_json or {}).items():
                atomic_write_json(tmp / name, content)
    return Path(directory)


def read_image_processor(directory: str | Path) -> tuple[dict[str, Any], Path] | None:
    """The image processor settings transformers saved in `directory` and the file they came
    from: preprocessor_config.json (an image processor's `save_pretrained`), else the
    "image_processor" entry of processor_config.json (a whole processor's, as transformers 5
    writes a CLIPProcessor or LlavaProcessor); None when neither holds them."""
    directory = Path(directory)
    for name, entry in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON: {e}") from None
        if entry is not None and isinstance(data, dict):
            data = data.get(entry)
        if isinstance(data, dict):
            return data, path
    return None


def image_normalisation(
    settings: dict[str, Any], where: str | Path, default: tuple[Sequence[float], Sequence[float]]
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) per channel of transformers image processor `settings` (`image_mean` and
    `image_std`, one number or three; `default` for a missing one; 0 and 1 when `do_normalize`
    is false), for a processor that computes (x / 255 - mean) / std as visto's does."""
    scale = settings.get("rescale_factor", 1 / 255) if settings.get("do_rescale", True) else 1
    if not isinstance(scale, (int, float)) or not math.isclose(scale, 1 / 255, rel_tol=1e-6):
        raise UserError(
            f"{where}: the image processor scales pixels by {scale!r} before normalising; "
            "visto's processor divides them by 255 (do_rescale true, rescale_factor 1/255)"
        )
    if settings.get("do_normalize", True) is False:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def three(key: str, fallback: Sequence[float]) -> tuple[float, float, float]:
        value = settings.get(key, fallback)
        values = [value] * 3 if isinstance(value, (int, float)) else value
        if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            raise UserError(f"{where}: {key} must be one number or three (R, G, B), got {value!r}")
        return (float(values[0]), float(values[1]), float(values[2]))

    mean, std = three("image_mean", default[0]), three("image_std", default[1])
    if min(std) <= 0:
        raise UserError(f"{where}: image_std must be positive, got {list(std)}")
    return mean, std


def image_processor_json(processor_config: Any, kind: str) -> dict[str, Any]:
    """preprocessor_config.json of transformers' `kind` image processor (CLIPImageProcessor,
    BlipImageProcessor, ...) that resizes to the processor's square and normalises as it does."""
    p = processor_config
    return {
        "image_processor_type": kind, "do_resize": True,
        "size": {"height": p.image_size, "width": p.image_size}, "resample": 3,
        "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(p.mean), "image_std": list(p.std),
        "do_convert_rgb": True,
    }  # fmt: skip
