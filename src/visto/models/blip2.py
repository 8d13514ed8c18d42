"""BLIP-2 (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image
Encoders and Large Language Models"): a frozen vision tower, a Q-Former, a frozen decoder.

    pixels (N, 3, S, S) -> frozen ViT, every token of the last layer, post_layernorm (N, 1 + P, D_v)
                        -> Q-Former: Q learned queries cross-attend to them           (N, Q, D_q)

Stage 1, representation learning (section 3.2; losses "itc", "itm", "itg"), on image-caption
pairs, the decoder unused. One Q-Former pass per loss, each under its own mask (Fig. 2):
    ITC  unimodal mask. Image-text similarity = the best of the Q query-text cosines
         (max over queries); InfoNCE both ways with label smoothing, learned temperature.
    ITM  bidirectional mask. For every text a hard negative image and for every image a hard
         negative text, drawn from the ITC similarities (ALBEF's mining); a 2-way linear head
         on every query output, averaged over the queries: match or not.
    ITG  multimodal causal mask. The caption's first token is replaced by a "decode" marker
         and the text predicts its next token, seeing every query but only earlier text; the
         queries cannot see the text, so all they know of the image they must carry themselves.

Stage 2, generative learning (section 3.3; loss "lm"): the query outputs go through
`language_projection` and are spliced, as a soft visual prompt, into the frozen decoder's input
at the `<image>` ids (the processor puts `num_queries` of them per image), then next-token CE
on the answers. Generation is the LLaVA engine protocol: `prompt_batch`, `prefill`,
`decode_step`, so `visto chat`, `visto eval` and `visto serve` need nothing BLIP-2-specific.

Options beyond the paper, all off by default (their checkpoints and the transformers format
are unchanged without them; `export_hf` refuses a model with any):
    qformer_input "regions"  the queries cross-attend the object tokens of the region
        connector (connectors.regions: one token per object the dense heads of the
        `vision_init` tower detect, its attributes as the decoder's word embeddings) instead of
        every patch; its keys are `regions.*`, new ones.
    instruct  InstructBLIP's instruction-aware queries (Dai et al. 2023): before every answer
        the queries run again with that answer's question beside them in the Q-Former's
        self-attention, and the first `processor.focus_tokens` outputs fill the `<focus>`
        slots the processor puts before the answer (one pass per answer, so independent turns,
        multi-turn chat and generation see the same thing); no new parameter.
    prompt_words  every visual prompt vector also carries a distribution over the decoder's
        words: softmax(word_head(query output)) @ E (E: the decoder's input embeddings) is
        added to language_projection(query output), so the prompt speaks the decoder's own
        word space (OSCAR's tags; what the region connector's object tokens do for LLaVA);
        its keys are `word_head.*`, new ones. With `instruct_assistant` the last slot's word
        mix is also added to the answer's `<|assistant|>` token, where the answer's first
        token is predicted, so through the decoder's tied output head it is already a logit.
    question_focus  the region connector's question focus and pointer (connectors.focus,
        named, pointer; LLaVA's `regions` projector settings): each answer's question picks
        the objects it names (by word identity, no gradient), and they reach the decoder in
        that answer's `<focus>` slots (their box's location tokens, what the OCR reader read)
        and on its `<|assistant|>` token, where a pointer head lets the answer copy the slots'
        tokens; the soft visual prompt at `<image>` stays the Q-Former's (over the patches, or
        over the same object tokens with qformer_input "regions"). Training, eval and the
        generation engine run it as LLaVA does (models.common's focus and pointer functions);
        its keys are `regions.*`.
Measured in `visto compare`: bench/README.md, "BLIP-2 in compare".

Stages are recipes (`blip2-stage1.json`, `blip2-stage2.json`); stage 2 starts from stage 1 by
`stage1_checkpoint` (read by visto.pretrained, handed in as `stage1`), which brings the towers'
configs, weights and the processor, while the losses (and optionally a pretrained decoder) are
stage 2's own. `PARAM_GROUPS` names the
modules for `optim.module_lrs` (0 = frozen).

Names follow transformers' `Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval`
(`vision_model`, `qformer`, `query_tokens`, `vision_projection`, `text_projection`, `itm_head`,
`language_projection`, `language_model`), so `load_hf` is a short key map. Its vision tower is
BLIP's ViT, which differs from visto's in three ways, all handled exactly: no LayerNorm before
the blocks (`vision_pre_norm=False`), a bias on the patch convolution (folded into the position
table: it adds the same vector to every patch), and a fused qkv projection (split).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visto.connectors.focus import answer_questions
from visto.connectors.pointer import CopySlots
from visto.connectors.projector import ProjectorConfig, build_projector
from visto.connectors.qformer import QFormer, QFormerConfig
from visto.connectors.regions import RegionConnector
from visto.data.pairs import caption_of, image_key
from visto.data.processor import IGNORE_INDEX, Processor, ProcessorConfig
from visto.data.sample import Sample
from visto.data.special_tokens import IMAGE, IMAGE_TOKEN_ID
from visto.errors import UserError
from visto.losses import (
    answer_loss,
    batch_ids,
    itm_loss,
    lm_loss,
    pair_positives,
    scored_answer_loss,
)
from visto.models import common
from visto.nn.language import DecoderConfig, DecoderLM
from visto.nn.vision import CLIP_MEAN, CLIP_STD, ViT, ViTConfig

STAGE1_LOSSES = ("itc", "itm", "itg")
STAGE2_LOSSES = ("lm",)
QFORMER_INPUTS = ("patches", "regions")
NEGATIVE_MINING = ("sample", "hardest")

# Names for optim.module_lrs: group -> the parameter-name prefix it covers.
PARAM_GROUPS = {
    "vision": "vision_model",
    "qformer": "qformer",
    "itc_image": "vision_projection",
    "itc_text": "text_projection",
    "itc_temperature": "temp",
    "itm": "itm_head",
    "projection": "language_projection",
    "language": "language_model",
}
# (qformer_input "regions" adds `regions`, the object tokens' maps; its dense heads take no
# gradient: the detector that selects the objects is frozen)


def _tiny_qformer() -> QFormerConfig:
    return QFormerConfig(
        num_queries=8, hidden_size=32, layers=2, heads=4, intermediate_size=64, vocab_size=400,
        max_text_len=24, dropout=0.0,
    )



@dataclass
class Blip2Config(common.FamilyConfig):
    """common.FamilyConfig's decoder, processor, tokenizer source and pretrained parts, then BLIP-2's
    vision tower, Q-Former and losses, stage 2's start, and the options beyond the paper."""

    DISPLAY_NAME: ClassVar[str] = "BLIP-2"

    # image_tokens = the Q-Former's num_queries; no delimiters, as transformers' Blip2Processor.
    processor: ProcessorConfig = field(default_factory=lambda: ProcessorConfig(
        image_size=64, image_tokens=16, image_delimiters=False, resize_mode="resize", max_length=192
    ))
    vision: ViTConfig = field(default_factory=lambda: ViTConfig.preset("small"))
    # False: no LayerNorm before the ViT blocks (BLIP's ViT, as transformers stores BLIP-2).
    vision_pre_norm: bool = True
    qformer: QFormerConfig = field(
        default_factory=lambda: QFormerConfig(num_queries=16, max_text_len=48)
    )
    embed_dim: int = 64  # the ITC space (the paper's 256)
    losses: list[str] = field(default_factory=lambda: list(STAGE1_LOSSES))
    itm_negatives: str = "sample"  # "sample" ∝ exp(similarity) (ALBEF, BLIP-2) | "hardest"
    itc_label_smoothing: float = 0.1  # as in BLIP-2's released training code
    init_temperature: float = 0.07
    # Read by visto.pretrained.build_model, then forgotten (the saved config holds what it
    # brought), as common.FamilyConfig's vision_init and language_init: a BLIP-2 stage-1 checkpoint
    # for the vision tower, Q-Former, ITC/ITM heads and processor (and the decoder unless
    # language_init).
    stage1_checkpoint: str | None = None
    # What the Q-Former's queries cross-attend: "patches", every token of the ViT's last layer
    # (the paper's), or "regions", the object tokens of the region connector
    # (connectors.regions: one token per object the dense heads of a `vision_init` tower
    # detect, its attributes as the decoder's word embeddings; `region_slots` of them).
    qformer_input: str = "patches"
    region_slots: int = 10
    # Instruction-aware queries (InstructBLIP, Dai et al. 2023, section 2.2): before every
    # answer the queries run again with that answer's question in the Q-Former's
    # self-attention (queries and question see each other; only the queries read the image),
    # and the first `processor.focus_tokens` query outputs, through language_projection, fill
    # the `<focus>` slots the processor puts before the answer. The question-free visual
    # prompt at `<image>` stays.
    instruct: bool = False
    # The visual prompt in the decoder's word space (module docstring): each prompt vector is
    # language_projection(q) + softmax(word_head(q)) @ E, E the decoder's input embeddings.
    prompt_words: bool = False
    # With instruct, the last <focus> slot's prompt vector (with prompt_words: its word mix
    # alone) is also added to the answer's `<|assistant|>` token, where the answer's first
    # token is predicted (what the region connector's focus does without slots): through the
    # decoder's tied output head a word mix there is already that word's logit.
    instruct_assistant: bool = False
    # The region connector's question focus (connectors.focus, named, pointer: the settings of
    # LLaVA's `projector` block, kind "regions" with focus), in front of BLIP-2's decoder: each
    # answer's `<focus>` slots and `<|assistant|>` token hold what its question names of the
    # object tokens (their box's and the read text's tokens, the named words), and with
    # `pointer` the answer may copy them. The visual prompt at `<image>` stays the Q-Former's
    # query outputs (over the patches, or with qformer_input "regions" over the same object
    # tokens). None: off. Its keys are `regions.*` (the connector's).
    question_focus: ProjectorConfig | None = None

    def __post_init__(self) -> None:
        problems = []
        losses = set(self.losses)
        if not losses or not (losses <= set(STAGE1_LOSSES) or losses <= set(STAGE2_LOSSES)):
            problems.append(
                f"losses must be some of {list(STAGE1_LOSSES)} (stage 1) or {list(STAGE2_LOSSES)} "
                f"(stage 2), not a mix; got {self.losses}"
            )
        if self.itm_negatives not in NEGATIVE_MINING:
            problems.append(f"itm_negatives must be one of {NEGATIVE_MINING}")
        if not 0 <= self.itc_label_smoothing < 1:
            problems.append("itc_label_smoothing must be in [0, 1)")
        if not 0 < self.init_temperature <= 0.5:
            problems.append("init_temperature must be in (0, 0.5]")
        if self.processor.resize_mode == "patch":
            problems.append("BLIP-2 encodes square images: processor.resize_mode 'pad' or 'resize'")
        if self.qformer_input not in QFORMER_INPUTS:
            problems.append(f"qformer_input must be one of {QFORMER_INPUTS}, got {self.qformer_input!r}")
        if self.region_slots < 1:
            problems.append("region_slots must be >= 1")
        if self.instruct_assistant and not self.instruct:
            problems.append("instruct_assistant adds the instruct slots' last vector to <|assistant|>: set instruct too")
        f = self.question_focus
        if f is not None:
            if f.kind != "regions" or not f.focus:
                problems.append("question_focus is the region connector's focus: set its kind 'regions' and focus true")
            if self.instruct:
                problems.append("question_focus and instruct both fill the <focus> slots: set one")
            if self.qformer_input == "regions" and f.slots != self.region_slots:
                problems.append(f"the Q-Former reads the question focus's object tokens: question_focus.slots "
                                f"{f.slots} and region_slots {self.region_slots} must agree")  # fmt: skip
            if self.qformer_input == "patches" and (f.box_tokens or f.text_slots):
                problems.append("question_focus box_tokens and text_slots shape the object tokens the Q-Former "
                                "reads only with qformer_input 'regions'; set them off")  # fmt: skip
        if problems:
            raise UserError("blip2 config: " + "; ".join(problems))

    @property
    def stage(self) -> int:
        return 2 if self.losses == ["lm"] else 1

    def check_sizes(self) -> None:
        p, problems = self.processor, []
        if p.image_size != self.vision.image_size:
            problems.append(
                f"processor.image_size {p.image_size} but the vision tower takes "
                f"{self.vision.image_size} px"
            )
        if p.image_tokens != self.qformer.num_queries:
            problems.append(
                f"processor.image_tokens {p.image_tokens} but the Q-Former makes "
                f"{self.qformer.num_queries} query outputs per image"
            )
        f = self.question_focus
        if f is not None and (p.focus_tokens not in (0, 4 + f.read_slots) or (f.read_slots and not p.focus_tokens)):
            problems.append(
                f"question_focus writes the box's 4 and {f.read_slots} read tokens into the <focus> slots "
                f"before each answer: processor.focus_tokens must be {4 + f.read_slots}"
                + ("" if f.read_slots else " or 0")
                + f", got {p.focus_tokens}"
            )
        if self.instruct and not 1 <= p.focus_tokens <= self.qformer.num_queries:
            problems.append(
                f"instruct writes query outputs into the <focus> slots before each answer: "
                f"processor.focus_tokens must be 1 to {self.qformer.num_queries} (num_queries), "
                f"got {p.focus_tokens}"
            )
        if p.focus_tokens and not (self.instruct or f is not None):
            problems.append(f"processor.focus_tokens is {p.focus_tokens} but only instruct fills <focus> slots "
                            "(or question_focus)")  # fmt: skip
        for name, size in (("decoder", self.decoder.vocab_size), ("qformer", self.qformer.vocab_size)):
            if p.vocab_size > size:
                problems.append(f"processor.vocab_size {p.vocab_size} exceeds {name}.vocab_size {size}")
        if problems:
            raise UserError("blip2 config: " + "; ".join(problems) + "; make them agree")

    @classmethod
    def tiny_fields(cls) -> dict[str, Any]:
        """Unit tests: 32 px, 8 queries, 2-layer towers (`small`, the defaults: the CPU world)."""
        return dict(vision=ViTConfig.preset("tiny"), qformer=_tiny_qformer(), embed_dim=16,
                    **common.tiny_text_parts(image_tokens=8, resize_mode="resize"))  # fmt: skip


# ----------------------------------------------------------------------------- stage-1 losses


def itc_similarity(query_feats: Tensor, text_feats: Tensor) -> Tensor:
    """(B_i, Q, E) unit query features, (B_t, E) unit text features -> (B_i, B_t): for each
    pair, the highest similarity over the queries (paper, section 3.2, ITC)."""
    return torch.einsum("iqe,te->itq", query_feats, text_feats).amax(dim=-1)


def contrastive_ce(logits: Tensor, positives: Tensor, smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of each row of logits (B, B) against its diagonal; the other positive
    pairs (duplicate captions or images, see visto.losses) are neither target nor negative,
    and label smoothing spreads `smoothing` over the remaining columns only."""
    B = logits.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=logits.device)
    valid = ~(positives & ~eye)  # (B, B) columns that take part
    log_probs = logits.masked_fill(~valid, float("-inf")).log_softmax(dim=-1)
    off = (valid & ~eye).float()
    targets = (1 - smoothing) * eye.float() + smoothing * (eye.float() + off) / valid.sum(1, keepdim=True)
    return -(targets * log_probs.masked_fill(~valid, 0.0)).sum(dim=-1).mean()


def mine_hard_negatives(
    logits: Tensor, positives: Tensor, sample: bool = True, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Negatives for ITM from the ITC logits (B_img, B_txt), ALBEF-style (Li et al. 2021, 3.3).

    Returns (image_for_text, text_has_negative, text_for_image, image_has_negative): for each
    text the index of a non-matching image, and for each image a non-matching text, chosen as
    the most similar one (`sample=False`) or drawn with probability softmax(logits) over the
    non-matching ones (`sample=True`). A row whose every candidate matches has no negative.
    """
    blocked = logits.detach().float().masked_fill(positives, float("-inf"))

    def pick(scores: Tensor) -> tuple[Tensor, Tensor]:  # scores (rows, candidates)
        has = torch.isfinite(scores).any(dim=1)
        scores = scores.masked_fill(~has[:, None], 0.0)  # rows with no negative: any index
        if not sample:
            return scores.argmax(dim=1), has
        probs = scores.softmax(dim=1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1), has

    image_for_text, text_has = pick(blocked.t())
    text_for_image, image_has = pick(blocked)
    return image_for_text, text_has, text_for_image, image_has


# ----------------------------------------------------------------------------- connector parts


def build_regions(config: Blip2Config) -> RegionConnector:
    """The region connector the Q-Former reads with qformer_input "regions": patch features at
    the tower's width in, `region_slots` object tokens at the decoder's width out (its dense
    heads fresh here; visto.pretrained loads those of the `vision_init` tower). With
    `question_focus`, the connector those settings make, as LLaVA's `regions` projector
    builds it (`build_projector`), its focus and pointer on."""
    if config.question_focus is not None:
        connector = build_projector(config.question_focus, config.vision.width, config.decoder.hidden_size)
        assert isinstance(connector, RegionConnector)
        return connector
    return RegionConnector(config.vision.width, config.decoder.hidden_size, config.region_slots)


@dataclass(frozen=True)
class QuestionIds:
    """The token ids an answer's question is found by (`question_spans`)."""

    user: int
    assistant: int
    focus: int
    first_text: int  # ids below this are special tokens (roles, image, padding)

    @classmethod
    def of(cls, tokenizer: Any) -> QuestionIds:
        if tokenizer.focus_id is None:
            raise UserError(
                "instruct writes into <focus> slots and the tokenizer has no <focus> token; add it "
                "with visto.data.tokenizer.with_focus_token (and size both vocabularies to it)"
            )
        special = [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.image_id,
                   tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.im_newline_id,
                   tokenizer.end_id, *tokenizer.role_ids.values()]  # fmt: skip
        return cls(tokenizer.role_ids["user"], tokenizer.role_ids["assistant"], tokenizer.focus_id,
                   max(i for i in special if i is not None) + 1)  # fmt: skip


def question_spans(
    input_ids: Tensor, ids: QuestionIds, segment_ids: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every `<|assistant|>` token's question: (rows (P,), columns (P,), its text tokens (P, L),
    left-aligned and padded with 0, which are real (P, L)). A question is the text since the
    last `<|user|>` token before the answer, or since its exchange began when exchanges are
    packed (`segment_ids`: later exchanges share the first one's `<|user|>` in the prefix)."""
    rows, cols, at, text = answer_questions(input_ids, ids.user, ids.assistant, ids.focus,
                                            ids.first_text, segment_ids)  # fmt: skip
    # left-align each question's text tokens (a stable sort puts the real ones first, in order)
    order = torch.sort((~text).to(torch.int8), dim=1, stable=True).indices
    at, text = at.gather(1, order), text.gather(1, order)
    L = int(text.sum(1).max()) if rows.numel() else 0
    at, text = at[:, :L], text[:, :L]
    return rows, cols, torch.where(text, input_ids[rows[:, None], at], 0), text


def first_image_of_rows(image_sample_index: Tensor | None, rows: int, images: int) -> Tensor:
    """(rows,) the index of each row's first image, -1 for a row without one (images in batch
    order; `image_sample_index` (N_img,) the row of each, None: image i in row i)."""
    if image_sample_index is None:
        image_sample_index = torch.arange(images)
    device = image_sample_index.device
    first = torch.full((rows,), images, dtype=torch.long, device=device)
    first = first.scatter_reduce(0, image_sample_index.long(), torch.arange(images, device=device), "amin")
    return torch.where(first < images, first, -1)


# ----------------------------------------------------------------------------- the model


class Blip2(common.CopyingDecoding, common.ConversationFamily, nn.Module):
    family, display_name, PARAM_GROUPS = "blip2", "BLIP-2", PARAM_GROUPS

    def __init__(self, config: Blip2Config, vision: ViT | None = None, language: DecoderLM | None = None,
                 stage1: Blip2 | None = None, regions: RegionConnector | None = None) -> None:  # fmt: skip
        """Parts built elsewhere (visto.pretrained): a stage-1 model brings its towers'
        configs, weights and processor; `vision` / `language` (vision_init, language_init)
        replace its tower / decoder; `regions`, the region connector with the dense heads of
        the `vision_init` tower (qformer_input "regions"). What is not given is built fresh here."""
        super().__init__()
        common.refuse_part_paths(config, self.family)
        if stage1 is not None:
            s = stage1.config
            config = replace(
                config, vision=s.vision, vision_pre_norm=s.vision_pre_norm, qformer=s.qformer,
                embed_dim=s.embed_dim, processor=s.processor, decoder=s.decoder,
                tokenizer_dir=s.tokenizer_dir, tokenizer_corpus=s.tokenizer_corpus,
                qformer_input=s.qformer_input, region_slots=s.region_slots,
            )
        config = common.adopt_parts(config, vision, language)
        if vision is not None:  # a tower handed in is used as it was trained: nothing removed
            config = replace(config, vision_pre_norm=True)
        config.check_sizes()
        self.config = config
        self.vision_model = vision if vision is not None else ViT(config.vision)
        if not config.vision_pre_norm:
            self.vision_model.pre_layrnorm = nn.Identity()  # BLIP's ViT has none
        q = config.qformer
        by_regions = config.qformer_input == "regions"
        self.qformer = QFormer(q, config.decoder.hidden_size if by_regions else config.vision.width)
        self.vision_projection = nn.Linear(q.hidden_size, config.embed_dim)
        self.text_projection = nn.Linear(q.hidden_size, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(config.init_temperature))
        self.itm_head = nn.Linear(q.hidden_size, 2)  # (no match, match), as transformers'
        self.language_projection = nn.Linear(q.hidden_size, config.decoder.hidden_size)
        self.language_model = language if language is not None else DecoderLM(config.decoder)
        if config.prompt_words:  # zero: the word mix starts as the mean word, then learns
            self.word_head = nn.Linear(q.hidden_size, config.decoder.vocab_size)
            nn.init.zeros_(self.word_head.weight)
            nn.init.zeros_(self.word_head.bias)
        for head in (self.vision_projection, self.text_projection, self.itm_head, self.language_projection):
            nn.init.normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        if by_regions or config.question_focus is not None:
            # object tokens at the decoder's width, read by the Q-Former and/or the question focus
            self.regions = regions if regions is not None else build_regions(config)
        # token ids the instruction-aware queries find each answer's question by (accept_processor)
        self._question_ids: QuestionIds | None = None
        if stage1 is not None:
            self._adopt_stage1(stage1, keep_decoder=language is None)

    def _adopt_stage1(self, stage1: Blip2, keep_decoder: bool) -> None:
        """Copy the stage-1 weights (the decoder and its projection too unless replaced)."""
        ours = self.state_dict()
        with torch.no_grad():
            for key, value in stage1.state_dict().items():
                if key.startswith(("language_model.", "language_projection.")) and not keep_decoder:
                    continue
                ours[key].copy_(value)
        if stage1._processor is not None:
            self.processor = stage1._processor

    # -- processor (common.ConversationFamily: built from the config on first use)

    def accept_processor(self, processor: Processor) -> None:
        vocab, cfg = processor.tokenizer.vocab_size, self.config
        if vocab > min(cfg.decoder.vocab_size, cfg.qformer.vocab_size):
            raise UserError(
                f"the tokenizer has {vocab} tokens but decoder.vocab_size is "
                f"{cfg.decoder.vocab_size} and qformer.vocab_size {cfg.qformer.vocab_size}; "
                f"set both >= {vocab}"
            )
        if processor.tokenizer.image_id != IMAGE_TOKEN_ID:
            raise UserError(f"the tokenizer's <image> id must be {IMAGE_TOKEN_ID}")
        if processor.config.image_tokens != cfg.qformer.num_queries:
            raise UserError(
                f"the processor puts {processor.config.image_tokens} <image> ids per image but the "
                f"Q-Former makes {cfg.qformer.num_queries} query outputs; set processor.image_tokens "
                f"= qformer.num_queries"
            )
        fills = cfg.processor.focus_tokens if (cfg.instruct or cfg.question_focus is not None) else 0
        if processor.config.focus_tokens != fills:
            raise UserError(
                f"the processor puts {processor.config.focus_tokens} <focus> slots before each answer "
                f"but this model fills {fills} (instruct or question_focus: processor.focus_tokens)"
            )
        if cfg.question_focus is not None:
            self.regions.set_vocabulary(processor.tokenizer, processor.config.focus_tokens)
        elif cfg.qformer_input == "regions":
            self.regions.set_vocabulary(processor.tokenizer)
        if cfg.instruct:
            self._question_ids = QuestionIds.of(processor.tokenizer)

    # -- towers

    def image_embeds(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, S, S) -> every token of the ViT's last layer after post_layernorm, CLS
        included, (N, 1 + P, D_v): what BLIP-2's Q-Former reads (transformers: `image_embeds`)."""
        vit = self.vision_model
        x = vit.pre_layrnorm(vit.embeddings(pixel_values))  # (N, 1 + P, D_v)
        for block in vit.encoder.layers:
            x = block(x)
        return vit.post_layernorm(x)

    def qformer_image(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, S, S) -> what the Q-Former's queries cross-attend: `image_embeds` (N, 1 + P, D_v),
        or with qformer_input "regions" the object tokens (N, region_slots, D_lm): the region
        connector on the tower's patch features (CLS dropped, as LLaVA's connector reads them)."""
        if self.config.qformer_input == "patches":
            return self.image_embeds(pixel_values)
        features = self.vision_model(pixel_values, feature_layer=-1, pooled=False).features
        return self.regions(features, self.language_model.model.embed_tokens)

    def query_outputs(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, S, S) -> the Q-Former's query outputs (N, Q, D_q), no text."""
        return self._queries(self.qformer_image(pixel_values))

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, S, S) -> the soft visual prompt (N, Q, D_lm)."""
        return self.prompt(self.query_outputs(pixel_values))

    def prompt(self, queries: Tensor) -> Tensor:
        """Query outputs (..., D_q) -> visual prompt vectors (..., D_lm) in the decoder's input
        space: language_projection, plus with `prompt_words` a mix of the decoder's word
        embeddings weighted by softmax(word_head)."""
        out = self.language_projection(queries)
        return out + self.word_mix(queries) if self.config.prompt_words else out

    def word_mix(self, queries: Tensor) -> Tensor:
        """(..., D_q) -> softmax(word_head) @ E, the decoder's word embeddings mixed (..., D_lm)."""
        return self.word_head(queries).softmax(-1) @ self.language_model.model.embed_tokens.weight

    def embed_with_copies(self, input_ids: Tensor, pixel_values: Tensor, image_sample_index: Tensor | None = None,
                          segment_ids: Tensor | None = None) -> tuple[Tensor, CopySlots | None]:  # fmt: skip
        """Token embeddings (B, T, D_lm), the k-th `<image>` id (row-major) holding the k-th
        visual prompt vector (images in batch order, Q ids each); with `instruct`, each
        answer's `<focus>` slots holding its question's query outputs, and with
        `question_focus` what the region connector's focus adds (`segment_ids` of packed
        exchanges tell where each exchange's question begins). Also, with `question_focus`,
        what each answer's `<focus>` slots hold as token ids (one row per `<|assistant|>` token,
        row-major; None without the focus's slots or images): what the pointer head copies
        (connectors.pointer). `embed_inputs` (common.CopyingDecoding) is the embeddings alone."""
        embeds = self.language_model.embed(input_ids)  # (B, T, C)
        hint = " (one per Q-Former query)"
        connector = self.focus_connector
        if pixel_values.shape[0] == 0 or (connector is None and not self.config.instruct):
            return common.splice_visual_tokens(
                embeds, input_ids, pixel_values, self.image_features, image_sample_index, hint=hint,
            ), None  # fmt: skip
        # What the Q-Former reads, computed once for the visual prompt and the <focus> slots
        if connector is not None:
            # the objects, detected once: the focus reads them, and with qformer_input "regions"
            # the Q-Former too; the soft prompt at <image> is the Q-Former's either way
            embed = self.language_model.model.embed_tokens
            features = self.vision_model(pixel_values, feature_layer=-1, pooled=False).features
            objects = connector.objects(features, embed)
            if self.config.qformer_input == "regions":
                image = connector.visual_tokens(objects, embed, pixel_values)
            else:
                image = self.image_embeds(pixel_values)
        else:  # instruct: the question-free prompt and each answer's question pass
            image = self.qformer_image(pixel_values)
        embeds = common.splice_visual_tokens(
            embeds, input_ids, pixel_values, lambda _: self.prompt(self._queries(image)),
            image_sample_index, hint=hint,
        )  # fmt: skip
        if connector is None:
            return self._instruct_slots(embeds, input_ids, image, image_sample_index, segment_ids), None
        added, copies = common.focus_with_copies(connector, objects, embed, input_ids, pixel_values,
                                          image_sample_index, segment_ids)  # fmt: skip
        return embeds + added.to(embeds.dtype), copies

    @property
    def focus_connector(self) -> RegionConnector | None:
        """The region connector whose question focus fills the `<focus>` slots (question_focus),
        or None; its pointer head is `pointer` (common.ConversationFamily's)."""
        return self.regions if self.config.question_focus is not None else None

    def _queries(self, image: Tensor) -> Tensor:
        out = self.qformer(image)
        assert out.queries is not None
        return out.queries

    def _instruct_slots(
        self, embeds: Tensor, input_ids: Tensor, image: Tensor, image_sample_index: Tensor | None,
        segment_ids: Tensor | None,
    ) -> Tensor:  # fmt: skip
        """`embeds` with every answer's `<focus>` slots (the K positions before its
        `<|assistant|>` token) replaced by the first K query outputs of a Q-Former pass over
        the answer's row's (first) image with its question's tokens beside the queries."""
        ids = self._question_ids
        if ids is None:
            raise RuntimeError("instruct needs the processor's token ids: attach a processor first")
        K = self.config.processor.focus_tokens
        rows, cols, question, real = question_spans(input_ids, ids, segment_ids)
        first_image = first_image_of_rows(image_sample_index, input_ids.shape[0], image.shape[0])
        image_of = first_image[rows]  # (P,)
        at = cols[:, None] - K + torch.arange(K, device=cols.device)  # (P, K)
        # An answer of a row with an image, after its K slots (the processor puts them before
        # every answer; an `<|assistant|>` token a model wrote itself has none and is left as it is)
        keep = (image_of >= 0) & (input_ids[rows[:, None], at.clamp(min=0)] == ids.focus).all(1) & (cols >= K)
        rows, at, question, real, image_of = rows[keep], at[keep], question[keep], real[keep], image_of[keep]
        if not rows.numel():
            return embeds
        n = self.config.qformer.max_text_len  # the Q-Former's text positions: a question's first n words
        question, real = question[:, :n], real[:, :n]
        out = self.qformer(image[image_of], question, real.long(), mode="bidirectional")
        assert out.queries is not None
        slots = self.prompt(out.queries[:, :K]).to(embeds.dtype)  # (P, K, D_lm)
        embeds = embeds.clone()
        embeds[rows[:, None].expand_as(at), at] = slots
        if self.config.instruct_assistant:  # the answer's first token is predicted at <|assistant|>
            # With prompt_words only the word mix: a word embedding's size, where the projection
            # (norm ~10 after training, the words' ~0.6) would drown the token in the decoder's norm.
            last = out.queries[:, K - 1]
            add = self.word_mix(last) if self.config.prompt_words else self.prompt(last)
            embeds[rows, at[:, -1] + 1] = embeds[rows, at[:, -1] + 1] + add.to(embeds.dtype)
        return embeds

    # -- training

    # The two training objectives, one per stage: the recipe names one (`model.objective`)
    # and visto train calls its loss and batch methods (visto.train.objective).
    OBJECTIVES = {
        "representation": common.Objective(loss="representation_losses", batches="pair_batch"),
        "generative": common.Objective(loss="generative_loss", batches="conversation_batch"),
    }

    @property
    def default_objective(self) -> str:
        """The objective `config.losses` names: stage 1's losses or stage 2's "lm"."""
        return "generative" if self.config.stage == 2 else "representation"

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The loss of `default_objective`, for code that treats every family alike."""
        return getattr(self, self.OBJECTIVES[self.default_objective].loss)(batch)

    def generative_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Stage 2: next-token CE on the answers, the visual prompt at the <image> ids. With
        the focus's pointer head, on the scored positions only, the slots' tokens mixed in
        (`scored_answer_logits`, as LLaVA's)."""
        if self.pointer is not None:
            out = scored_answer_loss(*self.scored_answer_logits(batch))
        else:
            out = answer_loss(self.answer_logits(batch), batch["labels"])
        return {**out, "lm": out["loss"].detach()}

    # scored_answer_logits and answer_logits (common.CopyingDecoding): `embed_with_copies`, the
    # decoder, and its LM head (with the focus's pointer, the slots mixed in), as LLaVA's.

    def representation_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Stage 1: the sum of the configured ITC, ITM and ITG losses (module docstring)."""
        losses = set(self.config.losses)
        assert losses <= set(STAGE1_LOSSES), f"config.losses {self.config.losses} are not stage 1's"
        image = self.qformer_image(batch["pixel_values"])  # (B, 1 + P, D_v) or object tokens
        ids, mask = batch["text_ids"], batch["text_mask"]  # (B, T)
        B = ids.shape[0]
        ids_key = [batch[k] for k in ("caption_ids", "image_ids") if k in batch]
        positives = pair_positives(*ids_key) if ids_key else torch.eye(B, dtype=torch.bool)
        positives = positives.to(ids.device)
        out: dict[str, Tensor] = {}
        total = image.new_zeros(())

        logits = None
        if losses & {"itc", "itm"}:
            # ITC: one pass under the unimodal mask = a query-only and a text-only pass.
            uni = self.qformer(image, ids, mask, mode="unimodal")
            assert uni.queries is not None and uni.text is not None
            query_feats = F.normalize(self.vision_projection(uni.queries), dim=-1)  # (B, Q, E)
            text_feats = F.normalize(self.text_projection(uni.text[:, 0]), dim=-1)  # (B, E) [CLS]
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)  # as BLIP-2's code, before use
            logits = itc_similarity(query_feats, text_feats) / self.temp  # (B_img, B_txt)
            if "itc" in losses:
                smoothing = self.config.itc_label_smoothing
                itc = (contrastive_ce(logits, positives, smoothing)
                       + contrastive_ce(logits.t(), positives.t(), smoothing)) / 2  # fmt: skip
                total = total + itc
                out["itc"] = itc.detach()
                with torch.no_grad():
                    rows = torch.arange(B, device=ids.device)
                    out["itc_acc"] = positives[rows, logits.argmax(dim=1)].float().mean()
        if "itm" in losses:
            assert logits is not None
            itm, acc = self._itm(image, ids, mask, logits, positives)
            total = total + itm
            out["itm"], out["itm_acc"] = itm.detach(), acc
        if "itg" in losses:
            itg = self._itg(image, ids, mask)
            total = total + itg
            out["itg"] = itg.detach()
        out["loss"] = total
        out["temperature"] = self.temp.detach()
        return out

    def itm_logits(self, image: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Match logit (B,) per (image embeds, text) pair: the 2-way head on every query
        output under the bidirectional mask, averaged over queries, as log-odds."""
        joint = self.qformer(image, ids, mask, mode="bidirectional")
        assert joint.queries is not None
        two_way = self.itm_head(joint.queries).mean(dim=1)  # (B, 2): (no match, match)
        return two_way[:, 1] - two_way[:, 0]  # softmax CE over 2 classes = BCE on this

    def _itm(self, image: Tensor, ids: Tensor, mask: Tensor, logits: Tensor,
             positives: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
        sample = self.config.itm_negatives == "sample"
        image_for_text, text_ok, text_for_image, image_ok = mine_hard_negatives(logits, positives, sample)
        # Pairs: B positives, then (negative image, text j), then (image i, negative text).
        images = torch.cat([image, image[image_for_text][text_ok], image[image_ok]])
        texts = torch.cat([ids, ids[text_ok], ids[text_for_image][image_ok]])
        masks = torch.cat([mask, mask[text_ok], mask[text_for_image][image_ok]])
        labels = torch.zeros(texts.shape[0], device=ids.device)
        labels[: ids.shape[0]] = 1
        scores = self.itm_logits(images, texts, masks)
        with torch.no_grad():
            acc = ((scores > 0).float() == labels).float().mean()
        return itm_loss(scores, labels), acc

    def _itg(self, image: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Image-grounded text generation: the caption with a decode marker in place of [CLS]."""
        decode_marker = self.processor.tokenizer.role_ids["assistant"]
        dec_ids = ids.clone()
        dec_ids[:, 0] = decode_marker
        causal = self.qformer(image, dec_ids, mask, mode="causal")
        assert causal.text is not None
        logits = self.qformer.lm_head(causal.text)  # (B, T, V)
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        return lm_loss(logits, labels)

    def collate(self, samples: list[Sample]) -> dict[str, Tensor]:
        """The batches of `default_objective`, for code that treats every family alike."""
        return getattr(self, self.OBJECTIVES[self.default_objective].batches)(samples)

    def conversation_batch(self, samples: list[Sample]) -> dict[str, Tensor]:
        """Stage 2: whole conversations with labels on the answers, as LLaVA."""
        return self.processor.training_batch(samples)

    def pair_batch(self, samples: list[Sample]) -> dict[str, Tensor]:
        """Stage 1: each sample's first image with its caption (`<s> caption </s>`, right
        padded; equal caption_ids / image_ids mark duplicates)."""
        processor = self.processor
        for s in samples:
            if not s.images:
                raise UserError(f"sample {s.id!r} has no image; BLIP-2 stage 1 trains on image-text pairs")
        texts = [caption_of(s) for s in samples]
        tok, n = processor.tokenizer, self.config.qformer.max_text_len
        rows = [[tok.bos_id, *tok.encode(t)[: n - 2], tok.eos_id] for t in texts]
        width = max(len(r) for r in rows)
        text_ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
        text_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            text_ids[i, : len(r)] = torch.tensor(r)
            text_mask[i, : len(r)] = 1
        pixel_values, _ = processor.pixel_values([s.images[0] for s in samples])
        return {
            "pixel_values": pixel_values, "text_ids": text_ids, "text_mask": text_mask,
            "caption_ids": batch_ids(texts), "image_ids": batch_ids([image_key(s) for s in samples]),
        }

    # -- generation engine protocol (visto.infer.engine)

    # prompt_batch (common.ConversationFamily): whole conversations by the processor, left padding.
    # prefill_inputs, prefill, decode_step (common.CopyingDecoding): the prompt by `embed_with_copies`,
    # then the decoder as for LLaVA; with the focus's pointer, each row's slots beside its state.


# ----------------------------------------------------------------------------- transformers format


def hf_key_map(model: Blip2) -> dict[str, str]:
    """Our key -> transformers' key, for every tensor stored under the same name and shape.
    The vision tower's qkv, its patch bias and class/position shapes are handled in `load_hf`."""
    out: dict[str, str] = {}
    for ours, theirs in model.qformer.hf_key_map().items():
        out[f"qformer.{ours}"] = theirs
    for name in ("vision_projection", "text_projection", "itm_head", "language_projection"):
        for key in getattr(model, name).state_dict():
            out[f"{name}.{key}"] = f"{name}.{key}"
    for ours, theirs in model.language_model.hf_key_map().items():
        out[f"language_model.{ours}"] = f"language_model.{theirs}"
    for key in model.vision_model.state_dict():
        if ".self_attn." not in key and key.split(".")[1] not in ("class_embedding", "position_embedding"):
            out[f"vision_model.{key}"] = f"vision_model.{key}"
    return out


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> Blip2Config:
    """A Blip2Config (stage 2, BLIP's ViT) from transformers' Blip2Config dict."""
    if hf.get("model_type") != "blip-2":
        raise UserError(f"{where}: model_type {hf.get('model_type')!r} is not 'blip-2'")
    v, q, text = hf["vision_config"], hf["qformer_config"], hf["text_config"]
    image_token = hf.get("image_token_index")
    if image_token != IMAGE_TOKEN_ID:
        raise UserError(
            f"{where}: image_token_index is {image_token}; visto splices the visual prompt at "
            f"<image> = id {IMAGE_TOKEN_ID} (set image_token_index to {IMAGE_TOKEN_ID})"
        )
    vision = ViTConfig(
        image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
        layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
        mlp_hidden=v["intermediate_size"], act=v.get("hidden_act", "gelu"),
        eps=float(v.get("layer_norm_eps", 1e-6)),
    )
    qformer = QFormerConfig(
        num_queries=hf.get("num_query_tokens", 32), hidden_size=q["hidden_size"],
        layers=q["num_hidden_layers"], heads=q["num_attention_heads"],
        intermediate_size=q["intermediate_size"],
        cross_attention_frequency=q.get("cross_attention_frequency", 2),
        vocab_size=q.get("vocab_size", 30522), max_text_len=q.get("max_position_embeddings", 512),
        act=q.get("hidden_act", "gelu"), eps=float(q.get("layer_norm_eps", 1e-12)),
        dropout=float(q.get("hidden_dropout_prob", 0.1)),
    )
    decoder = DecoderConfig.from_hf(text, where=f"{where} text_config")
    processor = ProcessorConfig(
        image_size=vision.image_size, image_tokens=qformer.num_queries, image_delimiters=False,
        resize_mode="resize", mean=CLIP_MEAN, std=CLIP_STD,
        vocab_size=min(decoder.vocab_size, qformer.vocab_size),
    )
    return Blip2Config(
        vision=vision, vision_pre_norm=False, qformer=qformer, decoder=decoder,
        processor=processor, embed_dim=hf.get("image_text_hidden_size", 256), losses=["lm"],
    )


# Ours, with no tensor in a `Blip2ForConditionalGeneration` file (kept at their init):
# the Q-Former's text side (embeddings, text feed-forwards, ITG head) and the stage-1 heads.
_STAGE1_ONLY = ("qformer.embeddings.", "qformer.lm_head.", "vision_projection.",
                "text_projection.", "itm_head.", "temp")  # fmt: skip


def _stage1_only(key: str) -> bool:
    """Parts only stage 1 trains: `_STAGE1_ONLY`, and the Q-Former's text feed-forwards
    (absent from transformers' models without `use_qformer_text_input`)."""
    text_ffn = (".intermediate.", ".output.")
    return key.startswith(_STAGE1_ONLY) or (
        key.startswith("qformer.") and any(s in key for s in text_ffn)
    )


def _positions_with_patch_bias(positions: Tensor, patch_bias: Tensor) -> Tensor:
    """(1, 1 + P, D) positions and the patch bias (D,) -> our (1 + P, D) position table."""
    table = positions[0].clone()
    table[1:] += patch_bias
    return table


def _vision_key_map(
    layers: int, stored: set[str]
) -> tuple[dict[str, str | tuple[str, ...]], dict[str, Callable[..., Tensor]]]:
    """(key map, transforms) of BLIP's ViT, whose tensors are stored in other shapes than ours."""
    key_map: dict[str, str | tuple[str, ...]] = {}
    transforms: dict[str, Callable[..., Tensor]] = {}
    # BLIP's ViT: class (1, 1, D) and positions (1, 1 + P, D); the patch bias adds the same
    # vector to every patch token, so it joins the patch rows of the position table.
    e = "vision_model.embeddings."
    key_map[e + "class_embedding"] = e + "class_embedding"
    transforms[e + "class_embedding"] = lambda c: c.reshape(-1)
    if e + "patch_embedding.bias" in stored:
        key_map[e + "position_embedding.weight"] = (e + "position_embedding", e + "patch_embedding.bias")
        transforms[e + "position_embedding.weight"] = _positions_with_patch_bias
    else:
        key_map[e + "position_embedding.weight"] = e + "position_embedding"
        transforms[e + "position_embedding.weight"] = lambda positions: positions[0]
    # Its attention: one fused qkv (weight (3D, D), bias (3D,) or none, then zeros).
    for i in range(layers):
        p = f"vision_model.encoder.layers.{i}.self_attn."
        for k, name in enumerate(("q_proj", "k_proj", "v_proj")):
            key_map[p + name + ".weight"] = p + "qkv.weight"
            transforms[p + name + ".weight"] = lambda w, k=k: w.chunk(3, dim=0)[k]
            if p + "qkv.bias" in stored:
                key_map[p + name + ".bias"] = p + "qkv.bias"
                transforms[p + name + ".bias"] = lambda b, k=k: b.chunk(3)[k]
            else:
                key_map[p + name + ".bias"] = p + "qkv.weight"
                transforms[p + name + ".bias"] = lambda w: w.new_zeros(w.shape[0] // 3)
        key_map[p + "out_proj.weight"] = p + "projection.weight"
        key_map[p + "out_proj.bias"] = p + "projection.bias"
    return key_map, transforms


def load_hf(directory: str | Path) -> Blip2:
    """A visto BLIP-2 from a transformers `Blip2ForConditionalGeneration` (or
    `Blip2ForImageTextRetrieval`) directory with a Llama/Qwen2 text model. Every tensor in the
    file is used, and every tensor of ours is loaded unless it is stage-1-only (`_STAGE1_ONLY`
    and the Q-Former's text feed-forwards, absent without `use_qformer_text_input`)."""
    from visto.nn.weights import load_by_key_map, tensor_names

    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    for p in (config_path, weights_path):
        if not p.is_file():
            raise UserError(f"{directory} is not a transformers BLIP-2 directory: {p.name} missing")
    model = Blip2(config_from_hf(json.loads(config_path.read_text()), where=str(config_path)))
    stored = tensor_names(directory)
    tied = model.config.decoder.tie_word_embeddings
    # Stage-1 parts a generation checkpoint lacks keep their initial values.
    key_map: dict[str, str | tuple[str, ...]] = {
        ours: theirs for ours, theirs in hf_key_map(model).items()
        if theirs in stored or not _stage1_only(ours)
    }  # fmt: skip
    vision_map, transforms = _vision_key_map(model.config.vision.layers, stored)
    key_map |= vision_map
    unnamed = {k for k in model.state_dict() if k not in key_map and not _stage1_only(k)}
    unnamed -= {"language_model.lm_head.weight"} if tied else set()  # the embedding matrix
    assert not unnamed, f"the key map names no tensor for {sorted(unnamed)}"
    load_by_key_map(
        model, directory, key_map, transforms,
        ignore=lambda key: tied and key == "language_model.lm_head.weight",
    )  # fmt: skip
    return model.eval()


def export_hf(model: Blip2, directory: str | Path) -> Path:
    """Write `directory` for `transformers.Blip2ForConditionalGeneration.from_pretrained`: the
    inverse of `load_hf` (the same `hf_key_map`; BLIP's ViT stores the class token and
    positions as (1, ., D), a patch bias, and one fused qkv), LoRA merged, with the tokenizer
    and a BlipImageProcessor's settings.

    Exact for a stage-2 model whose vision tower is BLIP's layout: no LayerNorm before the
    blocks (`vision_pre_norm` false, as `load_hf` builds it). A tower with one (a CLIP-layout
    tower from vision_init) has no place in transformers' Blip2VisionModel: refused."""
    from visto.models.transformers_format import (
        act_to_hf,
        image_processor_json,
        merged,
        refuse_export,
        write_transformers_dir,
    )

    model = merged(model)
    cfg, v, q = model.config, model.config.vision, model.config.qformer
    refuse_export("BLIP-2", [
        *(["it is a stage-1 model (losses itc/itm/itg): transformers' generation class needs "
           "stage 2's language model; export the stage-2 checkpoint"] if cfg.stage != 2 else []),
        *(["its vision tower has a LayerNorm before the blocks (a CLIP-layout tower, from "
           "vision_init), which BLIP's ViT in transformers' Blip2VisionModel lacks: train a "
           "BLIP-2 with vision_pre_norm false and no vision_init (or start from a transformers "
           "BLIP-2), or keep this one as a visto checkpoint"] if cfg.vision_pre_norm else []),
        *([f"its Q-Former reads {cfg.qformer_input!r} (object tokens of visto's region connector), "
           "which transformers' BLIP-2 has no place for: keep it as a visto checkpoint"]
          if cfg.qformer_input != "patches" else []),
        *(["its queries are instruction-aware (instruct: the question joins them before each "
           "answer, into <focus> slots), which transformers' Blip2ForConditionalGeneration does "
           "not do: keep it as a visto checkpoint"] if cfg.instruct else []),
        *(["it has the region connector's question focus (question_focus: the named objects, their "
           "box and read tokens in <focus> slots before each answer, and a pointer head), which "
           "transformers' Blip2ForConditionalGeneration has no place for: keep it as a visto "
           "checkpoint"] if cfg.question_focus is not None else []),
        *(["its visual prompt carries word mixes (prompt_words: word_head over the decoder's "
           "embeddings), which transformers' BLIP-2 has no place for: keep it as a visto "
           "checkpoint"] if cfg.prompt_words else []),
        *(["its vision tower has no class token (SigLIP layout); BLIP's ViT has one"]
          if not v.cls_token else []),
        *([f"the vision tower has a {v.stem} stem; transformers' has one linear patch "
           "projection: use vision.stem 'patch'"] if v.stem != "patch" else []),
    ])  # fmt: skip
    state = model.state_dict()
    tensors = {theirs: state[ours] for ours, theirs in hf_key_map(model).items()
               if not _stage1_only(ours)}  # fmt: skip
    vit, e = model.vision_model, "vision_model.embeddings."
    tensors[e + "class_embedding"] = vit.embeddings.class_embedding.reshape(1, 1, -1)
    tensors[e + "position_embedding"] = vit.embeddings.positions()[None]
    bias = getattr(vit.embeddings.patch_embedding, "bias", None)
    tensors[e + "patch_embedding.bias"] = bias if bias is not None else state[e + "patch_embedding.weight"].new_zeros(v.width)
    for i in range(v.layers):
        p = f"vision_model.encoder.layers.{i}.self_attn."
        names = ("q_proj", "k_proj", "v_proj")
        tensors[p + "qkv.weight"] = torch.cat([state[f"{p}{n}.weight"] for n in names])
        # transformers rebuilds k's bias as zeros on init and then reads ours: it is kept.
        tensors[p + "qkv.bias"] = torch.cat([state[f"{p}{n}.bias"] for n in names])
        tensors[p + "projection.weight"] = state[p + "out_proj.weight"]
        tensors[p + "projection.bias"] = state[p + "out_proj.bias"]
    text = cfg.decoder.to_hf()
    config = {
        "architectures": ["Blip2ForConditionalGeneration"], "model_type": "blip-2",
        "vision_config": {
            "model_type": "blip_2_vision_model", "hidden_size": v.width,
            "intermediate_size": v.mlp_hidden, "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch_size,
            "hidden_act": act_to_hf(v.act), "layer_norm_eps": v.eps, "qkv_bias": True,
        },
        "qformer_config": {
            "model_type": "blip_2_qformer", "vocab_size": q.vocab_size, "hidden_size": q.hidden_size,
            "num_hidden_layers": q.layers, "num_attention_heads": q.heads,
            "intermediate_size": q.intermediate_size, "hidden_act": act_to_hf(q.act),
            "max_position_embeddings": q.max_text_len, "layer_norm_eps": q.eps,
            "cross_attention_frequency": q.cross_attention_frequency,
            "encoder_hidden_size": v.width, "hidden_dropout_prob": q.dropout,
            "attention_probs_dropout_prob": q.dropout, "use_qformer_text_input": False,
        },
        "text_config": text, "num_query_tokens": q.num_queries, "image_token_index": IMAGE_TOKEN_ID,
        "image_text_hidden_size": cfg.embed_dim, "use_decoder_only_language_model": True,
        "tie_word_embeddings": cfg.decoder.tie_word_embeddings,
    }  # fmt: skip
    extra = {
        "preprocessor_config.json": image_processor_json(cfg.processor, "BlipImageProcessor"),
        "processor_config.json": {"processor_class": "Blip2Processor",
                                  "num_query_tokens": q.num_queries, "image_token": IMAGE},
    }  # fmt: skip
    return write_transformers_dir(model, directory, config, tensors, extra)


__all__ = [
    "PARAM_GROUPS",
    "Blip2",
    "Blip2Config",
    "config_from_hf",
    "contrastive_ce",
    "export_hf",
    "first_image_of_rows",
    "hf_key_map",
    "itc_similarity",
    "load_hf",
    "mine_hard_negatives",
    "question_spans",
]
