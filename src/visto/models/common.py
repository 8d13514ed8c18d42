"""What the family files share: taking pretrained parts (and refusing a config that still
names them on disk), the processor a config names (and the lazy `processor` property built
from it), the checks that a tokenizer fits a decoder, reading a batch, and naming a training
objective.

Every family builds its parts the same way (towers handed in by visto.pretrained, which reads
`vision_init` / `language_init`; a tokenizer from `tokenizer_dir` or trained on
`tokenizer_corpus`), so each family file only wires parts together and never reads another
family's file for these steps.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from visto.data.processor import Processor, ProcessorConfig
from visto.data.special_tokens import IMAGE_TOKEN_ID
from visto.data.tokenizer import Tokenizer, corpus_texts, train_tokenizer
from visto.errors import UserError
from visto.nn.language import DecoderLM
from visto.nn.vision import ViT

# ----------------------------------------------------------------------------- pretrained parts

# The config fields that name parts on disk. visto.pretrained reads them, clears them and hands
# the built parts to the constructor; a family never opens a file while it is built.
PART_PATHS = ("vision_init", "language_init", "clip_init", "stage1_checkpoint")


def refuse_part_paths(config: Any, family: str) -> None:
    """A constructor takes built parts: a config still naming parts on disk did not go through
    visto.pretrained.build_model (visto train's builder), which reads them."""
    named = [f"{name}={getattr(config, name)!r}" for name in PART_PATHS if getattr(config, name, None)]
    if named:
        raise UserError(
            f"this {family} config names pretrained parts on disk ({', '.join(named)}); a model "
            "is built from parts: build it with visto.pretrained.build_model, which reads them"
        )


def adopt_parts(config: Any, vision: ViT | None = None, language: DecoderLM | None = None) -> Any:
    """`config` with the architectures of the pretrained parts the model is built with (a
    tower's as `vision`, a decoder's as `decoder`), so that a saved config rebuilds them."""
    changes: dict[str, Any] = {}
    if vision is not None:
        changes["vision"] = vision.config
    if language is not None:
        changes["decoder"] = language.config
    return replace(config, **changes)


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
