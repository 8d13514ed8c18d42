"""What the family files share: the pretrained towers a config names, the processor a config
names (and the lazy `processor` property built from it), the checks that a tokenizer fits a
decoder, reading a batch, and naming a training objective.

Every family builds its parts the same way (`vision_init` / `language_init` read here, then
forgotten; a tokenizer from `tokenizer_dir` or trained on `tokenizer_corpus`), so each family
file only wires parts together and never reads another family's file for these steps.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from visto.data.processor import Processor, ProcessorConfig
from visto.data.special_tokens import IMAGE_TOKEN_ID
from visto.data.tokenizer import Tokenizer, corpus_texts, train_tokenizer
from visto.errors import UserError
from visto.models.transformers_format import load_transformers, read_hf_config
from visto.nn.language import DecoderLM
from visto.nn.vision import CLIP_TYPES, SIGLIP_TYPES, ViT, load_transformers_vision

# ----------------------------------------------------------------------------- pretrained parts


def load_clip(path: str | Path) -> Any:
    """The CLIP of a visto checkpoint, with its processor (clipseg's `clip_init`)."""
    from visto.checkpoint import load, read_config

    family = read_config(path)["family"]
    if family != "clip":
        raise UserError(f"clip_init {path} is a {family!r} checkpoint; clipseg needs a two-tower "
                        "CLIP (e.g. `visto train --recipe clip-synth-dense`)")  # fmt: skip
    clip = load(path)
    if clip.processor is None:
        raise UserError(f"clip_init {path} has no processor (tokenizer): save it with one")
    return clip


def load_vision_tower(path: str | Path) -> ViT:
    """The ViT of a visto CLIP/LLaVA checkpoint, or of a transformers CLIP, SigLIP or LLaVA
    directory."""
    from visto.checkpoint import is_checkpoint, load, read_config

    path = Path(path)
    hf = read_hf_config(path)
    if hf is not None and hf["model_type"] == "llava":
        return load_transformers(path).vision_tower
    if hf is not None and hf["model_type"] not in CLIP_TYPES + SIGLIP_TYPES:
        raise UserError(
            f"{path} holds a transformers {hf['model_type']!r} model; vision_init reads a visto "
            "checkpoint or a transformers CLIP, SigLIP or LLaVA directory"
        )
    if is_checkpoint(path):
        config = json.loads((path / "config.json").read_text())
        if "family" in config:
            family = read_config(path)["family"]
            model = load(path)
            tower = {"clip": "vision_model", "llava": "vision_tower", "cogvlm": "vision_tower",
                     "flamingo": "vision_model"}.get(family)  # fmt: skip
            if tower is None:
                raise UserError(
                    f"{path} is a {family!r} checkpoint; vision_init needs one with a ViT "
                    "(clip, llava, cogvlm, flamingo)"
                )
            return getattr(model, tower)
        return load_transformers_vision(path)
    raise UserError(
        f"vision_init {path} is not a checkpoint directory (config.json + model.safetensors); "
        "make one with `visto quickstart --out DIR --until vision` (a ViT pretrained on the "
        "synthetic world's dense labels: DIR/vision/checkpoint) or `visto train --recipe clip-synth`"
    )


def load_region_detector(path: str | Path) -> nn.Module:
    """The `regions` connector of a visto LLaVA/CogVLM checkpoint, such as the quickstart's
    vision stage: its object detector (dense heads) and, if it reads text, its OCR reader.
    Object tokens read them, so a model whose vision tower comes from `path` takes them along."""
    from visto.checkpoint import is_checkpoint, load

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


class PretrainedParts(NamedTuple):
    vision: ViT | None  # the tower `vision_init` names, if any
    language: DecoderLM | None  # the decoder `language_init` names, if any
    config: Any  # the family config with their architectures in place and the paths consumed
    sources: dict[str, str | None]  # where each part came from (None: built fresh)


def load_pretrained_parts(config: Any) -> PretrainedParts:
    """Load the pretrained vision tower and decoder a family config names (`vision_init`,
    `language_init`, for the fields it has). They bring their own architectures; the paths are
    consumed here, so that a saved checkpoint rebuilds without them."""
    fields = {f.name for f in dataclasses.fields(config)}
    vision_init = getattr(config, "vision_init", None)
    language_init = getattr(config, "language_init", None)
    vision = load_vision_tower(vision_init) if vision_init else None
    language = DecoderLM.from_pretrained(language_init) if language_init else None
    changes: dict[str, Any] = {}
    sources: dict[str, str | None] = {}
    if "vision_init" in fields:
        changes["vision_init"], sources["vision"] = None, vision_init
        if vision is not None:
            changes["vision"] = vision.config
    if "language_init" in fields:
        changes["language_init"], sources["language"] = None, language_init
        if language is not None:
            changes["decoder"] = language.config
    return PretrainedParts(vision, language, replace(config, **changes), sources)


# ----------------------------------------------------------------------------- processor


def tokenizer_from_corpus(corpus: str | Path, config: ProcessorConfig) -> Tokenizer:
    """A tokenizer trained on every text of a dataset (synthetic world: all tasks, train split)."""
    from visto.data.formats import infer_format, read_samples

    fmt = infer_format(corpus)
    if fmt == "synth":
        from visto.data.synth import TASK_KINDS

        samples = read_samples(corpus, "synth", split="train", tasks=list(TASK_KINDS))
    else:
        samples = read_samples(corpus, fmt)
    return train_tokenizer(corpus_texts(samples), config.vocab_size, loc_bins=config.loc_bins)


def processor_from_config(cfg: Any, family: str) -> Processor:
    """The processor a family config names (every generative family shares these fields): its
    tokenizer from `tokenizer_dir`, or trained on the texts of `tokenizer_corpus`."""
    if cfg.tokenizer_dir:
        tokenizer = Tokenizer.load(cfg.tokenizer_dir)
    elif cfg.tokenizer_corpus:
        tokenizer = tokenizer_from_corpus(cfg.tokenizer_corpus, cfg.processor)
    else:
        raise UserError(
            f"this {family} model has no tokenizer: set model.config.tokenizer_corpus to the "
            "training data (a tokenizer is trained on its texts) or tokenizer_dir to a "
            "directory with tokenizer.json"
        )
    return Processor(cfg.processor, tokenizer)


class LazyProcessor:
    """The `processor` of a generative family, as a mixin before nn.Module: built on first use
    from the config's tokenizer_dir / tokenizer_corpus (`processor_from_config`), and every
    processor set on the model goes through the family's `accept_processor` first."""

    _processor: Processor | None = None
    display_name = "generative"  # the family as its error messages name it ("LLaVA")
    config: Any

    @property
    def processor(self) -> Processor:
        if self._processor is None:
            self.processor = processor_from_config(self.config, self.display_name)
        assert self._processor is not None
        return self._processor

    @processor.setter
    def processor(self, processor: Processor) -> None:
        self.accept_processor(processor)
        self._processor = processor

    def accept_processor(self, processor: Processor) -> None:
        """Raise UserError where `processor` does not fit this model (and adapt the model to it,
        where a part reads the tokenizer). By default: the tokenizer fits the decoder."""
        check_tokenizer_fits(processor, self.config.decoder.vocab_size)


def check_tokenizer_fits(processor: Processor, decoder_vocab_size: int) -> None:
    """The tokenizer's ids must index the decoder's embeddings, with `<image>` where the
    families splice visual tokens."""
    vocab = processor.tokenizer.vocab_size
    if vocab > decoder_vocab_size:
        raise UserError(
            f"the tokenizer has {vocab} tokens but decoder.vocab_size is "
            f"{decoder_vocab_size}; set decoder.vocab_size >= {vocab}"
        )
    if processor.tokenizer.image_id != IMAGE_TOKEN_ID:
        raise UserError(f"the tokenizer's <image> id must be {IMAGE_TOKEN_ID}")


# ----------------------------------------------------------------------------- batches


def batch_field(batch: Any, name: str) -> Any:
    """A batch entry from a collated dict or a processor `Batch` alike."""
    return batch[name] if isinstance(batch, dict) else getattr(batch, name)


# ----------------------------------------------------------------------------- objectives


class Objective(NamedTuple):
    """One way a family trains, by its method names: `loss` (batch -> {"loss": scalar, ...})
    and `batches` (samples -> the batch `loss` reads). A family that trains in several ways
    (BLIP-2's two stages) lists them as `OBJECTIVES` and a recipe's `model.objective` picks one
    (visto.train.objective); the others train `forward` on `collate`'s batches."""

    loss: str
    batches: str
