"""Flamingo (Alayrac et al. 2022, "Flamingo: a Visual Language Model for Few-Shot Learning"):
a frozen vision encoder and a frozen language model, bridged by a Perceiver Resampler and
gated cross-attention blocks. Images are never tokens of the text; the text reads them.

    pixels (N_img, 3, S, S) -> ViT (frozen), one hidden state          (N_img, P, D_v)
                            -> Perceiver Resampler (trained)            (N_img, R, D_v)
                            -> per row, image after image                (B, M*R, D_v)
    input_ids (B, T): one `<image>` id marks where each image sits in the interleaved text
                    (processor image_tokens = 1: the marker is an ordinary, frozen token)
                    -> media index = cumsum(input_ids == <image>)        (B, T)
                    -> decoder (frozen); before every k-th layer a gated block (trained)
                       cross-attends to the visual tokens of the image immediately before
                       each token (tokens before any image read none)
                    -> logits (B, T, V); loss on the answer tokens only (shifted)

The gated blocks reach the decoder as an argument of its layer loop: `cross_attention(media)`
maps layer indices to the blocks reading `media`, passed as `Conditioning(before_layer=...)`
(visto.nn.language); the decoder itself is an unmodified `DecoderLM`.

At initialisation every gate is tanh(0) = 0, so the model's logits are the language model's,
exactly (tests/test_flamingo.py checks torch.equal). For generation the visual tokens and
each block's keys and values of them are computed once at prefill and kept in an
`ImageContext`, with each row's current media index; new tokens read the row's last image (a
generated `<image>` id opens no new image: it has no pixels). The engine's fast path
(`visto.infer.runner`) runs the same loop: `prefill_inputs` gives it the prompt's
conditioning and the `ImageContext`, `decode_conditioning` each step's. A decoding step runs
each block as `gated_step`: the same numbers (up to float rounding) with what is constant
across steps done once, the keys and values of each row's last image (no media mask) and the
block's weights fused with its norm weights, attention scale and tanh gates folded in
(`GatedStepWeights`, rebuilt at a prefill when a parameter changed); blocks that cannot be
fused (LoRA, non-fp32) run as written.

With `question_focus` (off by default) Flamingo shares the region connector's question focus
(visto.connectors.regions, focus, pointer; LLaVA's `regions` projector with focus): the
frozen tower's dense heads detect objects, each answer's question picks the ones it names
(named words: no gradient), written into the processor's `<focus>` slots before the answer
and added to its `<|assistant|>` token, and a pointer head lets the answer copy the slots'
tokens. The image itself still reaches the decoder Flamingo's way: the resampler reads the
patch features, the gated blocks read its latents. The connector is the module
`question_focus` (its keys `question_focus.*`); decoding keeps each row's slots beside its
images (`FocusedImages`), the pointer mixes them into the fused decode path's logits
(`output_logits`). Idefics cannot hold it: `export_idefics` refuses it.

Module names follow transformers' `IdeficsForVisionText2Text` (`vision_model`,
`perceiver_resampler`, `gated_cross_attn_layers`) and LLaVA's `language_model`; `from_idefics`
loads a transformers Idefics directory whose parts fit (see its docstring for what does not).
Training is a recipe (`flamingo-synth.json`): vision and language at lr 0, the resampler and
the gated blocks trained; the groups for `optim.module_lrs` are `PARAM_GROUPS`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visto.connectors.pointer import CopySlots
from visto.connectors.projector import ProjectorConfig, build_projector
from visto.connectors.resampler import PerceiverResampler, ResamplerConfig
from visto.connectors.xattn import (
    GATE_SHAPES,
    GatedCrossAttentionBlock,
    Media,
    media_mask,
    num_gated_blocks,
)
from visto.data.processor import Processor, ProcessorConfig
from visto.data.special_tokens import IMAGE_TOKEN_ID
from visto.errors import UserError
from visto.losses import answer_loss, scored_answer_loss
from visto.models import common
from visto.nn.language import Conditioning, DecoderConfig, DecoderInputs, DecoderLM, DecoderState
from visto.nn.vision import ViT, ViTConfig

PARAM_GROUPS = {
    "vision": "vision_model",
    "resampler": "perceiver_resampler",
    "xattn": "gated_cross_attn_layers",
    "language": "language_model",
}
# With `question_focus`, its region connector is `question_focus` (module_lrs takes the prefix).



@dataclass
class FlamingoConfig(common.FamilyConfig):
    """common.FamilyConfig's decoder, processor, tokenizer source and pretrained parts, then
    Flamingo's vision tower, resampler and gated blocks, and the optional question focus."""

    DISPLAY_NAME: ClassVar[str] = "Flamingo"

    # One <image> marker per image, no delimiters: the paper's "<image>" tag in the text.
    processor: ProcessorConfig = field(default_factory=lambda: ProcessorConfig(image_size=64, image_tokens=1, image_delimiters=False, max_length=256))
    vision: ViTConfig = field(default_factory=lambda: ViTConfig.preset("small"))
    # Hidden state read by the resampler, indexed as transformers does (-1 = last layer).
    vision_feature_layer: int = -1
    # Keep the CLS token among the features (transformers' Idefics does: it resamples the
    # whole last_hidden_state); visto's default drops it, as LLaVA does.
    vision_cls_token: bool = False
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    # A gated block before decoder layers 0, k, 2k, ... (Idefics' cross_layer_interval).
    cross_attn_every: int = 1
    cross_attn_heads: int | None = None  # default: the decoder's num_heads
    cross_attn_intermediate: int | None = None  # gated FFW width; default the decoder's
    gate: str = "float"  # "float": one alpha per gate; "vector": one per channel
    # The region connector's question focus beside the resampler (see the module doc): a
    # projector config of kind "regions" with focus on, as LLaVA's `projector` sets it (its
    # object tokens are not spliced into the text; `slots` objects are detected), with the
    # processor's `focus_tokens` <focus> slots before each answer (4 + read_slots). Its dense
    # heads (and OCR reader) come from the `vision_init` checkpoint. None: plain Flamingo.
    question_focus: ProjectorConfig | None = None
    # What the resampler reads: "patches", the tower's hidden state (Flamingo's), or, with
    # question_focus, "objects", its region connector's object tokens at the decoder's width
    # (`slots` per image; the resampler and the gated blocks' keys and values at that width).
    resampler_input: str = "patches"

    def __post_init__(self) -> None:
        problems = common.feature_layer_problems(self.vision, self.vision_feature_layer)
        if self.cross_attn_every < 1:
            problems.append(f"cross_attn_every must be >= 1, got {self.cross_attn_every}")
        if self.gate not in GATE_SHAPES:
            problems.append(f"gate must be one of {GATE_SHAPES}, got {self.gate!r}")
        if self.processor.resize_mode == "patch":
            problems.append("Flamingo encodes square images: processor.resize_mode 'pad' or 'resize'")
        if self.processor.image_tokens != 1:
            problems.append(
                f"processor.image_tokens must be 1 (one <image> marker per image; the visual "
                f"tokens are read by cross-attention), got {self.processor.image_tokens}"
            )
        problems += self.focus_problems()
        if problems:
            raise UserError("flamingo config: " + "; ".join(problems))

    def focus_problems(self) -> list[str]:
        """Where `question_focus` and the processor's <focus> slots disagree (LLaVA's rule)."""
        focus, slots = self.question_focus, self.processor.focus_tokens
        if self.resampler_input not in ("patches", "objects"):
            return [f"resampler_input must be 'patches' or 'objects', got {self.resampler_input!r}"]
        if self.resampler_input == "objects" and focus is None:
            return ["resampler_input 'objects' reads question_focus's object tokens: set question_focus"]
        return common.question_focus_problems(focus, slots)

    @property
    def image_tokens(self) -> int:
        """Visual tokens per image (what the gated blocks read), whatever the image size."""
        return self.resampler.num_latents

    @property
    def visual_width(self) -> int:
        """The width of what the resampler reads and the gated blocks' keys and values."""
        return self.decoder.hidden_size if self.resampler_input == "objects" else self.vision.width

    @classmethod
    def tiny_fields(cls) -> dict[str, Any]:
        """Unit tests: 32 px, 4 latents, 2+2 layers (`small`, the defaults: the CPU)."""
        return dict(vision=ViTConfig.preset("tiny"), resampler=ResamplerConfig(num_latents=4, depth=1, heads=2),
                    **common.tiny_text_parts(image_tokens=1))  # fmt: skip


def vision_hidden_state(vit: ViT, pixel_values: Tensor, layer: int, keep_cls: bool) -> Tensor:
    """(N, 3, S, S) -> hidden state `layer` (N, P, D), or (N, 1 + P, D) with the CLS token."""
    if not keep_cls:
        return vit(pixel_values, feature_layer=layer, pooled=False).features
    # The ViT's own forward drops CLS; run its parts up to `layer` (no post_layernorm, as
    # transformers' last_hidden_state).
    layer = layer % (vit.config.layers + 1)
    x = vit.pre_layrnorm(vit.embeddings(pixel_values))  # (N, 1 + P, D)
    for block in vit.encoder.layers[:layer]:
        x = block(x)
    return x


@dataclass
class ImageContext:
    """What the gated blocks read while decoding, per row."""

    visual: Tensor  # (B, M*R, D_v) visual tokens of each row's images, computed at prefill
    media_index: Tensor  # (B,) the image the next token reads (1-based; 0 = none yet)
    # Each gated block's keys and values of `visual` (block index -> (k, v) (B, H, M*R, hd)),
    # from the prefill: decoding steps do not project the images again.
    visual_kv: dict[int, tuple[Tensor, Tensor]]
    tokens_per_image: int  # R

    def step_media(self) -> Media:
        """The media of one decoding step: each row's new token reads the row's last image."""
        r = self.tokens_per_image
        mask, has_media = media_mask(self.media_index[:, None], r, self.visual.shape[1] // r)
        return Media(self.visual, mask, has_media, kv=self.visual_kv)

    @functools.cached_property
    def last_image_kv(self) -> dict[int, tuple[Tensor, Tensor]]:
        """Each block's keys and values of each row's last image alone, (B, H, R, hd): all
        that a decoding step's token reads, so the step needs no media mask. A row without an
        image reads its first slot, whose visual tokens are zeros (`row_visual_tokens`): zero
        keys and values (the projections have no bias), so its attention output is exactly
        zero, as `has_media` makes it. Computed once per context (contexts are rebuilt when
        rows leave or join), contiguous: `gated_step` reads them as (B*H, R, hd) views."""
        r, media = self.tokens_per_image, self.media_index
        if self.visual.shape[1] == r:  # one image slot per row: the keys are the last image's
            return {j: (k.contiguous(), v.contiguous()) for j, (k, v) in self.visual_kv.items()}
        first = (media - 1).clamp(min=0) * r  # (B,) first column of the row's last image
        index = first[:, None] + torch.arange(r, device=media.device)  # (B, R)
        out = {}
        for j, (k, v) in self.visual_kv.items():
            columns = index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            out[j] = (k.gather(2, columns).contiguous(), v.gather(2, columns).contiguous())
        return out

    def select(self, rows: Tensor) -> ImageContext:
        kv = {j: (k[rows], v[rows]) for j, (k, v) in self.visual_kv.items()}
        return ImageContext(self.visual[rows], self.media_index[rows], kv, self.tokens_per_image)

    @staticmethod
    def merge(contexts: list[ImageContext]) -> ImageContext:
        """The rows of every context in order (continuous batching: rows join). Rows with fewer
        images get zero slots at the end, which their media index never reaches."""
        width = max(c.visual.shape[1] for c in contexts)

        def padded(t: Tensor, dim: int) -> Tensor:  # (.., S, ..) -> (.., width, ..) with zeros
            pad = [0, 0] * (t.ndim - 1 - dim) + [0, width - t.shape[dim]]
            return torch.nn.functional.pad(t, pad)

        kv = {
            j: tuple(torch.cat([padded(c.visual_kv[j][n], 2) for c in contexts]) for n in (0, 1))
            for j in contexts[0].visual_kv
        }
        return ImageContext(
            torch.cat([padded(c.visual, 1) for c in contexts]),
            torch.cat([c.media_index for c in contexts]),
            kv,  # type: ignore[arg-type]
            contexts[0].tokens_per_image,
        )


@dataclass
class FocusedImages:
    """A decoding row's context with `question_focus`'s pointer: the images its gated blocks
    read, and the `<focus>` slots its answer may copy (the prompt's last answer's)."""

    images: ImageContext
    slots: CopySlots

    def select(self, rows: Tensor) -> FocusedImages:
        return FocusedImages(self.images.select(rows), self.slots.select(rows))

    @staticmethod
    def merge(contexts: list[FocusedImages]) -> FocusedImages:
        return FocusedImages(ImageContext.merge([c.images for c in contexts]),
                             CopySlots.merge([c.slots for c in contexts]))  # fmt: skip


@dataclass(frozen=True)
class GatedStepWeights:
    """One gated block's weights as a decoding step multiplies them: transposed to (in, out)
    (the layout the engine's runner keeps, read by MKL as it lies), gate and up projections
    side by side, each RMSNorm's weight folded into the projection that reads its output
    ((x_hat * w) W = x_hat (w W), per input row of the (in, out) matrix, as the runner folds
    the decoder's), the attention's 1/sqrt(hd) folded into the query projection, and each tanh
    gate folded into the projection it scales (tanh(alpha) * W y = (tanh(alpha) W) y, per
    output channel for a vector gate). Built once per change of the block's parameters, not
    per step."""

    q: Tensor  # (C, H*hd), rows scaled by input_layernorm's weight, all by 1/sqrt(hd)
    o: Tensor  # (H*hd, C), scaled by tanh(alpha_cross_attn)
    gate_up: Tensor  # (C, 2F), rows scaled by post_attention_layernorm's weight
    down: Tensor  # (F, C), scaled by tanh(alpha_dense)
    eps: Tensor  # () the norms' epsilon, a tensor for addcmul
    heads: int

    @classmethod
    def of(cls, block: GatedCrossAttentionBlock) -> GatedStepWeights | None:
        """None when the block is not plain fp32 nn.Linear layers without biases (LoRA
        wrappers, other dtypes): decoding then runs the block itself."""
        attn, mlp = block.cross_attn, block.mlp
        # k/v too: without biases a row with no image reads zero values (last_image_kv)
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.out, mlp.gate_proj, mlp.up_proj,
                   mlp.down_proj)  # fmt: skip
        norms = (block.input_layernorm, block.post_attention_layernorm)
        if (
            not all(type(m) is nn.Linear and m.bias is None for m in linears)
            or any(m.weight.dtype != torch.float32 for m in linears)
            or any(n.weight.dtype != torch.float32 for n in norms)
        ):
            return None
        with torch.no_grad():
            gate_attn = torch.tanh(block.alpha_cross_attn).reshape(-1, 1)  # (1 or C, 1)
            gate_dense = torch.tanh(block.alpha_dense).reshape(-1, 1)
            ln1 = block.input_layernorm.weight.reshape(-1, 1)  # (C, 1): scales W^T's rows
            ln2 = block.post_attention_layernorm.weight.reshape(-1, 1)
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t()
            return cls(
                q=(attn.q_proj.weight.t() * ln1 * attn.head_dim**-0.5).contiguous(),
                o=(gate_attn * attn.out.weight).t().contiguous(),
                gate_up=(gate_up * ln2).contiguous(),
                down=(gate_dense * mlp.down_proj.weight).t().contiguous(),
                eps=torch.tensor(block.input_layernorm.eps, device=ln1.device),
                heads=attn.n_heads,
            )


def _unit_rms(x: Tensor, eps: Tensor) -> Tensor:
    """x (N, C) / rms(x), RMSNorm without its weight (folded into the next matmul): from the
    row's 2-norm in four small ops, as the engine's runner computes it (F.rms_norm's CPU
    kernel runs pow, mean, add, rsqrt, two multiplies and two casts)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (N, 1)
    return x * torch.addcmul(eps, norm, norm, value=1.0 / x.shape[-1]).rsqrt_()


def gated_step(x: Tensor, w: GatedStepWeights, kv: tuple[Tensor, Tensor]) -> Tensor:
    """A gated block on one decoding step's tokens x (B, 1, C) reading `kv`, each row's last
    image (`ImageContext.last_image_kv`): the block's numbers up to float rounding, in about
    a decoder layer's count of ops (no mask, no masked_fill, no separate gate or norm-weight
    multiplies). The attention over the image's R keys is two batched matmuls and a softmax:
    with one query per row and a few keys, SDPA's kernel costs more than its arithmetic."""
    B, T, C = x.shape
    assert T == 1, f"gated_step runs one position per row, got {T}"
    k, v = kv  # (B, H_kv, R, hd)
    Hkv, R, hd = k.shape[1:]
    x = x.reshape(B, C)
    # One position per row: (B, H*hd) is H heads, a kv head's G = H / H_kv query heads in a row
    # of G queries (each key read once), the 1/sqrt(hd) scale in w.q.
    q = torch.mm(_unit_rms(x, w.eps), w.q).view(B * Hkv, w.heads // Hkv, hd)
    scores = torch.bmm(q, k.reshape(B * Hkv, R, hd).transpose(1, 2))  # (B*H_kv, G, R)
    y = torch.bmm(scores.softmax(dim=-1), v.reshape(B * Hkv, R, hd))  # (B*H_kv, G, hd)
    x = torch.addmm(x, y.view(B, -1), w.o)  # x + tanh(alpha) * o_proj(y)
    gate, up = torch.mm(_unit_rms(x, w.eps), w.gate_up).chunk(2, dim=-1)
    x = torch.addmm(x, F.silu(gate).mul_(up), w.down)  # x + tanh(alpha_dense) * mlp(h)
    return x.view(B, 1, C)


@dataclass
class FlamingoState:
    """Decoding state of the model's own decode_step: the decoder's KV cache and the images."""

    decoder: DecoderState
    images: ImageContext | FocusedImages

    def select(self, rows: Tensor) -> FlamingoState:
        return FlamingoState(self.decoder.select(rows), self.images.select(rows))


def build_focus_connector(config: FlamingoConfig) -> nn.Module:
    """`question_focus`'s region connector, fresh: patch features at the tower's width in,
    the decoder's width out (visto.pretrained loads its detector from the vision_init tower)."""
    assert config.question_focus is not None
    return build_projector(config.question_focus, config.vision.width, config.decoder.hidden_size)


class Flamingo(common.ConversationFamily, nn.Module):
    family, display_name, PARAM_GROUPS = "flamingo", "Flamingo", PARAM_GROUPS

    def __init__(
        self, config: FlamingoConfig, vision: ViT | None = None, language: DecoderLM | None = None,
        focus: nn.Module | None = None,
    ) -> None:
        """`vision` / `language`: pretrained parts built elsewhere (visto.pretrained reads
        vision_init / language_init), which bring their architectures; else built fresh.
        `focus`: the `question_focus` connector with the detector of the vision_init tower."""
        super().__init__()
        common.refuse_part_paths(config, self.family)
        config = common.adopt_parts(config, vision, language)
        common.refuse_problems("flamingo", common.fit_problems(config.processor, config.decoder, config.vision))
        self.config = config
        dec, width = config.decoder, config.visual_width
        self.vision_model = vision if vision is not None else ViT(config.vision)
        self.perceiver_resampler = PerceiverResampler(width, config.resampler)
        self.gated_cross_attn_layers = nn.ModuleList(
            GatedCrossAttentionBlock(
                dec.hidden_size,
                kv_dim=width,
                n_heads=config.cross_attn_heads or dec.num_heads,
                mlp_hidden=config.cross_attn_intermediate or dec.intermediate_size,
                eps=dec.rms_norm_eps,
                gate=config.gate,
            )
            for _ in range(num_gated_blocks(dec.num_layers, config.cross_attn_every))
        )
        self.language_model = language if language is not None else DecoderLM(dec)
        self.question_focus = None
        if config.question_focus is not None:
            self.question_focus = focus if focus is not None else build_focus_connector(config)
        # The gated blocks' GatedStepWeights and the parameters they were built from
        # (`step_weights`): refreshed at each prefill, read by every decoding step.
        self._step_weights: tuple[tuple, list[GatedStepWeights] | None] | None = None

    # -- processor (common.ConversationFamily: built from the config on first use)

    def accept_processor(self, processor: Processor) -> None:
        super().accept_processor(processor)  # the tokenizer fits the decoder
        p = processor.config
        if p.image_tokens != 1 or p.resize_mode == "patch":
            raise UserError(
                "Flamingo needs one <image> marker per image: a processor with image_tokens 1 "
                f"and resize_mode 'pad' or 'resize' (got {p.image_tokens}, {p.resize_mode!r})"
            )
        if p.image_size != self.config.vision.image_size:
            raise UserError(
                f"the processor makes {p.image_size} px images but the vision tower takes "
                f"{self.config.vision.image_size} px"
            )
        common.accept_focus_processor(self.question_focus, processor, self.config.processor.focus_tokens)

    # focus_connector and pointer (common.ConversationFamily): `question_focus` and its pointer
    # head, or None.

    # -- visual tokens and the media mask

    def image_states(self, pixel_values: Tensor, keep_cls: bool | None = None) -> Tensor:
        """(N_img, 3, S, S) -> the tower's hidden state the resampler reads (N_img, P, D_v)
        (with `vision_cls_token`, CLS first); `keep_cls` False: the patches alone."""
        keep = self.config.vision_cls_token if keep_cls is None else keep_cls
        return vision_hidden_state(self.vision_model, pixel_values, self.config.vision_feature_layer, keep)

    def visual_tokens(self, pixel_values: Tensor, states: Tensor | None = None) -> Tensor:
        """(N_img, 3, S, S) -> (N_img, R, D_v): a fixed number of tokens per image (`states`:
        the images' `image_states`, when computed already)."""
        if states is None and self.config.resampler_input == "objects":
            connector, embed = self.question_focus, self.language_model.model.embed_tokens
            objects = connector.objects(self.image_states(pixel_values, keep_cls=False), embed)
            states = connector.visual_tokens(objects, embed, pixel_values)  # (N_img, slots, D_lm)
        elif states is None:
            states = self.image_states(pixel_values)  # (N_img, P, D_v)
        return self.perceiver_resampler(states)  # (N_img, R, D_v)

    def row_visual_tokens(
        self, input_ids: Tensor, pixel_values: Tensor, image_sample_index: Tensor,
        states: Tensor | None = None,
    ) -> Tensor:
        """Each row's images' visual tokens side by side, (B, M*R, D_v), M = most images in a
        row (at least 1: a row without images gets a slot that no token may read)."""
        b = input_ids.shape[0]
        markers = (input_ids == IMAGE_TOKEN_ID).sum(dim=1)  # (B,)
        per_row = torch.bincount(image_sample_index, minlength=b).to(markers.device)  # (B,)
        assert torch.equal(per_row, markers), (
            f"<image> markers per row {markers.tolist()} do not match the images per row "
            f"{per_row.tolist()}; the processor must put one <image> id per image "
            "(image_tokens 1)"
        )
        r, width = self.config.image_tokens, self.config.visual_width
        m = max(1, int(per_row.max()) if b else 1)
        dtype = self.language_model.model.embed_tokens.weight.dtype
        rows = torch.zeros(b, m, r, width, device=input_ids.device, dtype=dtype)  # (B, M, R, D)
        if pixel_values.shape[0]:
            tokens = self.visual_tokens(pixel_values.to(dtype), states)  # (N_img, R, D_v)
            index = image_sample_index.to(input_ids.device)
            # Images arrive in batch order (row 0's first): slot = rank within its row.
            first = torch.cumsum(per_row, 0) - per_row  # (B,) index of each row's first image
            slot = torch.arange(len(index), device=index.device) - first[index]
            rows = rows.index_put((index, slot), tokens.to(dtype))
        return rows.reshape(b, m * r, width)  # (B, M*R, D_v)

    def media(
        self, input_ids: Tensor, visual: Tensor, kv: dict[int, tuple[Tensor, Tensor]] | None = None
    ) -> Media:
        """Per-image attention for a whole sequence: token t reads the last image at or
        before t (the `<image>` marker itself reads its own image). `kv`: the blocks' keys
        and values of `visual`, when computed beforehand."""
        media_index = torch.cumsum(input_ids == IMAGE_TOKEN_ID, dim=1)  # (B, T)
        r = self.config.image_tokens
        mask, has_media = media_mask(media_index, r, visual.shape[1] // r)
        return Media(visual, mask, has_media, kv=kv if kv is not None else {})

    def cross_attention(self, media: Media) -> dict[int, Callable[[Tensor], Tensor]]:
        """The gated blocks as the decoder's layer loop runs them: decoder layer index -> its
        block reading `media` (blocks sit before layers 0, k, 2k, ...)."""
        every = self.config.cross_attn_every
        return {
            j * every: functools.partial(block, media=media, index=j)
            for j, block in enumerate(self.gated_cross_attn_layers)
        }

    # -- the forward pass

    def embed_with_copies(
        self,
        input_ids: Tensor,
        pixel_values: Tensor,
        image_sample_index: Tensor,
        segment_ids: Tensor | None = None,
    ) -> tuple[Tensor, CopySlots | None, Tensor]:
        """The decoder's input embeddings (B, T, C) (with `question_focus`, each answer's named
        objects in its `<focus>` slots and on its `<|assistant|>` token; `segment_ids` of
        packed exchanges tell it where each exchange's question begins), what each answer's
        slots hold for the pointer (one row per `<|assistant|>` token; None without slots or
        images), and, unlike the other families' pair, a third: each row's visual tokens for
        the gated blocks (`row_visual_tokens`), which the decoder reads beside its input."""
        embeds = self.language_model.embed(input_ids)  # (B, T, C)
        connector, states, copies = self.question_focus, None, None
        if connector is not None and pixel_values.shape[0]:
            pixel_values = pixel_values.to(self.language_model.model.embed_tokens.weight.dtype)
            states = self.image_states(pixel_values)  # one tower pass for both paths
            patches = self.image_states(pixel_values, keep_cls=False) if self.config.vision_cls_token else states
            embed = self.language_model.model.embed_tokens
            objects = connector.objects(patches, embed)
            added, copies = common.focus_with_copies(
                connector, objects, embed, input_ids, pixel_values, image_sample_index, segment_ids
            )
            embeds = embeds + added.to(embeds.dtype)
            if self.config.resampler_input == "objects":  # the resampler reads the object tokens
                states = connector.visual_tokens(objects, embed, pixel_values)  # (N_img, slots, D_lm)
        visual = self.row_visual_tokens(input_ids, pixel_values, image_sample_index, states)
        return embeds, copies, visual

    def decoder_hidden(self, batch: dict[str, Tensor]) -> tuple[Tensor, CopySlots | None]:
        """A collated (right-padded) batch -> the decoder's last hidden states (B, T, C), its
        gated blocks reading each token's image, and the answers' slots (`embed_with_copies`)."""
        input_ids = batch["input_ids"]
        embeds, copies, visual = self.embed_with_copies(
            input_ids, batch["pixel_values"], batch["image_sample_index"], batch.get("segment_ids")
        )
        media = self.media(input_ids, visual)
        hidden = common.training_logits(
            self.language_model, embeds, batch, Conditioning(before_layer=self.cross_attention(media)), head=False
        )  # (B, T, C)
        return hidden, copies

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        """Next-token logits (B, T, V) for a collated (right-padded) batch; with a pointer head,
        log-probabilities with each answer's slots mixed in where an answer token is predicted
        (what generation samples from)."""
        hidden, copies = self.decoder_hidden(batch)
        return common.head_on_every_position(self, hidden, batch, copies)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A collated batch -> {"loss", "token_acc"} (next-token CE and accuracy on answers):
        over every position's logits without a pointer head; with one, the LM head and the
        pointer on the scored positions only (models.common.head_on_scored_positions)."""
        if self.pointer is None:
            return answer_loss(self.logits(batch), batch["labels"])
        hidden, copies = self.decoder_hidden(batch)
        return scored_answer_loss(*common.head_on_scored_positions(self, hidden, batch, copies))

    # collate and prompt_batch (common.ConversationFamily): whole conversations by the processor.

    # -- generation engine protocol (visto.infer.engine)

    def prefill_inputs(self, batch: Any) -> DecoderInputs:
        """A left-padded batch (processor `Batch` or dict) -> what the decoder runs on: token
        embeddings, the gated blocks reading each token's image, and the `ImageContext` that
        decoding steps read (every block's keys and values of the images, computed here)."""
        device = self.language_model.model.embed_tokens.weight.device
        input_ids = common.batch_field(batch, "input_ids").to(device)
        with torch.inference_mode():
            embeds, copies, visual = self.embed_with_copies(
                input_ids, common.batch_field(batch, "pixel_values").to(device),
                common.batch_field(batch, "image_sample_index").to(device),
            )
            visual_kv = {j: b.visual_kv(visual) for j, b in enumerate(self.gated_cross_attn_layers)}
            media = self.media(input_ids, visual, visual_kv)
            self.step_weights(refresh=True)
            last = torch.cumsum(input_ids == IMAGE_TOKEN_ID, dim=1)[:, -1]  # (B,) each row's last image
            context: ImageContext | FocusedImages = ImageContext(visual, last, visual_kv, self.config.image_tokens)
            if self.pointer is not None:  # what the answer being generated may copy
                context = FocusedImages(context, common.last_answer_slots(self.focus_connector, input_ids, copies))
        return DecoderInputs(
            embeds,
            common.batch_field(batch, "attention_mask").to(device),
            Conditioning(before_layer=self.cross_attention(media)),
            context=context,
        )

    def step_weights(self, refresh: bool = False) -> list[GatedStepWeights] | None:
        """Every gated block's `GatedStepWeights` (None: some block cannot be fused). Built
        again on `refresh` (each prefill) when a parameter was replaced or changed in place
        since, so decoding steps read them without checking (weights do not change between a
        prompt's prefill and its last token; the engine's runner assumes the same)."""
        if self._step_weights is None or refresh:
            blocks = self.gated_cross_attn_layers
            signature = tuple((p.data_ptr(), p._version) for p in blocks.parameters())
            signature += tuple(id(m) for m in blocks.modules())  # a wrapper swapped in (LoRA)
            if self._step_weights is None or self._step_weights[0] != signature:
                weights = [GatedStepWeights.of(block) for block in blocks]
                fused = None if any(w is None for w in weights) else weights
                self._step_weights = (signature, fused)  # type: ignore[assignment]
        return self._step_weights[1]

    def decode_conditioning(self, images: ImageContext | FocusedImages) -> Conditioning:
        """What one decoding step's layers read: the gated blocks on each row's last image.
        Everything constant across the steps is computed once: the keys and values of each
        row's last image (`last_image_kv`: no media mask), and the blocks' fused weights with
        their gates folded in (`gated_step`); blocks that cannot be fused run as written."""
        if isinstance(images, FocusedImages):
            images = images.images
        weights = self.step_weights()
        if weights is None:
            return Conditioning(before_layer=self.cross_attention(images.step_media()))
        every, kv = self.config.cross_attn_every, images.last_image_kv
        return Conditioning(before_layer={
            j * every: functools.partial(gated_step, w=w, kv=kv[j]) for j, w in enumerate(weights)
        })  # fmt: skip

    def output_logits(self, hidden: Tensor, logits: Tensor, context: Any, tokens: Tensor | None = None) -> Tensor:
        """The engine's hook after the LM head: hidden (B, C) after the final norm, logits
        (B, V), the rows' context, the tokens at these positions (B,) (None: the prompt's
        last) -> what to sample from: with `question_focus`'s pointer, log-probabilities with
        each row's slots mixed in; else the logits unchanged."""
        if self.pointer is None or not isinstance(context, FocusedImages):
            return logits
        return common.pointer_output_logits(self.pointer, hidden, logits, context.slots, tokens)

    def prefill(self, batch: Any) -> tuple[Tensor, FlamingoState]:
        """A left-padded batch (processor `Batch` or dict) -> last logits (B, V) and state."""
        inputs = self.prefill_inputs(batch)
        if self.pointer is None:
            logits, decoder = self.language_model.prefill_embeds(
                inputs.embeds, inputs.attention_mask, inputs.conditioning
            )
            return logits, FlamingoState(decoder, inputs.context)
        with torch.inference_mode():
            hidden, decoder = self.language_model.prefill_embeds(
                inputs.embeds, inputs.attention_mask, inputs.conditioning, head=False
            )
            logits = self.output_logits(hidden, self.language_model.lm_head(hidden), inputs.context)
        return logits, FlamingoState(decoder, inputs.context)

    def decode_step(self, next_ids: Tensor, state: FlamingoState) -> tuple[Tensor, FlamingoState]:
        """One token per row (B,): it reads the row's last image, as the tokens before it."""
        conditioning = self.decode_conditioning(state.images)
        if self.pointer is None:
            logits, decoder = self.language_model.decode_step(next_ids, state.decoder, conditioning)
            return logits, FlamingoState(decoder, state.images)
        with torch.inference_mode():
            hidden, decoder = self.language_model.decode_step(next_ids, state.decoder, conditioning, head=False)
            logits = self.output_logits(hidden, self.language_model.lm_head(hidden), state.images, next_ids)
        return logits, FlamingoState(decoder, state.images)


# ----------------------------------------------------------------------------- transformers Idefics

# What a transformers `IdeficsForVisionText2Text` must have for `from_idefics` to reproduce
# it; each entry: (config key, transformers' default, required value, why).
IDEFICS_REQUIREMENTS = (
    ("use_resampler", False, True, "without the resampler Idefics cross-attends to raw ViT patches"),
    ("qk_layer_norms", False, False, "visto's attention has no RMSNorm on per-head queries/keys"),
    ("hidden_act", "silu", "silu", "visto's decoder and gated blocks use SwiGLU (silu)"),
)


# Idefics' decoupled embeddings: the rows of its additional vocabulary, stored apart.
IDEFICS_ADDITIONAL = ("model.embed_tokens.additional_embedding.weight", "lm_head.additional_fc.weight")


def idefics_key_map(model: Flamingo, joined: bool) -> dict[str, str | tuple[str, ...]]:
    """Our key -> Idefics' key, every tensor named; with `joined`, the embedding table and the
    head are each made of Idefics' regular and additional tensors."""
    out: dict[str, str | tuple[str, ...]] = {}
    for ours in model.vision_model.state_dict():
        out[f"vision_model.{ours}"] = f"model.vision_model.{ours}"
    for ours, theirs in model.perceiver_resampler.hf_key_map().items():
        out[f"perceiver_resampler.{ours}"] = f"model.perceiver_resampler.{theirs}"
    for j, block in enumerate(model.gated_cross_attn_layers):
        for ours, theirs in block.hf_key_map().items():
            out[f"gated_cross_attn_layers.{j}.{ours}"] = f"model.gated_cross_attn_layers.{j}.{theirs}"
    for ours in model.language_model.hf_key_map():  # model.layers.*, model.norm, ..., lm_head
        out[f"language_model.{ours}"] = ours
    if joined:
        for ours, additional in zip(("language_model.model.embed_tokens.weight",
                                     "language_model.lm_head.weight"), IDEFICS_ADDITIONAL, strict=True):  # fmt: skip
            if ours in out:  # a tied head has no table of its own
                out[ours] = (out[ours], additional)
    return out


def _join_rows(regular: Tensor, additional: Tensor) -> Tensor:
    return torch.cat([regular, additional], dim=0)


def idefics_problems(hf: dict[str, Any]) -> list[str]:
    """What in an Idefics config.json visto's Flamingo cannot reproduce (empty: nothing)."""
    problems = [
        f"{key} must be {want!r} ({why})"
        for key, default, want, why in IDEFICS_REQUIREMENTS
        if hf.get(key, default) != want
    ]
    perceiver = hf.get("perceiver_config") or {}
    if perceiver.get("qk_layer_norms_perceiver"):
        problems.append("perceiver qk_layer_norms_perceiver must be false (no per-head norms)")
    vision_hf = hf.get("vision_config") or {}
    if vision_hf.get("hidden_act", "gelu") not in ("gelu", "quick_gelu", "gelu_pytorch_tanh"):
        problems.append(f"vision hidden_act {vision_hf.get('hidden_act')!r} is not supported")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        problems.append("rope scaling is not supported (plain rotary only)")
    return problems


def config_from_idefics(
    hf: dict[str, Any], where: str, processor: ProcessorConfig | None = None
) -> FlamingoConfig:
    """The FlamingoConfig of an Idefics config.json (`where` names it in errors)."""
    problems = idefics_problems(hf)
    if problems:
        raise UserError(f"{where}: cannot load this Idefics: " + "; ".join(problems))
    perceiver = hf.get("perceiver_config") or {}
    vision_hf = hf.get("vision_config") or {}
    rope = hf.get("rope_parameters") or {}
    extra = int(hf.get("additional_vocab_size", 0))
    vocab = int(hf["vocab_size"]) + extra
    decoder = DecoderConfig(
        vocab_size=vocab,
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
    )
    act = {"gelu_pytorch_tanh": "gelu_tanh"}.get(vision_hf.get("hidden_act", "gelu"))
    vision = ViTConfig(
        image_size=vision_hf.get("image_size", 224),
        patch_size=vision_hf.get("patch_size", 14),
        width=vision_hf.get("embed_dim", 768),
        layers=vision_hf.get("num_hidden_layers", 32),
        heads=vision_hf.get("num_attention_heads", 16),
        mlp_hidden=vision_hf.get("intermediate_size", 5120),
        act=act or vision_hf.get("hidden_act", "gelu"),
        eps=float(vision_hf.get("layer_norm_eps", 1e-5)),
    )
    resampler = ResamplerConfig(
        num_latents=perceiver.get("resampler_n_latents", 64),
        depth=perceiver.get("resampler_depth", 6),
        heads=perceiver.get("resampler_n_heads", 16),
        head_dim=perceiver.get("resampler_head_dim", 96),
        act="relu",
    )
    if processor is None:
        processor = ProcessorConfig(
            image_size=vision.image_size, image_tokens=1, image_delimiters=False,
            resize_mode="resize", vocab_size=vocab,
        )
    config = FlamingoConfig(
        vision=vision,
        vision_feature_layer=-1,
        vision_cls_token=True,
        resampler=resampler,
        cross_attn_every=int(hf.get("cross_layer_interval", 1)),
        gate="vector" if hf.get("alpha_type", "float") == "vector" else "float",
        decoder=decoder,
        processor=processor,
    )
    if num_gated_blocks(decoder.num_layers, config.cross_attn_every) != (
        decoder.num_layers // config.cross_attn_every
    ):
        raise UserError(
            f"{where}: num_hidden_layers {decoder.num_layers} is not a multiple of "
            f"cross_layer_interval {config.cross_attn_every}"
        )
    return config


def from_idefics(path: str | Path, processor: ProcessorConfig | None = None) -> Flamingo:
    """A transformers `IdeficsForVisionText2Text` directory (config.json + model.safetensors)
    as a visto Flamingo, tensor for tensor.

    The layouts agree: CLIP-named ViT (its whole last_hidden_state, CLS included, feeds the
    resampler), Idefics' Perceiver Resampler (ReLU MLP, final LayerNorm), gated blocks before
    decoder layers 0, k, 2k, ... with RMSNorm/SwiGLU and zero-initialised tanh gates, and a
    Llama decoder (full multi-head attention). Idefics' decoupled embeddings (additional
    vocabulary, e.g. its `<image>` token) are concatenated into one table and one head.
    Refused: `IDEFICS_REQUIREMENTS`, a perceiver with qk layer norms, and rope scaling.
    The media mask is visto's (token t reads the last image at or before it, the `<image>`
    marker its own); Idefics takes it as an input, and its processor builds it the same way
    except that tokens after an end-of-document id read no image (packed documents). The
    marker must be visto's `<image>` id (3): a real Idefics tokenizer's `<image>` (32001 in
    idefics-9b) would need that id made configurable.
    """
    from visto.nn.weights import load_by_key_map, read_config_json

    directory = Path(path)
    config_path = directory / "config.json"
    hf = read_config_json(directory)
    if hf.get("model_type") != "idefics":
        raise UserError(f"{config_path}: model_type {hf.get('model_type')!r} is not 'idefics'")
    config = config_from_idefics(hf, str(config_path), processor)
    model = Flamingo(config)

    extra = int(hf.get("additional_vocab_size", 0))
    key_map = idefics_key_map(model, joined=extra > 0)
    # Decoupled embeddings: the additional rows go after the regular ones.
    joins = {ours: _join_rows for ours, theirs in key_map.items() if isinstance(theirs, tuple)}
    tied = config.decoder.tie_word_embeddings

    def ignore(key: str) -> bool:
        return (
            key.endswith(("rotary_emb.inv_freq", "position_ids"))  # recomputed
            or (not extra and key in IDEFICS_ADDITIONAL)  # the empty tables of no extra words
            or (tied and key.startswith("lm_head."))  # the head is the embedding table
        )

    load_by_key_map(model, directory, key_map, joins, ignore=ignore)
    return model.eval()


def idefics_export_problems(model: Flamingo) -> list[str]:
    """What of this Flamingo transformers' `IdeficsForVisionText2Text` cannot hold exactly."""
    cfg, v, dec = model.config, model.config.vision, model.config.decoder
    r = cfg.resampler
    checks = [
        (cfg.vision_cls_token, "Idefics resamples every token of the tower's last hidden state, "
         "CLS included: set vision_cls_token true (and retrain the resampler)"),
        (cfg.vision_feature_layer % (v.layers + 1) == v.layers,
         f"Idefics reads the tower's last layer, not layer {cfg.vision_feature_layer}"),
        (v.stem == "patch" and v.cls_token and v.pre_norm and not v.patch_bias,
         "Idefics' vision tower is CLIP's (linear patch stem, class token, pre-LayerNorm)"),
        (r.act == "relu" and r.mlp_ratio == 4 and r.max_frames == 1,
         f"Idefics' resampler MLP is ReLU at 4x the width for images (this one: {r.act}, "
         f"{r.mlp_ratio}x, {r.max_frames} frames): resampler act 'relu', mlp_ratio 4"),
        (dec.num_kv_heads == dec.num_heads and dec.resolved_head_dim * dec.num_heads == dec.hidden_size,
         f"Idefics' decoder has full multi-head attention (num_kv_heads {dec.num_kv_heads} != "
         f"num_heads {dec.num_heads}, or a head_dim of its own)"),
        (not (dec.attention_bias or dec.qkv_bias or dec.mlp_bias), "Idefics' decoder has no biases"),
        (cfg.cross_attn_heads in (None, dec.num_heads)
         and cfg.cross_attn_intermediate in (None, dec.intermediate_size),
         "Idefics' gated blocks take the decoder's heads and intermediate size"),
        (dec.num_layers % cfg.cross_attn_every == 0,
         f"Idefics puts num_hidden_layers // cross_layer_interval gated blocks: num_layers "
         f"{dec.num_layers} must be a multiple of cross_attn_every {cfg.cross_attn_every}"),
    ]  # fmt: skip
    if cfg.question_focus is not None:
        checks.append((False, "Idefics has no question focus (question_focus: the region connector's "
                       "<focus> slots and pointer head); export a Flamingo without it"))
    return [why for ok, why in checks if not ok]


def export_idefics(model: Flamingo, directory: str | Path) -> Path:
    """Write `directory` for `transformers.IdeficsForVisionText2Text.from_pretrained`: the
    inverse of `from_idefics` (the same `idefics_key_map`), LoRA merged, with the tokenizer.
    Idefics takes the media mask as an input (`image_attention_mask`: token t reads the last
    image at or before it), which visto's `media_mask` is. Refused, each with its reason:
    `idefics_export_problems`."""
    from visto.models.transformers_format import (
        act_to_hf,
        merged,
        refuse_export,
        write_transformers_dir,
    )

    model = merged(model)
    refuse_export("Flamingo (as Idefics)", idefics_export_problems(model))
    cfg, v, dec, r = model.config, model.config.vision, model.config.decoder, model.config.resampler
    state = model.state_dict()
    tensors = {theirs: state[ours] for ours, theirs in idefics_key_map(model, joined=False).items()}
    if v.pos_embed == "sincos":  # Idefics learns its table; ours is fixed, stored as one
        tensors["model.vision_model.embeddings.position_embedding.weight"] = (
            model.vision_model.embeddings.positions()
        )
    config = {
        "architectures": ["IdeficsForVisionText2Text"], "model_type": "idefics",
        "vocab_size": dec.vocab_size, "additional_vocab_size": 0, "hidden_size": dec.hidden_size,
        "intermediate_size": dec.intermediate_size, "num_hidden_layers": dec.num_layers,
        "num_attention_heads": dec.num_heads, "hidden_act": "silu", "rms_norm_eps": dec.rms_norm_eps,
        "max_position_embeddings": dec.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": dec.rope_theta},
        "tie_word_embeddings": dec.tie_word_embeddings, "cross_layer_interval": cfg.cross_attn_every,
        "alpha_type": cfg.gate, "alpha_initializer": "zeros", "qk_layer_norms": False,
        "use_resampler": True, "bos_token_id": dec.bos_token_id, "eos_token_id": dec.eos_token_id,
        "vision_config": {
            "model_type": "idefics_vision", "embed_dim": v.width, "image_size": v.image_size,
            "patch_size": v.patch_size, "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
            "intermediate_size": v.mlp_hidden, "hidden_act": act_to_hf(v.act),
            "layer_norm_eps": v.eps, "num_channels": 3,
        },
        "perceiver_config": {
            "model_type": "idefics_perciever", "use_resampler": True,
            "resampler_n_latents": r.num_latents, "resampler_depth": r.depth,
            "resampler_n_heads": r.heads, "resampler_head_dim": r.head_dim or v.width // r.heads,
            "qk_layer_norms_perceiver": False,
        },
    }  # fmt: skip
    return write_transformers_dir(model, directory, config, tensors)


__all__ = ["IDEFICS_REQUIREMENTS", "PARAM_GROUPS", "Flamingo", "FlamingoConfig", "FlamingoState", "FocusedImages",
           "GatedStepWeights", "ImageContext", "build_focus_connector", "config_from_idefics", "export_idefics",
           "from_idefics", "gated_step", "idefics_export_problems", "idefics_key_map",
           "vision_hidden_state"]  # fmt: skip
