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

The decoder is visto's `DecoderLM`, unchanged: each routed projection is swapped for a
`RoutedLinear`, an `nn.Linear` that keeps the language weight under its own name (so
`language_model.*` is still a Llama state dict) and sends the image rows to its expert, whose
weights live in `visual_expert.layers.N.*`, a separate prefix for `optim.module_lrs`. The
experts start as copies of the language weights (the paper's initialisation), so an untrained
CogVLM computes exactly what the base LLaVA would.

The token types reach the layers through a `TokenRoute` the model sets for the duration of one
forward (`with model.routed(is_image): ...`). Generated tokens are text, so `decode_step` runs
unrouted. One model must therefore not run two forwards at once from two threads (the engine
and the server's batcher run one at a time).

The engine's fast path (`visto.infer.runner`, fused plain-decoder weights) would skip the
routing, so a CogVLM offers none (no `prefill_inputs`) and decodes through its own
prefill/decode_step; it cannot join a continuous batch.

Not reproduced: CogVLM's position ids, which give all tokens of one image a single position;
here every token has its own, as in LLaVA, so the engine's KV cache and positions need nothing
special.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visto.data.special_tokens import IMAGE_TOKEN_ID
from visto.errors import UserError
from visto.models.llava import PARAM_GROUPS as LLAVA_GROUPS
from visto.models.llava import Llava, LlavaConfig
from visto.nn.language import DecoderState

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


class TokenRoute:
    """The token-type mask of the forward in progress: (B, T), True at image positions."""

    def __init__(self) -> None:
        self.mask: Tensor | None = None


class RoutedLinear(nn.Linear):
    """The language projection (its own weight and bias), with image rows sent to `expert`.

    The expert is registered under `visual_expert`, not here, so the language weights keep
    their state-dict names and their own learning rate. It is looked up by (parent, name) at
    each call, so whatever sits there now runs (e.g. the expert wrapped with LoRA adapters).
    """

    def __init__(
        self, language: nn.Linear, expert_parent: nn.Module, expert_name: str, route: TokenRoute
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = language.in_features, language.out_features
        self.weight, self.bias = language.weight, language.bias
        self._expert_slot = (expert_parent, expert_name)  # a tuple: not registered as a submodule
        self._route = route

    @property
    def expert(self) -> nn.Module:
        parent, name = self._expert_slot
        return getattr(parent, name)

    def forward(self, x: Tensor) -> Tensor:
        mask = self._route.mask
        if mask is None:
            return F.linear(x, self.weight, self.bias)  # pure text: exactly the base decoder
        assert mask.shape == x.shape[:-1], (
            f"token-type mask {tuple(mask.shape)} does not match the input {tuple(x.shape[:-1])}"
        )
        out = x.new_empty(*x.shape[:-1], self.out_features)  # (B, T, out)
        out[~mask] = F.linear(x[~mask], self.weight, self.bias)
        out[mask] = self.expert(x[mask])
        return out


class CogVLM(Llava):
    family = "cogvlm"
    PARAM_GROUPS = PARAM_GROUPS

    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__(config)
        self.route = TokenRoute()
        # visual_expert.layers.N.{self_attn,mlp}.<proj>: copies of the language projections.
        self.visual_expert = nn.Module()
        self.visual_expert.layers = nn.ModuleList()
        for block in self.language_model.model.layers:
            expert = nn.Module()
            expert.self_attn, expert.mlp = nn.Module(), nn.Module()
            for name in config.expert_modules:
                parent = getattr(block, EXPERT_SLOTS[name])
                language = getattr(parent, name)
                assert type(language) is nn.Linear, f"{name} is already routed or not a Linear"
                expert_parent = getattr(expert, EXPERT_SLOTS[name])
                setattr(expert_parent, name, copy.deepcopy(language))
                setattr(parent, name, RoutedLinear(language, expert_parent, name, self.route))
            self.visual_expert.layers.append(expert)

    @contextlib.contextmanager
    def routed(self, is_image: Tensor) -> Iterator[None]:
        """Within the block, decoder forwards send the positions where `is_image` (B, T) is
        True to the visual expert."""
        assert self.route.mask is None, "a routed forward is already running on this model"
        self.route.mask = is_image
        try:
            yield
        finally:
            self.route.mask = None

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        with self.routed(batch["input_ids"] == IMAGE_TOKEN_ID):
            return super().forward(batch)

    @property
    def prefill_inputs(self) -> Any:
        # The engine's fast path (visto.infer.runner) runs a plain DecoderLM from its fused
        # language weights, which would skip the expert routing. A model without
        # `prefill_inputs` gets no fast path: the engine calls prefill/decode_step below.
        raise AttributeError("CogVLM routes image positions to its visual expert: no fast path")

    def prefill(self, batch: Any) -> tuple[Tensor, DecoderState]:
        """A left-padded batch (processor `Batch` or dict) -> last logits (B, V) and state."""

        def get(name: str) -> Tensor:
            return batch[name] if isinstance(batch, dict) else getattr(batch, name)

        lm = self.language_model
        device, dtype = lm.lm_head.weight.device, lm.lm_head.weight.dtype
        input_ids = get("input_ids").to(device)
        with torch.inference_mode():
            embeds = self.embed_inputs(
                input_ids,
                get("pixel_values").to(device, dtype),
                get("image_sample_index").to(device),
            )
        with self.routed(input_ids == IMAGE_TOKEN_ID):
            return lm.prefill_embeds(embeds, get("attention_mask").to(device))

    # decode_step is Llava's: one new (text) token per row, no route set, language weights.


__all__ = ["PARAM_GROUPS", "CogVLM", "CogVLMConfig", "RoutedLinear", "TokenRoute"]
