"""LLaVA (Liu et al. 2023, "Visual Instruction Tuning"; 1.5: "Improved Baselines ..."):
a vision tower, a projector, and a decoder that reads the projected patches as tokens.

    pixels (N_img, 3, S, S) -> ViT, hidden state of vision_feature_layer, CLS dropped  (N_img, P, D_v)
                            -> projector (linear | mlp | pixel_shuffle)                 (N_img, n, D_lm)
    input_ids (B, T) -> embeddings (B, T, D_lm); the k-th `<image>` id, counted row-major
                        over the batch, gets the k-th visual token (the processor puts
                        exactly n `<image>` ids per image, images in batch order)
                     -> decoder -> logits (B, T, V); loss on the answer tokens only (shifted)

Any number of images per conversation, anywhere in any turn: the splice only counts ids.

Parameter names are those of transformers' `LlavaForConditionalGeneration` as it saves them:
`vision_tower.*` (CLIPVisionModel names), `multi_modal_projector.*` (linear_1, linear_2),
`language_model.*` (Llama names), so `export_hf` is a short key map and from there vLLM serves
the model. Transformers' format is exact for the `mlp` projector with processor settings
`image_delimiters=False` and `image_tokens = (image_size / patch_size)^2` (its processor
repeats `<image>` once per patch, with no start/end tokens around the run).

Training stages are recipes (`llava-stage1.json`: projector only on captions;
`llava-stage2.json`: projector + decoder on the instruction mix); the groups for
`optim.module_lrs` are `PARAM_GROUPS` (0 = frozen).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visto.connectors.pointer import (
    CopySlots,
)
from visto.connectors.projector import (
    LinearProjector,
    MLPProjector,
    ProjectorConfig,
    build_projector,
)
from visto.data.processor import Processor, ProcessorConfig
from visto.data.special_tokens import IMAGE, IMAGE_TOKEN_ID
from visto.data.tokenizer import DEFAULT_LOC_BINS, Tokenizer
from visto.errors import UserError
from visto.losses import scored_answer_loss
from visto.models import common
from visto.models.transformers_format import (
    act_from_hf,
    act_to_hf,
    image_normalisation,
    image_processor_json,
    legacy_key,
    merged,
    read_hf_config,
    read_image_processor,
    refuse_export,
    write_transformers_dir,
)
from visto.nn.language import DecoderConfig, DecoderLM
from visto.nn.vision import (
    CLIP_MEAN,
    CLIP_STD,
    InferenceWatch,
    ViT,
    ViTConfig,
    distinct_images,
    vit_config_from_transformers,
)
from visto.nn.weights import load_by_key_map

log = logging.getLogger("visto.models")

# Names for optim.module_lrs: group -> the parameter-name prefix it covers.
PARAM_GROUPS = {
    "vision": "vision_tower",
    "projector": "multi_modal_projector",
    "language": "language_model",
}



@dataclass
class LlavaConfig(common.FamilyConfig):
    """common.FamilyConfig's decoder, processor, tokenizer source and pretrained parts
    (`vision_init`: the tower), then LLaVA's vision tower and projector."""

    DISPLAY_NAME: ClassVar[str] = "LLaVA"

    # 64 px, 8 px patches -> 64 patches -> 64 visual tokens with the mlp projector; no
    # delimiters, so the exported model reads the same ids transformers' LlavaProcessor makes.
    processor: ProcessorConfig = field(default_factory=lambda: ProcessorConfig(image_size=64, image_tokens=64, image_delimiters=False, max_length=256))
    vision: ViTConfig = field(default_factory=lambda: ViTConfig.preset("small"))
    # Hidden state fed to the projector, indexed as transformers does (-1 last, -2 the
    # penultimate layer, which LLaVA 1.5 uses: its last layer is tuned to CLIP's objective).
    # The CLS token is always dropped (transformers' vision_feature_select_strategy "default").
    vision_feature_layer: int = -2
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)

    def __post_init__(self) -> None:
        if problems := common.feature_layer_problems(self.vision, self.vision_feature_layer):
            raise UserError("; ".join(problems))
        if self.processor.resize_mode == "patch":
            raise UserError("LLaVA encodes square images: processor.resize_mode 'pad' or 'resize'")

    @property
    def image_tokens(self) -> int:
        """Visual tokens per image: patches, divided by r^2 under pixel shuffle."""
        return self.projector.num_tokens(self.vision.num_patches)

    def check_processor(self) -> None:
        """The processor must make the images and the `<image>` runs the towers expect."""
        p = self.processor
        problems = common.fit_problems(p, self.decoder, self.vision)
        if p.image_tokens != self.image_tokens:
            problems.append(
                f"processor.image_tokens is {p.image_tokens} but each image gives "
                f"{self.image_tokens} visual tokens ({self.vision.num_patches} patches, "
                f"projector {self.projector.kind})"
            )
        if p.focus_tokens and not (self.projector.kind == "regions" and self.projector.focus):
            problems.append(
                f"processor.focus_tokens is {p.focus_tokens} but only a regions projector with "
                "focus on writes <focus> slots; set focus_tokens 0 or projector.focus true"
            )
        elif self.projector.read_slots and p.focus_tokens != 4 + self.projector.read_slots:
            problems.append(
                f"projector.read_slots {self.projector.read_slots} are <focus> slots after the box's "
                f"4: set processor.focus_tokens to {4 + self.projector.read_slots}"
            )
        common.refuse_problems("llava", problems)

    @classmethod
    def tiny_fields(cls) -> dict[str, Any]:
        """Unit tests: 32 px, 16 visual tokens, 2+2 layers (`small`, the defaults: the CPU)."""
        return dict(vision=ViTConfig.preset("tiny"), vision_feature_layer=-1, **common.tiny_text_parts(image_tokens=16))


# ----------------------------------------------------------------------------- the model


def build_llava_projector(config: LlavaConfig) -> nn.Module:
    """LLaVA's connector: patch features at the tower's width in, the decoder's width out."""
    return build_projector(config.projector, config.vision.width, config.decoder.hidden_size)


class Llava(common.CopyingDecoding, common.ConversationFamily, nn.Module):
    family, display_name, PARAM_GROUPS = "llava", "LLaVA", PARAM_GROUPS

    def __init__(self, config: LlavaConfig, vision: ViT | None = None, projector: nn.Module | None = None,
                 language: DecoderLM | None = None) -> None:  # fmt: skip
        """Parts built elsewhere (visto.pretrained: `vision_init`, `language_init`, the regions
        connector's detector) bring their architectures; the others are built fresh here."""
        super().__init__()
        common.refuse_part_paths(config, self.family)
        config = common.adopt_parts(config, vision, language)
        config.check_processor()
        self.config = config
        self.vision_tower = vision if vision is not None else ViT(config.vision)
        self.multi_modal_projector = projector if projector is not None else build_llava_projector(config)
        self.language_model = language if language is not None else DecoderLM(config.decoder)
        self._processor: Processor | None = None

    # -- processor (common.ConversationFamily: built from the config on first use)

    def accept_processor(self, processor: Processor) -> None:
        super().accept_processor(processor)  # the tokenizer fits the decoder
        if processor.config.image_tokens != self.config.image_tokens:
            raise UserError(
                f"the processor puts {processor.config.image_tokens} <image> ids per image but "
                f"this model makes {self.config.image_tokens} visual tokens per image"
            )
        if self.config.projector.kind == "regions":
            self.multi_modal_projector.set_vocabulary(processor.tokenizer, processor.config.focus_tokens)

    @property
    def focus_connector(self) -> nn.Module | None:
        """The regions projector when its question focus is on (it fills the `<focus>` slots;
        `pointer`, common.ConversationFamily's, is its pointer head), else None."""
        projector = self.multi_modal_projector
        return projector if getattr(projector, "focus", None) is not None else None

    # -- the forward pass

    def patch_features(self, pixel_values: Tensor) -> Tensor:
        """(N_img, 3, S, S) -> the tower's patch features (N_img, P, D_v), CLS dropped."""
        return self.vision_tower(
            pixel_values, feature_layer=self.config.vision_feature_layer, pooled=False
        ).features

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """(N_img, 3, S, S) -> visual tokens (N_img, n, D_lm)."""
        regions = self.config.projector.kind == "regions"
        inference = not (torch.is_grad_enabled() or self.training)
        if inference and not regions and pixel_values.shape[0] > 1:
            # Several questions about one picture: each distinct image through the tower and
            # the projector once (row by row the same numbers: both are per image), its
            # tokens repeated for the rows that hold it.
            unique, inverse = distinct_images(pixel_values)
            if unique.shape[0] < pixel_values.shape[0]:
                return self.image_features(unique)[inverse]
        features = self.patch_features(pixel_values)  # (N_img, P, D_v)
        if regions:  # object tokens read the decoder's word embeddings
            return self.multi_modal_projector(features, self.language_model.model.embed_tokens, pixel_values)
        plan = _projector_plan(self, features) if inference else None
        if plan is not None:
            return plan(features)
        return self.multi_modal_projector(features)  # (N_img, n, D_lm)

    def embed_with_copies(self, input_ids: Tensor, pixel_values: Tensor, image_sample_index: Tensor | None = None,
                          segment_ids: Tensor | None = None) -> tuple[Tensor, CopySlots | None]:  # fmt: skip
        """Token embeddings (B, T, D_lm) with the visual tokens at the `<image>` positions (and,
        with the regions connector's `focus`, each answer's named objects at its start;
        `segment_ids` of packed exchanges tell it where each exchange's question begins), and
        what each answer's `<focus>` slots hold as token ids (one row per `<|assistant|>` token,
        row-major; None without the focus's slots or images): what the pointer head copies
        (connectors.pointer). `embed_inputs` (common.CopyingDecoding) is the embeddings alone."""
        hint = (
            f"; the processor's image_tokens must equal the model's "
            f"({self.config.image_tokens}) and every image needs its <image> run"
        )
        embeds = self.language_model.embed(input_ids)  # (B, T, C)
        if self.focus_connector is None or pixel_values.shape[0] == 0:
            return common.splice_visual_tokens(
                embeds, input_ids, pixel_values, self.image_features, image_sample_index, hint=hint
            ), None
        connector, embed = self.multi_modal_projector, self.language_model.model.embed_tokens
        objects = connector.objects(self.patch_features(pixel_values), embed)
        visual = connector.visual_tokens(objects, embed, pixel_values)
        embeds = common.splice_visual_tokens(
            embeds, input_ids, pixel_values, lambda _: visual, image_sample_index, hint=hint
        )
        added, copies = common.focus_with_copies(
            connector, objects, embed, input_ids, pixel_values, image_sample_index, segment_ids
        )
        return embeds + added.to(embeds.dtype), copies

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A collated batch -> {"loss", "token_acc"} (next-token CE and accuracy on answers):
        `embed_with_copies`, the decoder, and its LM head (and a pointer head) on the scored
        positions only (common.CopyingDecoding's `scored_answer_logits`; `answer_logits` gives every
        position's): the same loss without the head over every position and a copy of all the
        logits (~9% of a quickstart stage-2 step)."""
        return scored_answer_loss(*self.scored_answer_logits(batch))

    # collate and prompt_batch (common.ConversationFamily): whole conversations by the processor.
    # The generation engine's protocol (visto.infer.engine) is common.CopyingDecoding's: prefill_inputs
    # embeds the prompt by `embed_with_copies`; with a pointer head each row keeps the slots its
    # answer may copy, mixed in after the LM head (output_logits).


# ----------------------------------------------------------------------------- the projector at inference


class _ProjectorPlan:
    """A linear or mlp projector as inference on the CPU runs it: each weight kept transposed,
    (in, out) contiguous, multiplied by `addmm` (`F.linear`'s (out, in) weight is packed by
    MKL at every call), the activation in place on the first matmul's output, no module
    calls. Its weights are copies, remade when the projector changes (`InferenceWatch`);
    the numbers are the modules' (tested equal)."""

    ACTS = {(nn.GELU, "none"), (nn.GELU, "tanh"), (nn.SiLU, None)}

    def __init__(self, projector: nn.Module) -> None:
        norm = projector.pre_norm
        self.norm = None if isinstance(norm, nn.Identity) else (norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        linears = [projector.linear_1] + ([projector.linear_2] if hasattr(projector, "linear_2") else [])
        with torch.no_grad():
            self.layers = [(m.weight.detach().t().contiguous(), None if m.bias is None else m.bias.detach())
                           for m in linears]  # fmt: skip
        act = getattr(projector, "act", None)
        self.act = None if act is None else (type(act), getattr(act, "approximate", None))
        self.out_dim = linears[-1].out_features

    @classmethod
    def fits(cls, projector: nn.Module) -> bool:
        """A plain linear or mlp projector: exactly nn.Linear layers (not int8 or LoRA), a
        LayerNorm or nothing before them, one of the ACTS between, no hooks anywhere."""
        mlp = type(projector) is MLPProjector
        if not (mlp or type(projector) is LinearProjector):
            return False
        modules = list(projector.modules())
        if any(m._forward_hooks or m._forward_pre_hooks for m in modules):
            return False
        linears = [projector.linear_1] + ([projector.linear_2] if mlp else [])
        if any(type(m) is not nn.Linear for m in linears):
            return False
        if type(projector.pre_norm) not in (nn.Identity, nn.LayerNorm):
            return False
        if mlp and (type(projector.act), getattr(projector.act, "approximate", None)) not in cls.ACTS:
            return False
        return len(modules) == 2 + len(linears) + mlp

    def __call__(self, features: Tensor) -> Tensor:
        N, P, D = features.shape
        x = features.reshape(N * P, D)
        if self.norm is not None:
            x = torch.layer_norm(x, *self.norm)
        for i, (weight_t, bias) in enumerate(self.layers):
            x = torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)
            if i == 0 and self.act is not None:  # x is the matmul's own output: in place
                kind, approximate = self.act
                x = F.silu(x, inplace=True) if kind is nn.SiLU else torch.ops.aten.gelu_(x, approximate=approximate)
        return x.view(N, P, self.out_dim)


def _projector_plan(model: Llava, features: Tensor) -> _ProjectorPlan | None:
    """`model`'s projector as a `_ProjectorPlan` at inference on the CPU, or None where it runs
    as modules (another kind, another device, int8 or LoRA layers, hooks, fp64 features
    into fp32 weights, ...). Made on first use, remade when the projector changes."""
    projector = model._modules["multi_modal_projector"]
    if features.device.type != "cpu" or projector.training:
        return None
    cache = model.__dict__.get("_projector_plan")
    if cache is None or cache[1] is not projector or not cache[0].current():
        plan = _ProjectorPlan(projector) if _ProjectorPlan.fits(projector) else None
        # the modules whose hooks would be skipped (a module swapped in later changes the
        # watch's entries, so the tuple stays the projector's)
        cache = (InferenceWatch(projector), projector, plan, (projector, *projector.children()))
        model.__dict__["_projector_plan"] = cache
    plan = cache[2]
    if plan is None or features.dtype != plan.layers[0][0].dtype:
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in cache[3]):
        return None  # hooks added after the plan was made
    return plan


def hf_key_map(model: Llava) -> dict[str, str]:
    """Our state-dict key -> the key in a transformers (llava-hf) model.safetensors.

    The layout of the llava-hf checkpoints on the hub (what vLLM reads):
    `vision_tower.vision_model.*`, `multi_modal_projector.*`, `language_model.model.*`,
    `language_model.lm_head.weight`.
    """
    out = {}
    for key in model.vision_tower.state_dict():
        out[f"vision_tower.{key}"] = f"vision_tower.vision_model.{key}"
    for key in model.multi_modal_projector.state_dict():
        out[f"multi_modal_projector.{key}"] = f"multi_modal_projector.{key}"
    for ours, theirs in model.language_model.hf_key_map().items():
        out[f"language_model.{ours}"] = f"language_model.{theirs}"
    return out


def hf_config(model: Llava) -> dict[str, Any]:
    """transformers' LlavaConfig as a dict (CLIP vision config, Llama/Qwen2 text config)."""
    cfg = model.config
    v = cfg.vision
    text = cfg.decoder.to_hf()
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v.width,
            "intermediate_size": v.mlp_hidden,
            "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_act": act_to_hf(v.act),
            "layer_norm_eps": v.eps,
            "num_channels": 3,
        },
        "text_config": text,
        "image_token_index": IMAGE_TOKEN_ID,
        "image_seq_length": cfg.image_tokens,
        "projector_hidden_act": act_to_hf(cfg.projector.act),
        "multimodal_projector_bias": cfg.projector.bias,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": cfg.decoder.tie_word_embeddings,
        "torch_dtype": "float32",
    }


def export_problems(model: Llava) -> list[str]:
    """What of this LLaVA transformers' `LlavaForConditionalGeneration` cannot hold exactly
    (empty: it exports)."""
    cfg = model.config
    problems = []
    if cfg.projector.kind != "mlp" or cfg.projector.hidden_dim not in (None, cfg.decoder.hidden_size):
        problems.append(
            "transformers' Llava projector is linear_1 -> act -> linear_2 at the text width: "
            "use projector kind 'mlp' with hidden_dim null"
        )
    if cfg.projector.norm:
        problems.append("transformers' Llava projector has no input LayerNorm: use projector norm false")
    if cfg.vision.stem != "patch":
        problems.append(
            f"the vision tower has a {cfg.vision.stem} stem, and transformers' CLIP vision tower "
            "embeds patches with one linear projection: train the tower with vision stem 'patch' "
            "(`visto quickstart --vision-stem patch`, or vision.stem 'patch' in the recipe)"
        )
    if cfg.projector.act not in ("gelu", "silu", "gelu_tanh"):
        problems.append(f"projector act {cfg.projector.act!r} has no transformers name")
    if cfg.processor.image_delimiters:
        problems.append(
            "processor.image_delimiters must be false: transformers' LlavaProcessor puts no "
            "<im_start>/<im_end> around the image tokens, so prompts would differ from training"
        )
    return problems


def export_hf(model: Llava, directory: str | Path) -> Path:
    """Write `directory` for `transformers.LlavaForConditionalGeneration.from_pretrained`
    (and vLLM): config.json, model.safetensors, and the tokenizer with its chat template.
    LoRA adapters are merged into a copy (transformers' Llava has none).

    Exact for the `mlp` projector whose hidden width is the decoder's, with processor
    `image_delimiters=False` (transformers' processor repeats `<image>` with no delimiters);
    refused otherwise, each reason named (`export_problems`).
    """
    model = merged(model)
    refuse_export("LLaVA", export_problems(model))
    state = model.state_dict()
    tensors = {theirs: state[ours] for ours, theirs in hf_key_map(model).items()}
    if model.config.vision.pos_embed == "sincos":
        # transformers' CLIP learns its position table; ours is fixed, so store it as one.
        table = model.vision_tower.embeddings.fixed_position_embedding
        tensors["vision_tower.vision_model.embeddings.position_embedding.weight"] = table
    return write_transformers_dir(model, directory, hf_config(model), tensors,
                                  _hf_processor_files(model))  # fmt: skip


def _hf_processor_files(model: Llava) -> dict[str, dict[str, Any]]:
    """preprocessor_config.json and processor_config.json, from the model's own processor:
    written beside its tokenizer, so only when it has one (no processor is built here)."""
    cfg = model.config
    if model._processor is None and not (cfg.tokenizer_dir or cfg.tokenizer_corpus):
        return {}
    return {
        "preprocessor_config.json": image_processor_json(model.processor.config, "CLIPImageProcessor"),
        "processor_config.json": {
            "processor_class": "LlavaProcessor",
            "patch_size": cfg.vision.patch_size,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
            "image_token": IMAGE,
        },
    }


def config_from_hf(
    hf: dict[str, Any], where: str, tokenizer: Tokenizer | None = None, image_processor: dict | None = None,
    image_processor_where: str | Path | None = None,
) -> LlavaConfig:
    """The LlavaConfig of a transformers LlavaConfig dict (the inverse of `hf_config`), or a
    UserError listing each setting visto cannot reproduce exactly."""
    vision_hf, text_hf = hf.get("vision_config") or {}, dict(hf.get("text_config") or {})
    problems = []
    if vision_hf.get("model_type", "clip_vision_model") != "clip_vision_model":
        problems.append(f"vision tower {vision_hf['model_type']!r}: visto reads CLIP vision towers")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        problems.append(f"vision_feature_layer {layer!r}: visto reads one layer (an integer)")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        problems.append(f"vision_feature_select_strategy {strategy!r}: visto drops the CLS token ('default')")
    image_token = hf.get("image_token_index", hf.get("image_token_id"))
    if image_token != IMAGE_TOKEN_ID:
        problems.append(
            f"image_token_index {image_token}: visto splices images at <image> = id {IMAGE_TOKEN_ID}, "
            "its tokenizer's (a LLaVA exported by visto has it)"
        )
    projector_act = act_from_hf(hf.get("projector_hidden_act", "gelu"))
    if projector_act not in ("gelu", "gelu_tanh", "silu"):
        problems.append(f"projector_hidden_act {hf.get('projector_hidden_act')!r} is not supported")
    if problems:
        raise UserError(f"{where}: visto cannot reproduce this LLaVA exactly: " + "; ".join(problems))
    if "tie_word_embeddings" in hf:  # the top-level setting is the one transformers applies
        text_hf["tie_word_embeddings"] = hf["tie_word_embeddings"]
    decoder = DecoderConfig.from_hf(text_hf, where=f"{where} text_config")
    vision = vit_config_from_transformers(
        {**vision_hf, "hidden_act": act_from_hf(vision_hf.get("hidden_act", "quick_gelu"))}
    )
    mean, std = image_normalisation(image_processor or {}, image_processor_where or where, (CLIP_MEAN, CLIP_STD))
    processor = ProcessorConfig(
        image_size=vision.image_size,
        # Squashed to a square as visto's export writes it (do_center_crop false); a
        # shortest-edge resize + centre crop differs on non-square images.
        resize_mode="resize",
        image_tokens=vision.num_patches,
        image_delimiters=False,
        mean=mean,
        std=std,
        vocab_size=tokenizer.vocab_size if tokenizer else decoder.vocab_size,
        loc_bins=tokenizer.loc_bins if tokenizer else DEFAULT_LOC_BINS,
    )
    return LlavaConfig(
        vision=vision,
        vision_feature_layer=layer,
        projector=ProjectorConfig(
            kind="mlp", act=projector_act, bias=hf.get("multimodal_projector_bias", True)
        ),
        decoder=decoder,
        processor=processor,
    )


def _vision_model_key(key: str) -> str:
    # transformers 5 saves the vision tower without its `vision_model.` level; the hub has it.
    key = legacy_key(key)
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key.removeprefix("vision_tower.")
    return key


def load_hf(directory: str | Path) -> Llava:
    """A visto LLaVA from a transformers `LlavaForConditionalGeneration` directory (hub
    layout or transformers 5's), through the same `hf_key_map` the export writes. A visto
    tokenizer.json there (as `export_hf` writes) becomes the processor; another tokenizer
    leaves the model without one (weights and logits only)."""
    directory = Path(directory)
    hf = read_hf_config(directory)
    if hf is None or hf.get("model_type") != "llava":
        raise UserError(f"{directory} is not a transformers LLaVA directory (config.json model_type 'llava')")
    tokenizer = _visto_tokenizer(directory)
    found = read_image_processor(directory)  # preprocessor_config.json, or transformers 5's processor_config.json
    image_processor, image_processor_path = found if found else (None, None)
    config = config_from_hf(hf, str(directory / "config.json"), tokenizer, image_processor, image_processor_path)
    model = Llava(config)
    tied = config.decoder.tie_word_embeddings

    def ignore(key: str) -> bool:  # copies and buffers the file may hold beside the weights
        return key.endswith(("position_ids", "rotary_emb.inv_freq")) or (
            tied and key == "language_model.lm_head.weight"
        )

    load_by_key_map(model, directory, hf_key_map(model), rename=_vision_model_key, ignore=ignore)
    if tokenizer is not None:
        model.processor = Processor(config.processor, tokenizer)
    return model.eval()


def _visto_tokenizer(directory: Path) -> Tokenizer | None:
    if not (directory / "tokenizer.json").is_file():
        return None
    try:
        return Tokenizer.load(directory)
    except UserError as e:
        log.warning("%s: loaded without a processor (chat and eval need one): %s", directory, e)
        return None


__all__ = [
    "PARAM_GROUPS",
    "Llava",
    "LlavaConfig",
    "build_llava_projector",
    "config_from_hf",
    "export_hf",
    "export_problems",
    "hf_config",
    "hf_key_map",
    "load_hf",
]
