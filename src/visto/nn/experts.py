"""Token-routed expert projections (CogVLM's visual expert, Wang et al. 2023, §2.1).

    expert = Expert(visual_expert.layers[i], is_image)     # (B, T) True = the expert's rows
    y = expert.linear("q_proj", attn.q_proj, x)             # own weights elsewhere

A decoder layer passes `expert.part("self_attn")` to its attention and `expert.part("mlp")` to
its MLP; each projection whose name the expert module holds computes the masked rows with the
expert's weights, the other rows (and every row of a projection the expert lacks) with the
layer's own. The expert is an argument of the call, not state of the layer: the same layer
called without one is the plain language model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class Expert:
    """Expert projections for one module and the positions they take.

    module: holds the expert's projections under the routed module's own names (an
        attention's `q_proj`, ...; a whole layer's `self_attn.q_proj`, `mlp.down_proj`, ...).
    mask: (B, T) bool, True at the positions the expert computes.
    """

    module: nn.Module
    mask: Tensor

    def part(self, name: str) -> Expert | None:
        """The expert of submodule `name` (e.g. "self_attn"), or None if it has none."""
        sub = getattr(self.module, name, None)
        return Expert(sub, self.mask) if isinstance(sub, nn.Module) else None

    def linear(self, name: str, own: nn.Module, x: Tensor) -> Tensor:
        """own(x) (B, T, in) -> (B, T, out), with the masked rows through the expert's `name`."""
        expert = getattr(self.module, name, None)
        if expert is None:
            return own(x)
        mask = self.mask
        assert mask.shape == x.shape[:-1], (
            f"expert mask {tuple(mask.shape)} does not match the input {tuple(x.shape[:-1])}"
        )
        text = own(x[~mask])  # (N_text, out)
        out = x.new_empty(*x.shape[:-1], text.shape[-1])  # (B, T, out)
        out[~mask] = text
        out[mask] = expert(x[mask])
        return out


__all__ = ["Expert"]
