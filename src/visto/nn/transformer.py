"""Transformer building blocks: norms, MLPs, and the two pre-norm blocks every tower uses.

    EncoderBlock  CLIP/ViT layout: LayerNorm, attention (out_proj), LayerNorm, MLP (fc1/fc2).
                  Bidirectional by default; `causal=True` gives CLIP's text transformer.
    DecoderBlock  Llama layout: RMSNorm, attention (o_proj, GQA, rotary, KV cache),
                  RMSNorm, SwiGLU (gate_proj/up_proj/down_proj).

Parameter names follow transformers' CLIPEncoderLayer and LlamaDecoderLayer, so exporting a
model to those formats is a key map with no reshaping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visto.nn.attention import Attention, LayerCache
from visto.nn.experts import Expert


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019) as in Llama: computed in fp32, then scaled."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def quick_gelu(x: Tensor) -> Tensor:
    """The sigmoid approximation of GELU that OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # SigLIP's "gelu_pytorch_tanh"
    "quick_gelu": quick_gelu,
    "silu": F.silu,
}


# Activation names where visto's and transformers' (ACT2FN) differ; the others agree.
_ACT_TO_HF = {"gelu_tanh": "gelu_pytorch_tanh"}
_ACT_FROM_HF = {hf: ours for ours, hf in _ACT_TO_HF.items()}


def act_to_hf(name: str) -> str:
    return _ACT_TO_HF.get(name, name)


def act_from_hf(name: str) -> str:
    return _ACT_FROM_HF.get(name, name)


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """Two-layer feed-forward (fc1 -> activation -> fc2), the ViT/CLIP/BERT layout."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        self.act_name = act
        self.act = activation(act)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """Gated feed-forward (Shazeer 2020, "GLU Variants Improve Transformer"), the Llama layout."""

    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor, expert: Expert | None = None) -> Tensor:
        """x (B, T, dim); `expert`: its rows go through the expert's projections (experts.py)."""
        if expert is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        hidden = F.silu(expert.linear("gate_proj", self.gate_proj, x)) * expert.linear(
            "up_proj", self.up_proj, x
        )
        return expert.linear("down_proj", self.down_proj, hidden)


class EncoderBlock(nn.Module):
    """Pre-norm block with CLIP's names: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        mlp_hidden: int,
        act: str = "gelu",
        eps: float = 1e-5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = Attention(dim, n_heads, bias=True, out_name="out_proj", dropout=dropout)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_hidden, act=act)

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask=mask, causal=causal)
        x = x + self.mlp(self.layer_norm2(x))
        return x


class DecoderBlock(nn.Module):
    """Pre-norm causal block with Llama's names; rotary positions, GQA, optional KV cache."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        mlp_hidden: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        eps: float = 1e-6,
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps=eps)
        self.self_attn = Attention(
            dim, n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, bias=bias, dropout=dropout
        )
        self.post_attention_layernorm = RMSNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, mlp_hidden, bias=bias)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        cache: LayerCache | None = None,
        expert: Expert | None = None,
    ) -> Tensor:
        """x (B, T, dim); mask as in `Attention` (padding), causality is always applied.
        expert: projections (under this block's names: self_attn.q_proj, mlp.up_proj, ...)
        that compute the positions its mask marks (CogVLM's visual expert, `visto.nn.experts`)."""
        attn_expert = expert.part("self_attn") if expert is not None else None
        mlp_expert = expert.part("mlp") if expert is not None else None
        x = x + self.self_attn(
            self.input_layernorm(x),
            mask=mask,
            causal=True,
            rope=rope,
            cache=cache,
            expert=attn_expert,
        )
        return x + self.mlp(self.post_attention_layernorm(x), expert=mlp_expert)
