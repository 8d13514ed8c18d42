"""Fuyu (Bavishi et al. 2023, "Fuyu-8B: A Multimodal Architecture for AI Agents"): no vision
encoder at all. Each image patch is linearly projected straight into the decoder's width and
read as a token; an `<im_newline>` token ends every row of patches, so the decoder sees the
image's 2-D layout, and any image size or aspect ratio works (no resize to a square).

    image (H, W) -> processor "patch" mode: shrink only if the longer side > image_size, pad
                    right/bottom to the patch grid (rows, cols); the span in the text is
                    (<image> * cols, <im_newline>) * rows
    pixel_values (N_patches, 3*p*p)   every patch of every image of the batch, row-major
                 -> vision_embed_tokens (a Linear)                       (N_patches, D_lm)
    input_ids (B, T) -> embeddings (B, T, D_lm); the k-th `<image>` id, counted row-major
                        over the batch, gets the k-th patch embedding; `<im_newline>` keeps
                        its learned token embedding
                     -> decoder -> logits (B, T, V); loss on the answer tokens only (shifted)

Parameter names are those transformers' `FuyuForCausalLM` saves: `vision_embed_tokens.*` and
`language_model.*` (Llama names). `from_transformers` reads such a directory. Transformers'
Fuyu flattens a patch as (y, x, channel); visto's processor as (channel, y, x) (a Conv2d
weight's layout), so the patch projection's input columns are permuted on the way in.

The released Fuyu-8B's decoder is Persimmon, which a Llama decoder cannot reproduce (see
`PERSIMMON_DIFFERENCES`); a transformers Fuyu whose text_config is Llama or Qwen2 loads exactly.

With `question_focus` (off by default) Fuyu shares the perception front end of `visto
compare`'s other families: the region connector's question focus and pointer (connectors.regions,
focus, pointer; LLaVA's `regions` projector with focus). A frozen ViT (`vision`, read from
`vision_init`) serves that focus alone: its dense heads detect objects, its OCR reader reads
text; each answer's question picks the objects it names (named words: no gradient), written into
the processor's `<focus>` slots before the answer and added to its `<|assistant|>` token, and a
pointer head lets the answer copy the slots' tokens. The image still reaches the decoder Fuyu's
way, as linearly projected raw patches at the `<image>` ids; the tower never sees them as
tokens. It reads each image rebuilt from its patches (`tower_images`: the patch grid stretched
to the tower's square, as a "resize" processor does; the same pixels for images already the
tower's size, as compare's are). The connector is the module `question_focus`, the tower
`vision_tower` (kept frozen by the model). Transformers' Fuyu holds neither: `export_hf`
refuses such a model.

Training stages are recipes (`fuyu-synth.json`); the groups for `optim.module_lrs` are
`PARAM_GROUPS` (0 = frozen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visto.connectors.pointer import CopySlots
from visto.connectors.projector import ProjectorConfig, build_projector
from visto.data.processor import Processor, ProcessorConfig
from visto.data.special_tokens import IMAGE_TOKEN_ID
from visto.errors import UserError
from visto.losses import scored_answer_loss
from visto.models import common
from visto.nn.language import DecoderConfig, DecoderInputs, DecoderLM
from visto.nn.vision import ViT, ViTConfig

PARAM_GROUPS = {
    "vision": "vision_embed_tokens",
    "language": "language_model",
}
# With `question_focus`, its region connector is `question_focus` and the tower it reads objects
# with `vision_tower` (frozen by the model itself); module_lrs takes the prefixes.

# Why transformers' Fuyu-8B (adept/fuyu-8b) cannot be mapped onto visto's Llama decoder: its
# language model is Persimmon, which differs from Llama in every block, not by a renaming.
PERSIMMON_DIFFERENCES = (
    "LayerNorm with bias (input, post-attention and final norms) instead of RMSNorm",
    "LayerNorm on the queries and keys of every head (qk_layernorm) before rotary",
    "partial rotary: only the first partial_rotary_factor (0.5) of each head's dims rotate",
    "one fused query_key_value projection with biases, interleaved per head, and a biased "
    "`dense` output projection",
    "a two-layer MLP (dense_h_to_4h -> squared ReLU -> dense_4h_to_h, with biases) instead "
    "of SwiGLU",
    "an untied lm_head",
)



@dataclass
class FuyuConfig(common.FamilyConfig):
    """common.FamilyConfig's decoder, processor, tokenizer source and pretrained parts (`vision_init`:
    the question focus's tower alone), then the optional question focus and its tower."""

    DISPLAY_NAME: ClassVar[str] = "Fuyu"
    # `vision_init` serves this option alone (visto compare gives the shared tower only to a
    # recipe that sets it, and credits a Fuyu without it the tower's minutes).
    VISION_INIT_ONLY_FOR: ClassVar[str] = "question_focus"

    # Longest side capped at 64 px, 8 px patches: at most 8 x 8 patches (+ 8 newlines) per image.
    # No <im_start>/<im_end>: Fuyu's prompt has only the patch and newline tokens.
    processor: ProcessorConfig = field(default_factory=lambda: ProcessorConfig(
        image_size=64, resize_mode="patch", patch_size=8, image_delimiters=False, max_length=256
    ))
    # The shared perception front end's question focus (see the module doc): a projector config
    # of kind "regions" with focus on, as LLaVA's `projector` sets it (its object tokens are not
    # spliced into the text), with the processor's `focus_tokens` <focus> slots before each
    # answer (4 + read_slots). None: plain Fuyu (no tower at all).
    question_focus: ProjectorConfig | None = None
    # Used by question_focus alone: the frozen tower whose dense heads (and OCR reader) find the
    # objects and text the focus reads. Fuyu's patches never pass through it. `vision_init`
    # names the checkpoint the tower, its detector and its reader come from (read by
    # visto.pretrained.build_model, then forgotten: the saved config holds `vision`).
    vision: ViTConfig | None = None
    vision_feature_layer: int = -1

    def __post_init__(self) -> None:
        if self.processor.resize_mode != "patch":
            raise UserError(
                "Fuyu reads raw patches of any aspect ratio: set processor.resize_mode to 'patch'"
            )
        if self.question_focus is not None and self.vision is None:
            self.vision = ViTConfig()  # the focus's tower, by default (vision_init's replaces it)
        problems = self.focus_problems()
        if problems:
            raise UserError("fuyu config: " + "; ".join(problems))

    def focus_problems(self) -> list[str]:
        """Where `question_focus`, its tower and the processor's <focus> slots disagree."""
        focus, slots = self.question_focus, self.processor.focus_tokens
        if focus is None:
            # Without the focus Fuyu has no tower: a `vision` (what visto.pretrained reads from
            # vision_init) is refused here; a vision_init path that was never read is refused
            # by the constructor (common.refuse_part_paths).
            problems = [] if self.vision is None else [
                "vision (the tower vision_init names) is used by question_focus alone (Fuyu has no "
                "vision encoder: its patches never pass through a tower); set question_focus or leave "
                "vision and vision_init out"]  # fmt: skip
            return problems + common.question_focus_problems(None, slots)
        problems = common.question_focus_problems(focus, slots)
        return problems + common.feature_layer_problems(self.vision, self.vision_feature_layer) if self.vision else problems

    @property
    def patch_dim(self) -> int:
        """Inputs per patch: 3 channels x p x p pixels."""
        return 3 * self.processor.patch_size**2

    @classmethod
    def tiny_fields(cls) -> dict[str, Any]:
        """Unit tests: longest side 32 px, 8 px patches, 2 layers (`small`, the defaults: the CPU)."""
        return common.tiny_text_parts(resize_mode="patch", patch_size=8)


def build_focus_connector(config: FuyuConfig) -> nn.Module:
    """`question_focus`'s region connector, fresh: the tower's patch features in, the decoder's
    width out (visto.pretrained loads its detector and reader from the vision_init tower)."""
    assert config.question_focus is not None and config.vision is not None
    return build_projector(config.question_focus, config.vision.width, config.decoder.hidden_size)


class Fuyu(common.CopyingDecoding, common.ConversationFamily, nn.Module):
    family, display_name, PARAM_GROUPS = "fuyu", "Fuyu", PARAM_GROUPS

    def __init__(
        self, config: FuyuConfig, language: DecoderLM | None = None, vision: ViT | None = None,
        focus: nn.Module | None = None,
    ) -> None:  # fmt: skip
        """`language`: a pretrained decoder built elsewhere (visto.pretrained reads
        language_init), which brings its architecture; else built fresh. With `question_focus`,
        `vision` / `focus`: the vision_init tower and the connector with its detector (and
        reader), read by visto.pretrained; else built fresh."""
        super().__init__()
        common.refuse_part_paths(config, self.family)
        config = common.adopt_parts(config, vision, language)
        common.refuse_problems("fuyu", common.fit_problems(config.processor, config.decoder))
        self.config = config
        # Named as in transformers' FuyuForCausalLM; initialised like the decoder's matrices.
        self.vision_embed_tokens = nn.Linear(config.patch_dim, config.decoder.hidden_size)
        DecoderLM._init_weights(self.vision_embed_tokens)
        self.language_model = language if language is not None else DecoderLM(config.decoder)
        self.question_focus: nn.Module | None = None
        self.vision_tower: ViT | None = None
        if config.question_focus is not None:
            assert config.vision is not None
            # Built after the decoder: a plain Fuyu's seeded draws stay what they were.
            self.vision_tower = vision if vision is not None else ViT(config.vision)
            self.vision_tower.requires_grad_(False)  # the detector's tower: frozen, always
            self.question_focus = focus if focus is not None else build_focus_connector(config)

    # -- processor (common.ConversationFamily: built from the config on first use)

    def accept_processor(self, processor: Processor) -> None:
        super().accept_processor(processor)  # the tokenizer fits the decoder
        p = processor.config
        if p.resize_mode != "patch" or p.patch_size != self.config.processor.patch_size:
            raise UserError(
                f"Fuyu needs a processor in 'patch' mode with patch_size "
                f"{self.config.processor.patch_size}; got resize_mode {p.resize_mode!r}, "
                f"patch_size {p.patch_size}"
            )
        common.accept_focus_processor(self.question_focus, processor, self.config.processor.focus_tokens)

    # focus_connector and pointer (common.ConversationFamily): `question_focus` and its pointer
    # head, or None.

    # -- the forward pass

    def embed_inputs(self, input_ids: Tensor, pixel_values: Tensor, image_sample_index: Tensor | None = None,
                     image_token_counts: Tensor | None = None) -> Tensor:  # fmt: skip
        """Token embeddings (B, T, C) with one patch embedding at each `<image>` position.

        pixel_values: (N_patches, 3*p*p), all patches of the batch in order (processor layout).
        image_sample_index / image_token_counts: (N_img,) row and patch count of each image,
            used only to check that every row got exactly its own images' patches.
        """
        embeds = self.language_model.embed(input_ids)  # (B, T, C)
        is_image = input_ids == IMAGE_TOKEN_ID  # (B, T)
        n_patches = pixel_values.shape[0]
        expected = int(is_image.sum())
        assert expected == n_patches, (
            f"the batch has {expected} <image> ids but {n_patches} patches; every patch needs "
            "its <image> id (use the processor in 'patch' mode)"
        )
        if n_patches == 0:
            return embeds
        assert pixel_values.shape[1] == self.config.patch_dim, (
            f"patches must be (N, {self.config.patch_dim}) for {self.config.processor.patch_size} "
            f"px patches, got {tuple(pixel_values.shape)}"
        )
        if image_sample_index is not None and image_token_counts is not None:
            per_row = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
            per_row.index_add_(0, image_sample_index.to(per_row.device), image_token_counts.to(per_row.device))
            assert torch.equal(per_row, is_image.sum(dim=1)), (
                f"<image> ids per row {is_image.sum(dim=1).tolist()} do not match the patches of "
                f"each row's images {per_row.tolist()}"
            )
        patches = self.vision_embed_tokens(pixel_values.to(embeds.dtype))  # (N_patches, C)
        # masked_scatter fills the True positions in row-major order: row 0's patches first.
        return embeds.masked_scatter(is_image[..., None], patches)

    # -- the question focus (with `question_focus`)

    def tower_images(self, pixel_values: Tensor, image_grids: Tensor) -> Tensor:
        """Patches (N_patches, 3*p*p) of images with grids (N_img, 2) (rows, cols) -> the
        images as the focus's tower takes them (N_img, 3, S, S): each rebuilt from its patches
        (the processor's canvas, padded right/bottom to whole patches) and stretched to the
        tower's square as a "resize" processor does (unchanged where it is that size already)."""
        assert self.config.vision is not None
        p, size = self.config.processor.patch_size, self.config.vision.image_size
        counts = (image_grids[:, 0] * image_grids[:, 1]).tolist()
        images = []
        for patches, (rows, cols) in zip(pixel_values.split(counts), image_grids.tolist(), strict=True):
            image = patches.view(rows, cols, 3, p, p).permute(2, 0, 3, 1, 4).reshape(3, rows * p, cols * p)
            if image.shape[1:] != (size, size):
                image = F.interpolate(image[None], size=(size, size), mode="bicubic", align_corners=False,
                                      antialias=True)[0]  # fmt: skip
            images.append(image)
        return torch.stack(images)

    def patch_features(self, images: Tensor) -> Tensor:
        """(N_img, 3, S, S) -> the frozen tower's patch features (N_img, P, D_v), CLS dropped."""
        assert self.vision_tower is not None
        with torch.no_grad():  # the tower serves the detector and the connector's inputs only
            return self.vision_tower(images, feature_layer=self.config.vision_feature_layer, pooled=False).features

    def embed_with_copies(self, input_ids: Tensor, pixel_values: Tensor, image_sample_index: Tensor | None = None,
                          image_token_counts: Tensor | None = None, image_grids: Tensor | None = None,
                          segment_ids: Tensor | None = None) -> tuple[Tensor, CopySlots | None]:  # fmt: skip
        """`embed_inputs` (the patch embeddings at the `<image>` ids: Fuyu's own path) and,
        with `question_focus`, what the focus adds (each answer's named objects in its `<focus>`
        slots and on its `<|assistant|>` token; `segment_ids` of packed exchanges tell it where
        each exchange's question begins), and what each answer's slots hold for the pointer
        (one row per `<|assistant|>` token; None without the focus or images)."""
        embeds = self.embed_inputs(input_ids, pixel_values, image_sample_index, image_token_counts)
        connector = self.question_focus
        if connector is None or pixel_values.shape[0] == 0:
            return embeds, None
        assert image_grids is not None, "question_focus rebuilds each image from its patches: pass image_grids"
        images = self.tower_images(pixel_values.to(embeds.dtype), image_grids.to(pixel_values.device))
        embed = self.language_model.model.embed_tokens
        objects = connector.objects(self.patch_features(images), embed)
        added, copies = common.focus_with_copies(
            connector, objects, embed, input_ids, images, image_sample_index, segment_ids
        )
        return embeds + added.to(embeds.dtype), copies

    def _embed_batch(self, batch: Any, device: torch.device | None = None) -> Tensor:
        """A batch (collated dict or processor `Batch`) -> the decoder's input embeddings."""
        return self._embed_batch_with_copies(batch, device)[0]

    def _embed_batch_with_copies(
        self, batch: Any, device: torch.device | None = None
    ) -> tuple[Tensor, CopySlots | None]:
        """`embed_with_copies` of a batch's fields (moved to `device`)."""

        def get(name: str) -> Any:
            value = batch.get(name) if isinstance(batch, dict) else getattr(batch, name, None)
            return value.to(device) if device is not None and value is not None else value

        return self.embed_with_copies(
            get("input_ids"), get("pixel_values"), get("image_sample_index"),
            get("image_token_counts"), get("image_grids"), get("segment_ids"),
        )  # fmt: skip

    def decoder_hidden(self, batch: dict[str, Tensor]) -> tuple[Tensor, CopySlots | None]:
        """A collated batch -> the decoder's last hidden states (B, T, C) and each answer's
        slots (`embed_with_copies` of the batch's patches and grids)."""
        embeds, copies = self._embed_batch_with_copies(batch)
        return common.training_logits(self.language_model, embeds, batch, head=False), copies

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A collated batch -> {"loss", "token_acc"} (next-token CE and accuracy on answers).
        The LM head (and with `question_focus`, the pointer) runs on the scored positions only
        (common.CopyingDecoding's `scored_answer_logits`, on `decoder_hidden`)."""
        return scored_answer_loss(*self.scored_answer_logits(batch))

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        """Next-token logits (B, T, V) for a collated (right-padded) batch; with a pointer head,
        log-probabilities with each answer's slots mixed in where an answer token is predicted
        (what generation samples from; common.CopyingDecoding's `answer_logits`)."""
        return self.answer_logits(batch)

    # collate and prompt_batch (common.ConversationFamily): whole conversations by the processor.

    # -- generation engine protocol (visto.infer.engine)

    def prefill_inputs(self, batch: Any) -> tuple[Tensor, Tensor] | DecoderInputs:
        """A left-padded batch (processor `Batch` or dict) -> the decoder's input embeddings
        (B, T, C) and attention mask (B, T); the engine's fast path runs the decoder on them.
        With a pointer head, `DecoderInputs` whose per-row context is what the answer being
        generated (the prompt's last `<|assistant|>`) may copy (`output_logits` mixes it in)."""
        device = self.language_model.model.embed_tokens.weight.device
        with torch.inference_mode():
            embeds, copies = self._embed_batch_with_copies(batch, device)
        mask = common.batch_field(batch, "attention_mask").to(device)
        if self.pointer is None:
            return embeds, mask
        input_ids = common.batch_field(batch, "input_ids").to(device)
        return DecoderInputs(embeds, mask, context=common.last_answer_slots(self.focus_connector, input_ids, copies))


# ----------------------------------------------------------------------------- transformers format


def patch_columns_from_transformers(weight: Tensor, patch: int) -> Tensor:
    """(D, p*p*3) columns in transformers' (y, x, channel) order -> visto's (channel, y, x)."""
    d = weight.shape[0]
    assert weight.shape[1] == 3 * patch * patch, (
        f"patch projection has {weight.shape[1]} inputs, expected 3*{patch}*{patch}"
    )
    return weight.reshape(d, patch, patch, 3).permute(0, 3, 1, 2).reshape(d, 3 * patch * patch)


def from_transformers(path: str | Path, processor: ProcessorConfig | None = None) -> Fuyu:
    """A transformers `FuyuForCausalLM` directory (config.json + model.safetensors) as a visto
    Fuyu. Its text_config must be Llama or Qwen2; Persimmon (Fuyu-8B) is refused with reasons.

    `processor` sets the image settings (its patch_size must be the checkpoint's); by default,
    "patch" mode at the checkpoint's patch size. Attach a tokenizer with `model.processor = ...`.
    """
    from visto.models.transformers_format import legacy_key
    from visto.nn.weights import load_by_key_map, read_config_json

    directory = Path(path)
    config_path = directory / "config.json"
    hf = read_config_json(directory)
    if hf.get("model_type") != "fuyu":
        raise UserError(f"{config_path}: model_type {hf.get('model_type')!r} is not 'fuyu'")
    text = hf.get("text_config") or {}
    if text.get("model_type", "persimmon") == "persimmon":
        raise UserError(
            f"{config_path}: this Fuyu's language model is Persimmon, which visto's Llama decoder "
            "cannot reproduce: " + "; ".join(PERSIMMON_DIFFERENCES)
        )
    if hf.get("image_token_id", IMAGE_TOKEN_ID) != IMAGE_TOKEN_ID:
        raise UserError(
            f"{config_path}: image_token_id is {hf['image_token_id']}; visto's <image> id is "
            f"{IMAGE_TOKEN_ID}"
        )
    if hf.get("num_channels", 3) != 3:
        raise UserError(f"{config_path}: num_channels must be 3 (RGB)")
    patch = int(hf.get("patch_size", 30))
    if processor is None:
        processor = ProcessorConfig(
            image_size=int(hf.get("image_size", 300)), resize_mode="patch", patch_size=patch,
            image_delimiters=False, vocab_size=text["vocab_size"],
        )
    elif processor.patch_size != patch:
        raise UserError(f"processor.patch_size {processor.patch_size} != the checkpoint's {patch}")
    text = {**text, "tie_word_embeddings": hf.get("tie_word_embeddings", text.get("tie_word_embeddings"))}
    model = Fuyu(FuyuConfig(decoder=DecoderConfig.from_hf(text, where=f"{config_path} text_config"),
                            processor=processor))
    # Their keys in the legacy layout transformers 5 writes (language_model.model.*,
    # vision_embed_tokens.*; `legacy_key` renames its in-memory model.* and lm_head) are ours
    # name for name; only the patch embedding orders its columns differently.
    key_map = {f"language_model.{k}": f"language_model.{k}" for k in model.language_model.hf_key_map()}
    key_map |= {k: k for k in ("vision_embed_tokens.weight", "vision_embed_tokens.bias")}
    tied = model.config.decoder.tie_word_embeddings
    load_by_key_map(
        model, directory, key_map,
        {"vision_embed_tokens.weight": lambda w: patch_columns_from_transformers(w, patch)},
        rename=legacy_key, ignore=lambda key: tied and key == "language_model.lm_head.weight",
    )  # fmt: skip
    return model.eval()


def patch_columns_to_transformers(weight: Tensor, patch: int) -> Tensor:
    """(D, 3*p*p) columns in visto's (channel, y, x) order -> transformers' (y, x, channel)."""
    d = weight.shape[0]
    return weight.reshape(d, 3, patch, patch).permute(0, 2, 3, 1).reshape(d, 3 * patch * patch)


def export_hf(model: Fuyu, directory: str | Path) -> Path:
    """Write `directory` for `transformers.FuyuForCausalLM.from_pretrained`: a Fuyu whose
    text_config is visto's decoder (Llama or Qwen2), the same tensors as `from_transformers`
    reads (the patch projection's columns put back in transformers' order), LoRA merged.

    The tokenizer goes with it; the prompt layout is visto's processor's (`<image>` per patch,
    `<im_newline>` per row), which transformers' model reads by image_token_id, while its
    FuyuProcessor builds prompts with Persimmon's own special tokens, so use visto's."""
    from visto.models.transformers_format import merged, write_transformers_dir

    if model.config.question_focus is not None:
        raise UserError(
            "transformers' Fuyu has no question focus (question_focus: the region connector's <focus> "
            "slots, pointer head and the vision tower its detector reads); export a Fuyu without it"
        )
    model = merged(model)
    cfg, patch = model.config, model.config.processor.patch_size
    state = model.state_dict()
    tensors = {f"language_model.{theirs}": state[f"language_model.{ours}"]
               for ours, theirs in model.language_model.hf_key_map().items()}  # fmt: skip
    tensors["vision_embed_tokens.weight"] = patch_columns_to_transformers(
        state["vision_embed_tokens.weight"], patch
    )
    tensors["vision_embed_tokens.bias"] = state["vision_embed_tokens.bias"]
    text = cfg.decoder.to_hf()
    config = {
        "architectures": ["FuyuForCausalLM"], "model_type": "fuyu", "text_config": text,
        "vocab_size": text["vocab_size"], "hidden_size": text["hidden_size"],
        "image_size": cfg.processor.image_size, "patch_size": patch, "num_channels": 3,
        "image_token_id": IMAGE_TOKEN_ID, "tie_word_embeddings": cfg.decoder.tie_word_embeddings,
    }  # fmt: skip
    return write_transformers_dir(model, directory, config, tensors)


__all__ = ["PARAM_GROUPS", "PERSIMMON_DIFFERENCES", "Fuyu", "FuyuConfig", "build_focus_connector", "export_hf",
           "from_transformers", "patch_columns_from_transformers", "patch_columns_to_transformers"]  # fmt: skip
