"""Models built from the pretrained parts their configs name on disk.

A family config may say where parts come from: `vision_init` (a ViT: a visto checkpoint with
one, or a transformers CLIP, SigLIP or LLaVA directory), `language_init` (a transformers
Llama/Qwen2 decoder), `clip_init` (CLIPSeg's CLIP) and `stage1_checkpoint` (BLIP-2's stage 1);
a LLaVA (or CogVLM) with object tokens also takes, from its `vision_init` checkpoint, the
detector and OCR reader trained with that tower. `build_model` reads them, clears the paths
(a saved config holds the parts' architectures, its weights their weights, so it rebuilds
without the files) and hands the built parts to the family's constructor, which never opens
a file itself.

A tower takes its pixels normalised as it was trained: the model's processor settings take the
mean/std of the `vision_init` it is built on (`tower_normalisation`: a transformers directory's
image processor, else the constants its kind was published with, said in a warning; a visto
checkpoint's processor). A config that sets other values than the default 0.5 is refused.

This module sits above both models/ and checkpoint.py: it opens visto checkpoints with
`checkpoint.load`, and checkpoint.py builds the models it loads with `visto.models.build_model`,
from a config that names no files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from visto.checkpoint import is_checkpoint, load, read_config
from visto.data.processor import ProcessorConfig
from visto.errors import UserError
from visto.models import FAMILIES, family_config, seeded
from visto.models.blip2 import Blip2, Blip2Config
from visto.models.clip import CLIP
from visto.models.common import PART_PATHS, adopt_parts
from visto.models.flamingo import FlamingoConfig
from visto.models.fuyu import FuyuConfig
from visto.models.llava import LlavaConfig, build_llava_projector
from visto.models.transformers_format import (
    image_normalisation,
    load_transformers,
    read_hf_config,
    read_image_processor,
)
from visto.nn.language import DecoderLM
from visto.nn.vision import (
    CLIP_MEAN,
    CLIP_STD,
    CLIP_TYPES,
    SIGLIP_TYPES,
    ViT,
    load_transformers_vision,
)

log = logging.getLogger("visto.pretrained")

Normalisation = tuple[tuple[float, float, float], tuple[float, float, float]]  # (mean, std)
# The normalisation transformers towers were published with, for a directory that kept no
# image processor: OpenAI CLIP's constants (LLaVA's towers are CLIP's), SigLIP's 0.5.
PUBLISHED_NORMALISATION: dict[str, Normalisation] = {
    "clip": (CLIP_MEAN, CLIP_STD),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

# Where each family with a ViT keeps it: vision_init reads the tower of these checkpoints.
VISION_TOWERS = {"clip": "vision_model", "llava": "vision_tower", "cogvlm": "vision_tower",
                 "flamingo": "vision_model"}  # fmt: skip


def build_model(family: str, config: Any = None, seed: int | None = None) -> nn.Module:
    """A model of `family` from its config (dataclass, dict, or None for the defaults), with
    the pretrained parts the config names read from disk and the rest freshly initialised
    (what `visto train` builds). With `seed`, the initial weights depend on it alone."""
    config = family_config(family, config)
    # Reading a visto checkpoint builds its model, which draws from the RNG: the parts are read
    # under the same seed as the fresh weights, in a fixed order, so a seed gives one model.
    with seeded(seed):
        config, parts = read_parts(config)
        return FAMILIES[family][1](config, **parts)


def read_parts(config: Any) -> tuple[Any, dict[str, Any]]:
    """The parts `config` names, built (as the constructor's keyword arguments), and the config
    without their paths. Read in this order: stage 1, CLIP, vision tower, decoder, detector."""
    fields = {f.name for f in dataclasses.fields(config)}
    paths = {name: getattr(config, name) for name in PART_PATHS if name in fields}
    parts: dict[str, Any] = {}
    if paths.get("stage1_checkpoint"):
        parts["stage1"] = load_stage1(paths["stage1_checkpoint"])
    if paths.get("clip_init"):
        parts["clip"] = load_clip(paths["clip_init"])
    if paths.get("vision_init"):
        parts["vision"], stats = read_vision_tower(paths["vision_init"])
        size = parts["vision"].config.image_size
        config = take_tower_normalisation(config, paths["vision_init"], stats, size)
    if paths.get("language_init"):
        parts["language"] = DecoderLM.from_pretrained(paths["language_init"])
    if any(paths.values()):
        config = dataclasses.replace(config, **dict.fromkeys(paths))
    blip2_objects = isinstance(config, Blip2Config) and (
        config.qformer_input == "regions" or config.question_focus is not None
    )
    if blip2_objects and paths.get("vision_init"):
        # the Q-Former (or the question focus) reads object tokens: the detector that was
        # trained with the tower (and its OCR reader, for the focus's read slots)
        from visto.models.blip2 import build_regions

        regions = build_regions(adopt_parts(config, parts["vision"], parts.get("language")))
        parts["regions"] = with_region_detector(regions, paths["vision_init"])
    if isinstance(config, FlamingoConfig) and config.question_focus is not None and paths.get("vision_init"):
        # the question focus reads objects with the detector that was trained with the tower
        from visto.models.flamingo import build_focus_connector

        focus = build_focus_connector(adopt_parts(config, parts["vision"], parts.get("language")))
        parts["focus"] = with_region_detector(focus, paths["vision_init"])
    if isinstance(config, FuyuConfig) and config.question_focus is not None and paths.get("vision_init"):
        # Fuyu's question focus (the tower serves it alone): the tower's detector and reader
        from visto.models.fuyu import build_focus_connector as build_fuyu_focus

        focus = build_fuyu_focus(adopt_parts(config, parts["vision"], parts.get("language")))
        parts["focus"] = with_region_detector(focus, paths["vision_init"])
    if isinstance(config, LlavaConfig) and config.projector.kind == "regions" and paths.get("vision_init"):
        # object tokens need the detector that was trained with the tower
        parts["projector"] = regions_projector(
            adopt_parts(config, parts["vision"], parts.get("language")), paths["vision_init"]
        )
    return config, parts


def load_vision_tower(path: str | Path) -> ViT:
    """The ViT of a visto CLIP/LLaVA/CogVLM/Flamingo checkpoint, or of a transformers CLIP,
    SigLIP or LLaVA directory."""
    return read_vision_tower(path)[0]


def tower_normalisation(path: str | Path) -> Normalisation | None:
    """The (mean, std) the tower at `path` (a `vision_init`) takes its pixels with
    (`read_vision_tower`)."""
    return read_vision_tower(path)[1]


def read_vision_tower(path: str | Path) -> tuple[ViT, Normalisation | None]:
    """`load_vision_tower`'s ViT and the (mean, std) it was trained on pixels normalised with:
    a transformers directory's image processor settings (`hf_normalisation`); a visto
    checkpoint's processor (processor.json), else its config's processor settings; None for a
    visto checkpoint with neither (a CLIP saved without processor: nothing to go by)."""
    path = Path(path)
    hf = read_hf_config(path)
    if hf is not None and hf["model_type"] == "llava":
        return load_transformers(path).vision_tower, hf_normalisation(path, hf)
    if hf is not None and hf["model_type"] not in CLIP_TYPES + SIGLIP_TYPES:
        raise UserError(
            f"{path} holds a transformers {hf['model_type']!r} model; vision_init reads a visto "
            "checkpoint or a transformers CLIP, SigLIP or LLaVA directory"
        )
    if is_checkpoint(path):
        config = json.loads((path / "config.json").read_text())
        if "family" not in config:
            return load_transformers_vision(path), hf_normalisation(path, hf or config)
        family = read_config(path)["family"]
        model = load(path)
        tower = VISION_TOWERS.get(family)
        if tower is None:
            raise UserError(
                f"{path} is a {family!r} checkpoint; vision_init needs one with a ViT "
                "(clip, llava, cogvlm, flamingo)"
            )
        processor = getattr(getattr(model, "_processor", None), "config", None)
        settings = processor or getattr(model.config, "processor", None)
        return getattr(model, tower), None if settings is None else (settings.mean, settings.std)
    raise UserError(
        f"vision_init {path} is not a checkpoint directory (config.json + model.safetensors); "
        "make one with `visto quickstart --out DIR --until vision` (a ViT pretrained on the "
        "synthetic world's dense labels: DIR/vision/checkpoint) or `visto train --recipe clip-synth`"
    )


def hf_normalisation(path: Path, hf: dict[str, Any]) -> Normalisation:
    """The (mean, std) of the transformers tower directory `path` (config.json `hf`): its image
    processor settings (`read_image_processor`), or, where it kept none, those its kind was
    published with (PUBLISHED_NORMALISATION), with a warning that says so."""
    types = {hf.get("model_type"), (hf.get("vision_config") or {}).get("model_type")}
    kind = "siglip" if types & set(SIGLIP_TYPES) else "clip"
    published = PUBLISHED_NORMALISATION[kind]
    found = read_image_processor(path)
    if found is None:
        log.warning(
            "%s has no preprocessor_config.json (nor processor_config.json): normalising its "
            "tower's pixels with the mean %s and std %s %s was published with",
            path, list(published[0]), list(published[1]), "SigLIP" if kind == "siglip" else "OpenAI CLIP",
        )  # fmt: skip
        return published
    settings, where = found
    return image_normalisation(settings, where, published)


def take_tower_normalisation(
    config: Any, path: str | Path, stats: Normalisation | None, image_size: int
) -> Any:
    """`config` whose processor normalises as the `vision_init` tower at `path` was trained
    (`stats`, from `read_vision_tower`). A processor left at the default mean/std takes the
    tower's; one set to other values is refused; a CLIP without processor settings (OpenAI
    CLIP's) gets the tower's as a resize to its `image_size`, even where they are OpenAI CLIP's:
    the same pixels, but settings that say a tower stands behind them, which a recipe's
    `processor` section then follows (`visto.train.data.model_normalisation`)."""
    if stats is None or "processor" not in {f.name for f in dataclasses.fields(config)}:
        return config
    mean, std = stats
    current = config.processor
    if current is None:  # a CLIP's
        processor = ProcessorConfig(image_size=image_size, resize_mode="resize", mean=mean, std=std)
        return dataclasses.replace(config, processor=processor)
    if same_normalisation((current.mean, current.std), stats):
        return config
    default = ProcessorConfig()
    if not same_normalisation((current.mean, current.std), (default.mean, default.std)):
        raise UserError(
            f"processor mean {list(current.mean)} / std {list(current.std)} differ from those the "
            f"vision tower of vision_init {path} was trained with (mean {list(mean)}, std "
            f"{list(std)}): leave processor.mean/std out (the tower's are taken) or set them to "
            "the tower's"
        )
    log.info("processor mean %s / std %s: the vision tower's (%s)", list(mean), list(std), path)
    return dataclasses.replace(config, processor=dataclasses.replace(current, mean=mean, std=std))


def same_normalisation(
    a: tuple[Sequence[float], Sequence[float]], b: tuple[Sequence[float], Sequence[float]]
) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
               for u, v in zip(a, b, strict=True) for x, y in zip(u, v, strict=True))  # fmt: skip


def regions_projector(config: LlavaConfig, path: str | Path) -> nn.Module:
    """A LLaVA's fresh `regions` connector with the object detector (dense heads) and, if it
    reads text, the OCR reader of the checkpoint its tower comes from (`load_region_detector`)."""
    # Read after the fresh connector is built, as LLaVA built it before: the seeded draws for
    # the decoder that follows stay what they were.
    return with_region_detector(build_llava_projector(config), path)


def with_region_detector(projector: nn.Module, path: str | Path) -> nn.Module:
    """A fresh region connector (LLaVA's `regions` projector, Flamingo's `question_focus`)
    with the object detector (dense heads) and, if it reads text, the OCR reader of the
    checkpoint its tower comes from (`load_region_detector`)."""
    detector = load_region_detector(path)
    projector.heads.load_state_dict(detector.heads.state_dict())
    if projector.text_slots or projector.read_slots:
        if getattr(detector, "reader", None) is None:
            setting = "text_slots" if projector.text_slots else "read_slots"
            raise UserError(
                f"projector {setting} {getattr(projector, setting)} reads text with the OCR "
                f"reader trained beside its vision tower, and {path} has none; make a tower with one: "
                f"`visto quickstart --out DIR --until vision` (read slots are on by default), or set {setting} 0"
            )
        projector.reader.load_state_dict(detector.reader.state_dict())
    return projector


def load_region_detector(path: str | Path) -> nn.Module:
    """The `regions` connector of a visto LLaVA/CogVLM checkpoint, such as the quickstart's
    vision stage: its object detector (dense heads) and, if it reads text, its OCR reader.
    Object tokens read them, so a model whose vision tower comes from `path` takes them along."""
    path = Path(path)
    model = load(path) if is_checkpoint(path) and read_hf_config(path) is None else None
    projector = getattr(model, "multi_modal_projector", None)
    heads = getattr(projector, "heads", None)
    if heads is None:
        raise UserError(
            f"projector 'regions' reads objects with the dense heads of its vision tower, and "
            f"{path} has none; make a tower with them: `visto quickstart --out DIR --until vision` "
            "(DIR/vision/checkpoint), or use projector kind 'mlp'"
        )
    return projector


def load_clip(path: str | Path) -> CLIP:
    """The CLIP of a visto checkpoint, with its processor (clipseg's `clip_init`)."""
    family = read_config(path)["family"]
    if family != "clip":
        raise UserError(f"clip_init {path} is a {family!r} checkpoint; clipseg needs a two-tower "
                        "CLIP (e.g. `visto train --recipe clip-synth-dense`)")  # fmt: skip
    clip = load(path)
    if clip.processor is None:
        raise UserError(f"clip_init {path} has no processor (tokenizer): save it with one")
    assert isinstance(clip, CLIP)
    return clip


def load_stage1(path: str | Path) -> Blip2:
    """The BLIP-2 of a stage-1 checkpoint (`stage1_checkpoint`), with its processor."""
    family = read_config(path)["family"]
    if family != "blip2":
        raise UserError(f"stage1_checkpoint {path} holds a {family!r} model; it must be a blip2 one")
    model = load(path)
    assert isinstance(model, Blip2)
    return model
