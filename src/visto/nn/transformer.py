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

from visto.nn.attention import Attention, LayerCache, PackedLayout
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

    def fusable(self) -> bool:
        """Whether `FusedEncoderBlock` computes this block: plain Linear layers (not int8,
        not LoRA-wrapped), no dropout to apply, q/k/v of one width."""
        attn = self.self_attn
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.out, self.mlp.fc1, self.mlp.fc2)
        return (
            all(type(m) is nn.Linear for m in linears)
            and (attn.dropout == 0.0 or not self.training)
            and attn.n_kv_heads == attn.n_heads
        )


class EncoderStack(nn.Module):
    """`n_layers` encoder blocks, the body of both CLIP towers: `layers.N`, as transformers
    names them under each tower's `encoder`. The towers' forwards run the blocks themselves."""

    def __init__(self, n_layers: int, dim: int, n_heads: int, mlp_hidden: int, act: str = "gelu",
                 eps: float = 1e-5) -> None:  # fmt: skip
        super().__init__()
        self.layers = nn.ModuleList(
            [EncoderBlock(dim, n_heads, mlp_hidden, act, eps) for _ in range(n_layers)]
        )


class FusedEncoderBlock:
    """An `EncoderBlock` without its mask (a vision tower's block) as inference runs it on the
    CPU: q, k and v in one matmul, every weight kept transposed, (in, out) contiguous, so MKL
    reads it as it lies instead of packing it at each call, and no module calls. Its weights
    are copies, made once (`ViT` remakes them when the block's parameters change); the
    numbers are the block's (tested equal)."""

    def __init__(self, block: EncoderBlock) -> None:
        assert block.fusable(), "FusedEncoderBlock needs plain Linear layers"
        attn, mlp = block.self_attn, block.mlp
        self.heads, self.head_dim = attn.n_heads, attn.head_dim
        self.ln1 = (block.layer_norm1.weight, block.layer_norm1.bias, block.layer_norm1.eps)
        self.ln2 = (block.layer_norm2.weight, block.layer_norm2.bias, block.layer_norm2.eps)
        self.act = mlp.act
        with torch.no_grad():
            self.qkv = _transposed(attn.q_proj, attn.k_proj, attn.v_proj)
            self.out = _transposed(attn.out)
            self.fc1 = _transposed(mlp.fc1)
            self.fc2 = _transposed(mlp.fc2)

    def __call__(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        H, hd = self.heads, self.head_dim
        h = F.layer_norm(x, (C,), *self.ln1[:2], eps=self.ln1[2])
        qkv = _linear_t(h, *self.qkv).view(B, T, 3, H, hd)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, T, hd)
        x = x + _linear_t(y.transpose(1, 2).reshape(B, T, H * hd), *self.out)
        h = F.layer_norm(x, (C,), *self.ln2[:2], eps=self.ln2[2])
        return x + _linear_t(self.act(_linear_t(h, *self.fc1)), *self.fc2)


def _transposed(*linears: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """The layers' weights concatenated along their outputs as (in, out), and their biases."""
    weight_t = torch.cat([m.weight for m in linears]).detach().t().contiguous()
    if all(m.bias is None for m in linears):
        return weight_t, None
    bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                      for m in linears]).detach()  # fmt: skip
    return weight_t, bias


def _linear_t(x: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    """x (..., in) @ weight_t (in, out) + bias."""
    rows = x.reshape(-1, weight_t.shape[0])
    y = torch.mm(rows, weight_t) if bias is None else torch.addmm(bias, rows, weight_t)
    return y.view(*x.shape[:-1], weight_t.shape[1])


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
        packed: PackedLayout | None = None,
    ) -> Tensor:
        """x (B, T, dim); mask as in `Attention` (padding), causality is always applied.
        expert: projections (under this block's names: self_attn.q_proj, mlp.up_proj, ...)
        that compute the positions its mask marks (CogVLM's visual expert, `visto.nn.experts`).
        packed: a training batch's `PackedLayout` (causality, padding and segments), in place
        of `mask`."""
        attn_expert = expert.part("self_attn") if expert is not None else None
        mlp_expert = expert.part("mlp") if expert is not None else None
        x = x + self.self_attn(
            self.input_layernorm(x),
            mask=mask,
            causal=True,
            rope=rope,
            cache=cache,
            expert=attn_expert,
            packed=packed,
        )
        return x + self.mlp(self.post_attention_layernorm(x), expert=mlp_expert)
