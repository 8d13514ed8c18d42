"""CogVLM (Wang et al. 2023, "CogVLM: Visual Expert for Pretrained Language Models"): LLaVA's
wiring (vision tower -> projector -> visual tokens spliced at the `<image>` ids), plus a
*visual expert* in every decoder layer: image positions go through their own QKV and MLP
weights, text positions through the language model's, and attention mixes both (§2.1). The
language model stays frozen, so text-only behaviour is exactly the base decoder's, while the
expert gives the image tokens deep, trainable capacity.

    is_image = input_ids == <image>                                     (B, T) token types
    in each layer, for each expert projection (q/k/v, gate/up/down by default):
        out[~is_image] = language_proj(x[~is_image])      frozen (optim.module_lrs 0)
        out[is_image]  = expert_proj(x[is_image])         trained

The decoder is visto's `DecoderLM`, unchanged, and its projections stay plain `nn.Linear`
(`language_model.*` is still a Llama state dict). The experts live in
`visual_expert.layers.N.{self_attn,mlp}.<proj>`, a separate prefix for `optim.module_lrs`,
and reach the decoder as an argument of its layer loop: `experts(input_ids)` is a
`Conditioning` (visto.nn.language) with the expert layers and the image mask, which the
decoder's blocks hand to their projections (`visto.nn.experts`). The experts start as copies
of the language weights (the paper's initialisation), so an untrained CogVLM computes exactly
what the base LLaVA would.

Generated tokens are text, so decoding steps pass no experts: a decode step is LLaVA's, and
the engine's fast path (`visto.infer.runner`) runs the prompt with the experts
(`prefill_inputs`) and then decodes as for LLaVA, joining continuous batches alike.

Not reproduced: CogVLM's position ids, which give all tokens of one image a single position;
here every token has its own, as in LLaVA, so the engine's KV cache and positions need nothing
special.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from visto.data.special_tokens import IMAGE_TOKEN_ID
from visto.errors import UserError
from visto.models import common
from visto.models.llava import PARAM_GROUPS as LLAVA_GROUPS
from visto.models.llava import Llava, LlavaConfig
from visto.nn.language import Conditioning, DecoderInputs, DecoderLM, DecoderState
from visto.nn.vision import ViT

PARAM_GROUPS = {**LLAVA_GROUPS, "expert": "visual_expert"}

# Where each routable projection sits in a `DecoderBlock`.
EXPERT_SLOTS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


@dataclass
class CogVLMConfig(LlavaConfig):
    # The paper's visual expert is a QKV matrix and an MLP per layer; its released code also
    # routes the attention output ("o_proj" here).
    expert_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.expert_modules) - set(EXPERT_SLOTS))
        if unknown or not self.expert_modules:
            raise UserError(
                f"expert_modules {unknown or '[]'}: choose one or more of {list(EXPERT_SLOTS)}"
            )


class CogVLM(Llava):
    family, PARAM_GROUPS = "cogvlm", PARAM_GROUPS

    def __init__(self, config: CogVLMConfig, vision: ViT | None = None, projector: nn.Module | None = None,
                 language: DecoderLM | None = None) -> None:  # fmt: skip
        """LLaVA's parts, as LLaVA takes them, and the visual expert: copies of the decoder's
        projections that `expert_modules` names."""
        if config.projector.pointer:
            raise UserError("projector.pointer is LLaVA's (its engine hook carries the copy slots); "
                            "CogVLM's visual experts do not take it: set projector.pointer false")  # fmt: skip
        super().__init__(config, vision, projector, language)
        # visual_expert.layers.N.{self_attn,mlp}.<proj>: copies of the language projections.
        self.visual_expert = nn.Module()
        self.visual_expert.layers = nn.ModuleList()
        for block in self.language_model.model.layers:
            expert = nn.Module()
            expert.self_attn, expert.mlp = nn.Module(), nn.Module()
            for name in config.expert_modules:
                slot = EXPERT_SLOTS[name]
                language = getattr(getattr(block, slot), name)
                assert type(language) is nn.Linear, f"{name} is not a plain Linear"
                setattr(getattr(expert, slot), name, copy.deepcopy(language))
            self.visual_expert.layers.append(expert)

    def experts(self, input_ids: Tensor) -> Conditioning:
        """The decoder's conditioning: positions holding `<image>` ids (B, T) are computed by
        the visual expert's projections, the others by the language model's."""
        return Conditioning(
            experts=self.visual_expert.layers, expert_mask=input_ids == IMAGE_TOKEN_ID
        )

    def decoder_hidden(self, batch: dict[str, Tensor]) -> tuple[Tensor, None]:
        """A collated batch -> the decoder's last hidden states (B, T, C), the visual expert on
        the `<image>` positions: what `forward` (LLaVA's: the LM head on the scored positions
        only) and `answer_logits` read. No slots: CogVLM takes no pointer head."""
        input_ids = batch["input_ids"]
        embeds = self.embed_inputs(
            input_ids, batch["pixel_values"], batch.get("image_sample_index"), batch.get("segment_ids")
        )  # LLaVA's: visual tokens at the <image> positions
        return common.training_logits(self.language_model, embeds, batch, self.experts(input_ids), head=False), None

    # -- generation engine protocol (visto.infer.engine)

    def prefill_inputs(self, batch: Any) -> DecoderInputs:
        """A left-padded batch -> LLaVA's decoder input, with the visual expert on the image
        positions (what the engine's fast path runs the prompt on)."""
        embeds, attention_mask = super().prefill_inputs(batch)
        input_ids = common.batch_field(batch, "input_ids").to(embeds.device)
        return DecoderInputs(embeds, attention_mask, self.experts(input_ids))

    def prefill(self, batch: Any) -> tuple[Tensor, DecoderState]:
        """A left-padded batch (processor `Batch` or dict) -> last logits (B, V) and state."""
        inputs = self.prefill_inputs(batch)
        return self.language_model.prefill_embeds(
            inputs.embeds, inputs.attention_mask, inputs.conditioning
        )

    # decode_step is LLaVA's (CopyingDecoding's): one new (text) token per row, no experts,
    # language weights.


__all__ = ["PARAM_GROUPS", "CogVLM", "CogVLMConfig"]
