"""What the family files share, so that each reads as its own data flow: taking pretrained
parts (and refusing a config that still names them on disk), the config fields every family
has (`FamilyConfig`: decoder, processor, tokenizer source, pretrained parts; presets), the
processor a config names (and the lazy `processor` property built from it), the checks that a
tokenizer fits a decoder, the batches made of whole conversations, reading a batch, splicing
visual tokens into the decoder's input, the decoder's logits on a training batch, naming a
training objective, the region connector's question focus and pointer around a decoder, and
(`CopyingDecoding`) the LM head, pointer and generation protocol of a family whose decoder
reads its input embeddings alone. The family files import this module as `common`, so every
shared step reads `common.<name>` where it is used.

Every family builds its parts the same way (towers handed in by visto.pretrained, which reads
`vision_init` / `language_init`; a tokenizer from `tokenizer_dir` or trained on
`tokenizer_corpus`), so each family file only wires parts together and never reads another
family's file for these steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from visto.connectors.focus import Objects, read_per_row
from visto.connectors.pointer import (
    CopyingState,
    CopySlots,
    PointerHead,
    answer_of_position,
    script_cursors,
    script_token,
)
from visto.data.processor import Processor, ProcessorConfig
from visto.data.sample import Sample
from visto.data.special_tokens import IMAGE_TOKEN_ID
from visto.data.tokenizer import Tokenizer, corpus_texts, train_tokenizer
from visto.errors import UserError
from visto.losses import IGNORE_INDEX, scored_rows
from visto.nn.language import Conditioning, DecoderConfig, DecoderInputs, DecoderLM
from visto.nn.vision import ViT, ViTConfig

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


# ----------------------------------------------------------------------------- configs


def fit_problems(
    processor: ProcessorConfig, decoder: DecoderConfig, vision: ViTConfig | None = None
) -> list[str]:
    """Where a family's processor does not fit its towers: images of another size than the
    vision tower takes, token ids past the decoder's vocabulary (empty where it fits)."""
    problems = []
    if vision is not None and processor.image_size != vision.image_size:
        problems.append(
            f"processor.image_size is {processor.image_size} but the vision tower takes "
            f"{vision.image_size} px images"
        )
    if processor.vocab_size > decoder.vocab_size:
        problems.append(
            f"processor.vocab_size {processor.vocab_size} exceeds decoder.vocab_size "
            f"{decoder.vocab_size}"
        )
    return problems


def refuse_problems(family: str, problems: list[str]) -> None:
    """One UserError naming every problem of a family's config, or nothing."""
    if problems:
        raise UserError(f"{family} config: " + "; ".join(problems) + "; make them agree")


def family_preset(
    cls: type, name: str, family: str, tiny: Callable[[], dict[str, Any]], overrides: dict[str, Any]
) -> Any:
    """A family config by preset name, `overrides` on top: "tiny" (unit tests: the fields
    `tiny()` gives) or "small" (the dataclass's defaults, sized for the CPU)."""
    presets: dict[str, Callable[[], dict[str, Any]]] = {"tiny": tiny, "small": dict}
    if name not in presets:
        raise UserError(f"unknown {family} preset {name!r}; choose 'tiny' or 'small'")
    return cls(**{**presets[name](), **overrides})


def tiny_text_parts(**processor: Any) -> dict[str, Any]:
    """The `tiny` presets' decoder (DecoderConfig's tiny, 400 tokens) and processor (32 px
    images, no delimiters, 400 tokens, 32 location bins, and a family's own `processor`
    settings): a family's `tiny_fields` adds its towers."""
    return dict(
        decoder=DecoderConfig.preset("tiny", vocab_size=400),
        processor=ProcessorConfig(image_size=32, image_delimiters=False, vocab_size=400, loc_bins=32, **processor),
    )


@dataclass
class FamilyConfig:
    """What every generative family's config holds, before the family's own fields (its
    towers and connectors): the decoder, the processor (a family redeclares it with its own
    default), where a fresh model's tokenizer comes from, and the pretrained parts
    visto.pretrained reads. `preset("tiny")` is `tiny_fields()` (unit tests), `preset("small")`
    the defaults (sized for the CPU)."""

    DISPLAY_NAME: ClassVar[str] = "generative"  # the family in error messages ("LLaVA")

    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig.preset("small"))
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    # Where the tokenizer comes from when no processor is attached (a fresh model; a checkpoint
    # carries its own): a directory holding tokenizer.json (e.g. a CLIP checkpoint trained on
    # the same world), else a dataset path whose texts train one (synthetic world: every task
    # of its train split), with processor.vocab_size and processor.loc_bins.
    tokenizer_dir: str | None = None
    tokenizer_corpus: str | None = None
    # Pretrained parts, read by visto.pretrained.build_model and then forgotten (the saved
    # config holds their configs, the weights hold their weights): for the vision tower a visto
    # CLIP (or LLaVA) checkpoint or a transformers CLIP directory; for the decoder a
    # transformers Llama/Qwen2 directory (DecoderLM.from_pretrained) whose vocabulary is a
    # visto tokenizer's.
    vision_init: str | None = None
    language_init: str | None = None

    @classmethod
    def tiny_fields(cls) -> dict[str, Any]:
        """The fields of the `tiny` preset (unit tests)."""
        raise NotImplementedError

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Any:
        """The config of preset `name` ("tiny" or "small"), `overrides` on top."""
        return family_preset(cls, name, cls.DISPLAY_NAME, cls.tiny_fields, overrides)


def feature_layer_problems(vision: ViTConfig, layer: int) -> list[str]:
    """Why `layer` cannot index the tower's hidden states (transformers' indexing: 0 the
    embeddings, -1 the last layer), or nothing."""
    if -vision.layers - 1 <= layer <= vision.layers:
        return []
    return [
        f"vision_feature_layer {layer} is outside the {vision.layers + 1} hidden states of the "
        "vision tower"
    ]


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


class ConversationFamily(LazyProcessor):
    """A family that reads whole conversations, as a mixin before nn.Module: its lazy
    `processor`, the two batches the processor makes, for training and for the generation
    engine (a family that trains in several ways overrides `collate`), and its question focus
    (`focus_connector`, `pointer`: None where the family has none)."""

    def collate(self, samples: list[Sample]) -> dict[str, Tensor | None]:
        """Training batch: whole conversations, labels on the answers, right padding."""
        return self.processor.training_batch(samples)

    def prompt_batch(self, samples: list[Sample]) -> Any:
        """Prompts for generation: a final assistant turn is dropped, left padding; an image
        several rows hold (questions about one picture) is preprocessed once
        (`Processor.prompt_batch`)."""
        return self.processor.prompt_batch(samples)

    @property
    def focus_connector(self) -> Any:
        """The region connector whose question focus fills the `<focus>` slots before each
        answer, or None: the family's `question_focus` module (Flamingo's, Fuyu's; None when
        off); LLaVA (its `regions` projector with focus) and BLIP-2 (`regions`) say their own."""
        return getattr(self, "question_focus", None)

    @property
    def pointer(self) -> PointerHead | None:
        """The focus connector's pointer head (answers copy the `<focus>` slots' tokens), or None."""
        return getattr(self.focus_connector, "pointer", None)


def batch_field(batch: Any, name: str) -> Any:
    """A batch entry from a collated dict or a processor `Batch` alike."""
    return batch[name] if isinstance(batch, dict) else getattr(batch, name)


# ----------------------------------------------------------------------------- the decoder's input


def splice_visual_tokens(
    embeds: Tensor,
    input_ids: Tensor,
    pixel_values: Tensor,
    image_features: Callable[[Tensor], Tensor],
    image_sample_index: Tensor | None = None,
    hint: str = "",
) -> Tensor:
    """Token embeddings `embeds` (B, T, C) of `input_ids` with the k-th `<image>` id, counted
    row-major over the batch, holding the k-th visual token of `image_features(pixel_values)`
    (N_img, n, C): images in batch order, n `<image>` ids each. `image_sample_index` (N_img,):
    each image's row, to check that every row got its own images; `hint` ends the message when
    the counts disagree."""
    is_image = input_ids == IMAGE_TOKEN_ID  # (B, T)
    expected = int(is_image.sum())
    if pixel_values.shape[0] == 0:
        assert expected == 0, f"{expected} <image> ids in the batch but no pixel_values"
        return embeds
    features = image_features(pixel_values)  # (N_img, n, C)
    n_img, per_image = features.shape[:2]
    assert expected == n_img * per_image, (
        f"the batch has {expected} <image> ids but {n_img} images x {per_image} visual tokens "
        f"= {n_img * per_image}{hint}"
    )
    if image_sample_index is not None and input_ids.shape[0] > 1:  # one row: the total above
        per_row = torch.bincount(image_sample_index, minlength=input_ids.shape[0]) * per_image
        assert torch.equal(per_row.to(is_image.device), is_image.sum(dim=1)), (
            f"<image> ids per row {is_image.sum(dim=1).tolist()} do not match the images per "
            f"row x {per_image} = {per_row.tolist()}"
        )
    # masked_scatter fills the True positions in row-major order: row 0's images first.
    features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)  # (N_img * n, C)
    return embeds.masked_scatter(is_image[..., None], features)


def prompt_embeds(model: Any, batch: Any, embed: Any = None) -> tuple[Any, Tensor]:
    """A left-padded prompt batch (processor `Batch` or dict) -> the decoder's input embeddings
    (B, T, C) by the family's `embed_inputs(input_ids, pixel_values, image_sample_index)` (or
    whatever `embed`, taking the same, returns), and the attention mask (B, T), on the
    decoder's device (pixels in its dtype)."""
    weight = model.language_model.model.embed_tokens.weight  # fp32 also in an int8 model
    with torch.inference_mode():
        embeds = (embed or model.embed_inputs)(
            batch_field(batch, "input_ids").to(weight.device),
            batch_field(batch, "pixel_values").to(weight.device, weight.dtype),
            batch_field(batch, "image_sample_index").to(weight.device),
        )
    return embeds, batch_field(batch, "attention_mask").to(weight.device)


def training_logits(
    language_model: DecoderLM,
    embeds: Tensor,
    batch: dict[str, Tensor],
    conditioning: Conditioning | None = None,
    head: bool = True,
) -> Tensor:
    """The decoder's next-token logits (B, T, V) on a collated training batch's input
    embeddings (B, T, C): its attention mask, and positions and segments when packed.
    `head=False`: the last hidden states (B, T, C) instead (`DecoderLM.forward`)."""
    logits, _ = language_model(
        inputs_embeds=embeds,
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
        segment_ids=batch.get("segment_ids"),
        conditioning=conditioning,
        head=head,
    )
    return logits


# ----------------------------------------------------------------------------- objectives


class Objective(NamedTuple):
    """One way a family trains, by its method names: `loss` (batch -> {"loss": scalar, ...})
    and `batches` (samples -> the batch `loss` reads). A family that trains in several ways
    (BLIP-2's two stages) lists them as `OBJECTIVES` and a recipe's `model.objective` picks one
    (visto.train.objective); the others train `forward` on `collate`'s batches."""

    loss: str
    batches: str


# ----------------------------------------------------------------------------- question focus and pointer
# The region connector's question focus and pointer head (visto.connectors.regions, focus,
# pointer) as a family runs them around its decoder: LLaVA's (and CogVLM's) `regions`
# projector, BLIP-2's `regions` with question_focus, Flamingo's and Fuyu's `question_focus`.
# `connector` is a RegionConnector with its focus on (a family's `focus_connector`).


def focus_with_copies(connector: Any, objects: Objects, embed: Any, input_ids: Tensor, pixel_values: Tensor,
                      image_sample_index: Tensor | None = None,
                      segment_ids: Tensor | None = None) -> tuple[Tensor, CopySlots | None]:  # fmt: skip
    """What the focus adds to the token embeddings (B, T, C) of `input_ids` (each answer's
    named objects in its `<focus>` slots and on its `<|assistant|>` token), and what each
    answer's slots hold as token ids (one row per `<|assistant|>` token, row-major; None
    without slots): what the pointer head copies, with the JSON script its row's (first)
    image's detections write when the connector copies JSON."""
    if image_sample_index is None:  # one image per row, in order (what the processor makes)
        image_sample_index = torch.arange(pixel_values.shape[0], device=input_ids.device)
    focus = connector.focus
    read = connector.read_words(pixel_values, embed) if connector.read_slots else None
    added, copies = focus.with_copies(input_ids, embed, objects, image_sample_index, segment_ids, read)
    if copies is not None and getattr(connector, "copy_json", False):
        # each answer's script: the JSON its row's (first) image's detections write
        # (shifted by one through read_per_row: a row without an image gets -1, none)
        scripts = connector.scripts(objects, pixel_values) + 1
        script = read_per_row(scripts, image_sample_index=image_sample_index, rows=input_ids.shape[0])[0] - 1
        copies.script = script[(input_ids == focus.assistant_id).nonzero(as_tuple=True)[0]]
    return added, copies


def pointer_script_next(connector: Any, input_ids: Tensor, copies: CopySlots, b: Tensor, t: Tensor) -> Tensor | None:
    """Teacher forcing: at answer positions (b, t) (n,), the token each answer's script
    offers (n,) (-1: none; None: no scripts), the cursor moved over the answer's own tokens
    up to t as generation moves it (connectors.pointer.script_cursors)."""
    if copies.script is None or b.numel() == 0:
        return None
    assistant = connector.focus.assistant_id
    open_b, open_t = (input_ids == assistant).nonzero(as_tuple=True)  # (A,): where answers open
    answer = answer_of_position(input_ids, assistant)[b, t]
    offset = t - open_t[answer]
    at = open_t[:, None] + torch.arange(int(offset.max()) + 1, device=input_ids.device)  # (A, L)
    real = at < input_ids.shape[1]
    written = input_ids[open_b[:, None], at.clamp(max=input_ids.shape[1] - 1)]
    cursors = script_cursors(copies.script, written, real)
    return script_token(copies.script[answer], cursors[answer, offset])


def pointer_scored_logits(
    connector: Any, hidden: Tensor, lm_head: Any, input_ids: Tensor, labels: Tensor, copies: CopySlots | None
) -> tuple[Tensor, Tensor]:
    """The decoder's last hidden states (B, T, C) -> the logits at the positions whose next
    label is scored, in row-major order (n, V), with each answer's slots mixed in by the
    pointer head, and those labels (n,)."""
    b, t = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)  # position t predicts t + 1
    rows = hidden[b, t]  # (n, C)
    logits = lm_head(rows)  # (n, V)
    if copies is not None:
        answer = answer_of_position(input_ids, connector.focus.assistant_id)[b, t]
        inside = (answer >= 0).nonzero().flatten()
        script_next = pointer_script_next(connector, input_ids, copies, b[inside], t[inside])
        mixed = connector.pointer(rows[inside], logits[inside], copies[answer[inside]],
                                  input_ids[b, t][inside], script_next)  # fmt: skip
        logits = logits.index_put((inside,), mixed.to(logits.dtype))
    return logits, labels[b, t + 1]


def pointer_answer_logits(
    connector: Any, hidden: Tensor, logits: Tensor, input_ids: Tensor, labels: Tensor, copies: CopySlots
) -> Tensor:
    """Every position's logits (B, T, V) from the decoder's hidden states (B, T, C), with each
    answer's slots mixed in where an answer token is predicted (what generation samples from)."""
    answer = answer_of_position(input_ids, connector.focus.assistant_id)
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    b, t = (predicts & (answer >= 0)).nonzero(as_tuple=True)
    script_next = pointer_script_next(connector, input_ids, copies, b, t)
    mixed = connector.pointer(hidden[b, t], logits[b, t], copies[answer[b, t]], input_ids[b, t], script_next)
    return logits.index_put((b, t), mixed.to(logits.dtype))


def last_answer_slots(connector: Any, input_ids: Tensor, copies: CopySlots | None) -> CopySlots:
    """Per prompt row, the slots of its last `<|assistant|>` token (empty: none, or no image),
    and the prompt's last token (left-padded: the last column is real): what the answer being
    generated may copy."""
    pointer: PointerHead = connector.pointer
    B, device = input_ids.shape[0], input_ids.device
    # with a script column, every row has a script (-1: an empty one), so rows merge
    no_script = torch.full((B, 1), -1, dtype=torch.long, device=device)
    scripted = pointer.script_key is not None
    if copies is None or copies.ids.shape[0] == 0:
        K = pointer.slots
        return CopySlots(torch.zeros(B, K, 1, dtype=torch.long, device=device),
                         torch.zeros(B, K, 1, device=device), input_ids[:, -1],
                         no_script if scripted else None)  # fmt: skip
    last = answer_of_position(input_ids, connector.focus.assistant_id)[:, -1]
    picked = copies[last.clamp(min=0)]
    script = None
    if scripted:
        script = (no_script if picked.script is None else picked.script).masked_fill((last < 0)[:, None], -1)
    return CopySlots(picked.ids, picked.weights * (last >= 0)[:, None, None], input_ids[:, -1], script,
                     question=picked.question)  # fmt: skip


def head_on_scored_positions(
    model: Any, hidden: Tensor, batch: dict[str, Tensor], copies: CopySlots | None
) -> tuple[Tensor, Tensor]:
    """A family's LM head on its decoder's last hidden states (B, T, C) at the positions whose
    next label is scored, row-major (n, V), and those labels (n,): what the loss reads, without
    the head over padding and prompts. With the family's pointer head, each answer's slots
    (`copies`) mixed in (`pointer_scored_logits`)."""
    if model.pointer is None:
        picked, targets = scored_rows(hidden, batch["labels"])
        return model.language_model.lm_head(picked), targets
    return pointer_scored_logits(model.focus_connector, hidden, model.language_model.lm_head,
                                 batch["input_ids"], batch["labels"], copies)  # fmt: skip


def head_on_every_position(
    model: Any, hidden: Tensor, batch: dict[str, Tensor], copies: CopySlots | None
) -> Tensor:
    """A family's next-token logits (B, T, V) from its decoder's last hidden states (B, T, C):
    the LM head's, and with the family's pointer head, log-probabilities with each answer's
    slots mixed in where an answer token is predicted (what generation samples from)."""
    logits = model.language_model.lm_head(hidden)
    if model.pointer is None or copies is None:
        return logits
    return pointer_answer_logits(model.focus_connector, hidden, logits, batch["input_ids"], batch["labels"], copies)


def pointer_output_logits(
    pointer: PointerHead, hidden: Tensor, logits: Tensor, slots: CopySlots, tokens: Tensor | None = None
) -> Tensor:
    """The engine's hook after the LM head with a pointer: hidden (B, C) after the final norm,
    logits (B, V), the rows' slots, and the tokens at these positions (B,) (None: the prompt's
    last) -> log-probabilities with the slots' tokens mixed in."""
    return pointer.decode(hidden, logits, slots, tokens).to(logits.dtype)  # moves the script cursors


def question_focus_problems(focus: Any, slots: int) -> list[str]:
    """Where a family's `question_focus` (a regions ProjectorConfig, or None) and its
    processor's `slots` <focus> tokens disagree: the region connector's focus writes the
    box's 4 and then `read_slots` tokens before each answer (LLaVA's rule for its projector),
    and nothing else fills them. Flamingo's and Fuyu's configs ask this."""
    if focus is None:
        return [f"processor.focus_tokens is {slots} but only question_focus fills <focus> slots; "
                "set focus_tokens 0 or question_focus"] if slots else []  # fmt: skip
    if focus.kind != "regions" or not focus.focus:
        return [f"question_focus is the region connector's focus: kind 'regions' with focus true "
                f"(got kind {focus.kind!r}, focus {focus.focus})"]  # fmt: skip
    if slots not in (0, 4 + focus.read_slots) or (focus.read_slots and not slots):
        return [f"question_focus writes {4 + focus.read_slots} <focus> slots before each answer "
                f"(the box's 4 and read_slots {focus.read_slots}): set processor.focus_tokens to "
                f"{4 + focus.read_slots}" + ("" if focus.read_slots else " or 0")]  # fmt: skip
    return []

def accept_focus_processor(question_focus: Any, processor: Processor, slots: int) -> None:
    """A family with an optional `question_focus` (Flamingo's, Fuyu's) takes a processor: it
    must put the `slots` <focus> tokens before each answer that the model fills, and the
    focus learns the tokenizer's word ids."""
    given = processor.config.focus_tokens
    if given != slots:
        raise UserError(f"the processor puts {given} <focus> slots before each answer but this "
                        f"model fills {slots} (question_focus)")  # fmt: skip
    if question_focus is not None:
        question_focus.set_vocabulary(processor.tokenizer, given)

class CopyingDecoding:
    """A family whose decoder reads its input embeddings and nothing else, and whose answers
    may copy their `<focus>` slots through a pointer head (LLaVA's and CogVLM's regions
    projector, the `question_focus` of BLIP-2 and Fuyu), as a mixin before ConversationFamily.
    The family gives `language_model` and `embed_with_copies` (input ids and pixels -> the
    decoder's input embeddings and each answer's slots); this runs the rest the same way for
    every such family: the decoder and its LM head (with a pointer head, the slots mixed in
    after it) on a training batch, and the generation engine's protocol (visto.infer.engine),
    whose state carries the slots beside the decoder's. (Flamingo keeps its own: its decoder
    also reads the images through gated blocks, and its state holds their keys and values.)"""

    language_model: DecoderLM
    pointer: PointerHead | None  # ConversationFamily's
    focus_connector: Any  # ConversationFamily's

    def embed_with_copies(self, input_ids: Tensor, pixel_values: Tensor, image_sample_index: Tensor | None = None,
                          segment_ids: Tensor | None = None) -> tuple[Tensor, CopySlots | None]:  # fmt: skip
        raise NotImplementedError  # the family's: its input embeddings and each answer's slots

    def embed_inputs(self, input_ids: Tensor, pixel_values: Tensor, image_sample_index: Tensor | None = None,
                     segment_ids: Tensor | None = None) -> Tensor:  # fmt: skip
        """The decoder's input embeddings (B, T, C): the family's `embed_with_copies` without
        the slots (Fuyu's own: its patch embeddings alone)."""
        return self.embed_with_copies(input_ids, pixel_values, image_sample_index, segment_ids)[0]

    # -- training: the decoder on a collated batch, the LM head (and pointer) after it

    def decoder_hidden(self, batch: dict[str, Tensor]) -> tuple[Tensor, CopySlots | None]:
        """A collated (right-padded) batch -> the decoder's last hidden states (B, T, C) and
        each answer's slots, from the family's `embed_with_copies` of the batch's fields."""
        embeds, copies = self.embed_with_copies(
            batch["input_ids"], batch["pixel_values"], batch.get("image_sample_index"), batch.get("segment_ids"),
        )  # fmt: skip
        return training_logits(self.language_model, embeds, batch, head=False), copies

    def scored_answer_logits(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """`answer_logits` at the positions whose next label is scored, in row-major order
        (n, V), and those labels (n,): what `forward`'s loss reads, without the head over every
        position and a copy of all the logits (`head_on_scored_positions`)."""
        hidden, copies = self.decoder_hidden(batch)
        return head_on_scored_positions(self, hidden, batch, copies)

    def answer_logits(self, batch: dict[str, Tensor]) -> Tensor:
        """A collated batch -> the next-token logits (B, T, V) the loss scores: the decoder's,
        and with a pointer head, log-probabilities with each answer's slots mixed in where an
        answer token is predicted (what generation samples from; `head_on_every_position`)."""
        hidden, copies = self.decoder_hidden(batch)
        return head_on_every_position(self, hidden, batch, copies)

    # -- generation: the engine's protocol

    def prefill_inputs(self, batch: Any) -> tuple[Tensor, Tensor] | DecoderInputs:
        """A left-padded batch (processor `Batch` or dict) -> the decoder's input embeddings
        (B, T, C) by `embed_with_copies` and the attention mask (B, T); the engine's fast path
        runs the decoder on them. With a pointer head, `DecoderInputs` whose per-row context
        is what the answer being generated (the prompt's last `<|assistant|>`) may copy
        (`output_logits` mixes it in). (Fuyu's own: its batches carry patch grids.)"""
        if self.pointer is None:
            return prompt_embeds(self, batch)
        (embeds, copies), mask = prompt_embeds(self, batch, self.embed_with_copies)
        input_ids = batch_field(batch, "input_ids").to(mask.device)
        return DecoderInputs(embeds, mask, context=last_answer_slots(self.focus_connector, input_ids, copies))

    def output_logits(self, hidden: Tensor, logits: Tensor, context: Any, tokens: Tensor | None = None) -> Tensor:
        """The engine's hook after the LM head: hidden (B, C) after the final norm, logits
        (B, V), the rows' `CopySlots`, and the tokens at these positions (B,) (None: the
        prompt's last) -> what to sample from (log-probabilities with the slots' tokens mixed
        in; the logits unchanged without a pointer)."""
        if self.pointer is None or not isinstance(context, CopySlots):
            return logits
        return pointer_output_logits(self.pointer, hidden, logits, context, tokens)

    @torch.inference_mode()
    def prefill(self, batch: Any) -> tuple[Tensor, Any]:
        """A left-padded batch (processor `Batch` or dict) -> last logits (B, V) and state."""
        inputs = self.prefill_inputs(batch)
        if not isinstance(inputs, DecoderInputs):
            return self.language_model.prefill_embeds(*inputs)
        hidden, state = self.language_model.prefill_embeds(inputs.embeds, inputs.attention_mask, head=False)
        logits = self.output_logits(hidden, self.language_model.lm_head(hidden), inputs.context)
        return logits, CopyingState(state, inputs.context)

    @torch.inference_mode()
    def decode_step(self, next_ids: Tensor, state: Any) -> tuple[Tensor, Any]:
        if not isinstance(state, CopyingState):
            return self.language_model.decode_step(next_ids, state)
        hidden, decoder = self.language_model.decode_step(next_ids, state.decoder, head=False)
        logits = self.output_logits(hidden, self.language_model.lm_head(hidden), state.slots, next_ids)
        return logits, CopyingState(decoder, state.slots)
