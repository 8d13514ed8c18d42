"""A decode step's decoder layers as TorchScript: the runner's ops, without Python between them.

At batch 1 a decode step of a small decoder is ~230 operator calls, and on a CPU each costs
Python's call overhead on top of ATen's (bench/README.md, "the output head in int8"): a
TorchScript function runs the same ATen operators, in the same order, from its interpreter,
about 2 us less per call (240 small operators: 1,213 -> 664 us in a scratch measurement). So
the runner's decode step (one token per row, no conditioning, no expert) calls one of these
functions for its layers; everything else (embedding, rotary rows, logits, the pointer) stays
in Python. The numbers are the Python path's, bit for bit (tests/test_runner_scripted.py).

One function per weight kind (TorchScript has no union of a tensor and a packed int8 weight):
`fp32_layers` takes each fused projection's (in, out) weight, with each RMSNorm's weight folded
into the projection after it (the runner's `_Linear`); `int8_layers` takes the fused int8
projections' packed weights and the norms' own weights. Neither takes biases: a decoder with
biased projections runs the Python path.
"""

# TorchScript reads these annotations: typing.List and Optional, as it documents them.
# ruff: noqa: UP006, UP035, UP045
from __future__ import annotations

import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_rows(x: Tensor, eps: Tensor, weight: Optional[Tensor]) -> Tensor:
    """RMSNorm of fp32 rows x (N, C) as x * rsqrt(|x|^2 / C + eps), times `weight` unless it
    was folded into the next matmul (None); the runner's Python path calls it too."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    scale = torch.addcmul(eps, norm, norm, value=1.0 / x.shape[-1]).rsqrt_()
    if weight is None:
        return torch.mul(x, scale)
    return torch.mul(x, scale).mul_(weight)


def _attend(qkv: Tensor, cos: Tensor, sin: Tensor, kc: Tensor, vc: Tensor, end: int, lo: int,
            mask: Optional[Tensor], heads: int, kv_heads: int, head_dim: int) -> Tensor:  # fmt: skip
    """Rotary on q and k, this step's keys and values into the cache, attention: (B, H * hd)."""
    B = qkv.shape[0]
    n_q, n_qk = heads * head_dim, (heads + kv_heads) * head_dim
    qk = qkv[:, :n_qk].view(B, 1, heads + kv_heads, head_dim)
    qk = torch.addcmul(qk * cos, qk.roll(head_dim // 2, dims=-1), sin)
    q = qk[:, :, :heads].transpose(1, 2)
    k = qk[:, :, heads:].transpose(1, 2)
    v = qkv[:, n_qk:].view(B, 1, kv_heads, head_dim).transpose(1, 2)
    kc[:, :, end : end + 1] = k
    vc[:, :, end : end + 1] = v
    if heads != kv_heads:  # a kv head's query heads as that many queries of one attention
        y = F.scaled_dot_product_attention(
            q.reshape(B, kv_heads, heads // kv_heads, head_dim), kc[:, :, lo : end + 1],
            vc[:, :, lo : end + 1], attn_mask=mask,
        )  # fmt: skip
        return y.reshape(B, n_q)
    y = F.scaled_dot_product_attention(q, kc[:, :, lo : end + 1], vc[:, :, lo : end + 1], attn_mask=mask)
    return y.transpose(1, 2).reshape(B, n_q)


def fp32_layers(x: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor], eps: Tensor,
                ln1: List[Optional[Tensor]], ln2: List[Optional[Tensor]], qkv: List[Tensor],
                o: List[Tensor], gate_up: List[Tensor], down: List[Tensor], k_cache: List[Tensor],
                v_cache: List[Tensor], end: int, lo: int, heads: int, kv_heads: int,
                head_dim: int, one: float = 1.0) -> Tensor:  # fmt: skip
    """x (B, C) through every layer at one position per row -> (B, C); weights (in, out).
    `one`: addmm's alpha and beta as an argument, not a constant: with constants the graph
    executor splits addmm into mm + add, which rounds the sum differently."""
    for i in range(len(qkv)):
        h = rms_rows(x, eps, ln1[i])
        y = _attend(torch.mm(h, qkv[i]), cos, sin, k_cache[i], v_cache[i], end, lo, mask,
                    heads, kv_heads, head_dim)  # fmt: skip
        x = torch.addmm(x, y, o[i], beta=one, alpha=one)
        h = rms_rows(x, eps, ln2[i])
        gate, up = torch.mm(h, gate_up[i]).chunk(2, -1)
        x = torch.addmm(x, F.silu(gate) * up, down[i], beta=one, alpha=one)
    return x


def int8_layers(x: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor], eps: Tensor,
                ln1: List[Tensor], ln2: List[Tensor],
                qkv: List[torch.classes.quantized.LinearPackedParamsBase],
                o: List[torch.classes.quantized.LinearPackedParamsBase],
                gate_up: List[torch.classes.quantized.LinearPackedParamsBase],
                down: List[torch.classes.quantized.LinearPackedParamsBase],
                k_cache: List[Tensor], v_cache: List[Tensor], end: int, lo: int, heads: int,
                kv_heads: int, head_dim: int) -> Tensor:  # fmt: skip
    """`fp32_layers` for int8 projections (`nn.quantize.fuse_int8_linears`' packed weights)."""
    for i in range(len(qkv)):
        h = rms_rows(x, eps, ln1[i])
        fused = torch.ops.quantized.linear_dynamic(h, qkv[i], True)
        y = _attend(fused, cos, sin, k_cache[i], v_cache[i], end, lo, mask, heads, kv_heads, head_dim)
        x = x + torch.ops.quantized.linear_dynamic(y, o[i], True)
        h = rms_rows(x, eps, ln2[i])
        gate, up = torch.ops.quantized.linear_dynamic(h, gate_up[i], True).chunk(2, -1)
        x = x + torch.ops.quantized.linear_dynamic(F.silu(gate) * up, down[i], True)
    return x


_SCRIPTED: dict[str, torch.jit.ScriptFunction | None] = {}


def scripted(kind: str) -> torch.jit.ScriptFunction | None:
    """The TorchScript function for `kind` ("fp32" or "int8"), compiled once per process;
    None where this torch cannot script it (the runner then runs its Python path).

    `torch.jit.script` warns that it is deprecated for torch.compile / torch.export; on this
    CPU torch.compile made the decode step slower, not faster (bench/README.md, "Prefill and
    time to first token"), and TorchScript runs the same operators with less overhead, so it
    is used while the pinned torch has it, and its warning is silenced here."""
    if kind not in _SCRIPTED:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.script. is deprecated")
                _SCRIPTED[kind] = torch.jit.script({"fp32": fp32_layers, "int8": int8_layers}[kind])
        except Exception:  # a torch without TorchScript, or one that cannot script these
            _SCRIPTED[kind] = None
    return _SCRIPTED[kind]


__all__ = ["fp32_layers", "int8_layers", "rms_rows", "scripted"]
