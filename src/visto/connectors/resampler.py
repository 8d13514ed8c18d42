"""The Perceiver Resampler (Alayrac et al. 2022, "Flamingo", Sec. 2.1 and Fig. 5): a fixed
set of learned latents reads any number of vision features and comes out as a fixed number
of visual tokens, so the language side costs the same for one image, a 4x larger image, or a
video of eight frames.

    features (N, F, P, D)   F frames of P patch features each (a still image: F = 1, or
                            pass (N, P, D))
      + time embedding per frame (learned, only when max_frames > 1)     (N, F, P, D)
      -> flatten frames and patches                                       (N, F*P, D)
    latents (R, D), repeated per item                                     (N, R, D)
      depth x:  latents += attn(q = LN(latents), kv = [LN(features); LN(latents)])
                latents += FFW(latents)     (LN -> Linear -> act -> Linear, no biases)
      -> final LayerNorm                                                  (N, R, D)

Keys and values are the features *concatenated with the latents* (the paper's detail: the
latents also attend to themselves). Queries, keys, values and output have no bias, as in the
paper and in transformers' `IdeficsPerceiverResampler`, whose layout this matches tensor for
tensor (see `hf_key_map`); its MLP uses ReLU, Flamingo's reference implementations GELU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visto.errors import UserError
from visto.nn.attention import Attention
from visto.nn.transformer import activation


@dataclass
class ResamplerConfig:
    num_latents: int = 16  # visual tokens per image (or per video), whatever its size
    depth: int = 2  # the paper uses 6; shallow is enough at our sizes
    heads: int = 4
    head_dim: int | None = None  # default width // heads
    mlp_ratio: int = 4  # FFW hidden width = mlp_ratio * width
    act: str = "gelu"  # "relu" for transformers' Idefics
    max_frames: int = 1  # > 1 adds learned time embeddings for up to this many frames

    def __post_init__(self) -> None:
        problems = []
        if min(self.num_latents, self.depth, self.heads, self.mlp_ratio, self.max_frames) < 1:
            problems.append("num_latents, depth, heads, mlp_ratio and max_frames must be >= 1")
        if self.act != "relu":
            try:
                activation(self.act)
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise UserError("resampler config: " + "; ".join(problems))


class PerceiverMLP(nn.Module):
    """The resampler's feed-forward, its own LayerNorm first (Idefics names: ln, fc, c_proj)."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.act = F.relu if act == "relu" else activation(act)
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.fc(self.ln(x))))


class PerceiverLayer(nn.Module):
    """One resampler layer: latents attend to [features; latents], then a feed-forward."""

    def __init__(self, dim: int, cfg: ResamplerConfig) -> None:
        super().__init__()
        self.context_layer_norm = nn.LayerNorm(dim)
        self.latents_layer_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, cfg.heads, head_dim=cfg.head_dim, bias=False)
        self.mlp = PerceiverMLP(dim, cfg.mlp_ratio * dim, cfg.act)

    def forward(self, features: Tensor, latents: Tensor) -> Tensor:
        """features (N, S, D), latents (N, R, D) -> latents (N, R, D)."""
        context = self.context_layer_norm(features)
        queries = self.latents_layer_norm(latents)
        keys_values = torch.cat([context, queries], dim=1)  # (N, S + R, D)
        latents = latents + self.attn(queries, context=keys_values)
        return latents + self.mlp(latents)


class PerceiverResampler(nn.Module):
    """(N, F, P, D) or (N, P, D) vision features -> (N, num_latents, D) visual tokens."""

    def __init__(self, dim: int, cfg: ResamplerConfig) -> None:
        super().__init__()
        self.config, self.dim = cfg, dim
        # Flamingo initialises the latents from a normal distribution (Idefics: std 1).
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, dim))
        if cfg.max_frames > 1:
            self.frame_embeddings = nn.Parameter(torch.zeros(cfg.max_frames, dim))
            nn.init.normal_(self.frame_embeddings, std=0.02)
        self.layers = nn.ModuleList(PerceiverLayer(dim, cfg) for _ in range(cfg.depth))
        self.layer_norm = nn.LayerNorm(dim)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim == 3:
            features = features[:, None]  # one frame: (N, 1, P, D)
        assert features.ndim == 4 and features.shape[-1] == self.dim, (
            f"resampler input must be (N, F, P, {self.dim}) or (N, P, {self.dim}), "
            f"got {tuple(features.shape)}"
        )
        n, frames, patches, dim = features.shape
        assert frames <= self.config.max_frames, (
            f"{frames} frames but the resampler has time embeddings for {self.config.max_frames}"
        )
        if self.config.max_frames > 1:
            features = features + self.frame_embeddings[:frames, None, :]  # (N, F, P, D)
        features = features.reshape(n, frames * patches, dim)  # (N, F*P, D)
        latents = self.latents.to(features.dtype).expand(n, -1, -1)  # (N, R, D)
        for layer in self.layers:
            latents = layer(features, latents)
        return self.layer_norm(latents)  # (N, R, D)

    def hf_key_map(self) -> dict[str, str]:
        """Our key -> transformers' `IdeficsPerceiverResampler` key (no time embeddings there)."""
        out = {"latents": "latents", "layer_norm.weight": "layer_norm.weight",
               "layer_norm.bias": "layer_norm.bias"}
        for i in range(self.config.depth):
            ours, theirs = f"layers.{i}", f"blocks.{i}"
            for norm in ("context_layer_norm", "latents_layer_norm"):
                for p in ("weight", "bias"):
                    out[f"{ours}.{norm}.{p}"] = f"{theirs}.0.{norm}.{p}"
            for proj in ("q_proj", "k_proj", "v_proj"):
                out[f"{ours}.attn.{proj}.weight"] = f"{theirs}.0.{proj}.weight"
            out[f"{ours}.attn.o_proj.weight"] = f"{theirs}.0.output_proj.weight"
            for p in ("weight", "bias"):
                out[f"{ours}.mlp.ln.{p}"] = f"{theirs}.1.ln.{p}"
            out[f"{ours}.mlp.fc.weight"] = f"{theirs}.1.fc.weight"
            out[f"{ours}.mlp.c_proj.weight"] = f"{theirs}.1.c_proj.weight"
        return out


__all__ = ["PerceiverLayer", "PerceiverMLP", "PerceiverResampler", "ResamplerConfig"]
