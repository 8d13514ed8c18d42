"""Attention: self and cross, grouped-query heads, rotary positions, an explicit KV cache.

One `Attention` module serves every tower:

    attn = Attention(dim=256, n_heads=8, n_kv_heads=2)           # GQA, Llama naming
    y = attn(x, causal=True, rope=rope(position_ids))             # self-attention
    y = attn(x, context=image_feats)                              # cross-attention
    y = attn(x, causal=True, rope=..., cache=kv.layers[i])        # decode with a cache

Masks are boolean, True = may attend, broadcastable to (B, n_heads, T_q, T_k). Padding is
expressed by the caller (see `padding_mask_to_attention_mask`), so batched generation with
left padding needs no special case here: the decoder passes a mask and position ids.

The KV cache is a small dataclass the caller owns and passes in (nanoVLM style): each layer's
`LayerCache` grows by concatenation as tokens are appended. Simple and exact; a fixed-size
preallocated buffer would avoid the copies, but at our sequence lengths they are cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visto.nn.experts import Expert

# --------------------------------------------------------------------------------------------
# Rotary position embeddings (RoFormer, Su et al. 2021), in the Llama "rotate half" layout so
# that weights exported to transformers' Llama produce the same numbers.


class RotaryEmbedding(nn.Module):
    """Maps position ids (B, T) to the (cos, sin) pair that `apply_rotary` consumes."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        assert head_dim % 2 == 0, f"rotary needs an even head_dim, got {head_dim}"
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (head_dim/2,)

    def forward(
        self, position_ids: Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        assert position_ids.ndim == 2, (
            f"position_ids must be (B, T), got {tuple(position_ids.shape)}"
        )
        freqs = position_ids.float()[..., None] * self.inv_freq  # (B, T, head_dim/2)
        angles = torch.cat([freqs, freqs], dim=-1)  # (B, T, head_dim)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, hd) by the angles for its positions; cos/sin are (B, T, hd)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): the same rotation for every head
    return x * cos + _rotate_half(x) * sin


# --------------------------------------------------------------------------------------------
# KV cache


@dataclass
class LayerCache:
    """Keys and values one attention layer has seen so far, each (B, n_kv_heads, T_past, hd)."""

    k: Tensor | None = None
    v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add the new positions and return all keys/values (past + new)."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            assert self.v is not None
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


@dataclass
class KVCache:
    """The cache of a whole decoder: one `LayerCache` per layer, passed in and updated."""

    layers: list[LayerCache] = field(default_factory=list)

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        return cls([LayerCache() for _ in range(n_layers)])

    @property
    def length(self) -> int:
        """Number of positions cached (including left padding)."""
        return self.layers[0].length if self.layers else 0

    def select(self, rows: Tensor) -> KVCache:
        """Keep only batch rows `rows` (e.g. drop finished sequences, reorder beams)."""
        return KVCache(
            [
                LayerCache(None if c.k is None else c.k[rows], None if c.v is None else c.v[rows])
                for c in self.layers
            ]
        )


# --------------------------------------------------------------------------------------------
# Masks for padded batches


def padding_mask_to_attention_mask(
    padding_mask: Tensor, q_len: int | None = None, causal: bool = True
) -> Tensor:
    """(B, T_k) with 1 = real token, 0 = padding  ->  (B, 1, T_q, T_k) boolean attention mask.

    The queries are the last `q_len` positions of the keys (prefill: q_len = T_k; one decode
    step: q_len = 1), so causality is aligned bottom-right. Works for left and right padding.
    """
    assert padding_mask.ndim == 2, f"padding mask must be (B, T), got {tuple(padding_mask.shape)}"
    B, T_k = padding_mask.shape
    q_len = T_k if q_len is None else q_len
    mask = padding_mask.bool()[:, None, None, :].expand(B, 1, q_len, T_k)  # (B, 1, T_q, T_k)
    if causal:
        mask = mask & causal_mask(q_len, T_k, padding_mask.device)
    return mask


def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> Tensor:
    """(T_q, T_k) boolean: query i (the (k_len - q_len + i)-th position) sees keys up to itself."""
    offset = k_len - q_len
    q = torch.arange(q_len, device=device)[:, None] + offset
    k = torch.arange(k_len, device=device)[None, :]
    return k <= q


def position_ids_from_padding(padding_mask: Tensor, past_length: int = 0) -> Tensor:
    """Positions that skip left padding: the first real token of every row is position 0.

    `padding_mask` covers past + new tokens (B, past_length + T); returns (B, T) for the new ones.
    """
    positions = padding_mask.long().cumsum(-1) - 1
    positions = positions.clamp(min=0)
    return positions[:, past_length:]


# --------------------------------------------------------------------------------------------
# Packed training batches without the masked blocks


@dataclass
class AttentionGroup:
    """Blocks of one padded size attended in one call: G blocks of Lq query slots each
    reading Lk = Lp + Lq key slots (the block's shared prefix, then its own tokens)."""

    queries: Tensor  # (G * Lq,) token index of each query slot (padding slots repeat one)
    keys: Tensor  # (G * Lk,) token index of each key slot
    mask: Tensor  # (G, 1, Lq, Lk) bool, True = may attend; no row is all False
    shape: tuple[int, int, int]  # (G, Lq, Lk)


@dataclass
class PackedLayout:
    """The attention of a right- or left-padded training batch with shared-prefix packing
    (`segment_ids`, `Sample.independent_turns`) as blocks, computed without the masked parts
    of the (T, T) mask: a row's shared prefix (segment 0) attends to itself causally; each
    exchange (a run of one nonzero segment id) to the whole prefix and causally to itself;
    a row without segments is one causal block. Exactly the keys the dense mask
    `(key segment == 0 or == query segment) & causal & key is real` lets each real query see,
    so the outputs at real positions are the dense attention's to float rounding.

    Token indices count along the flattened token axis of the attention's input: B * T of
    a padded (B, T, C) input, or the N real tokens of an unpadded (1, N, C) one (`tokens`).
    """

    groups: list[AttentionGroup]
    # (n,) for every token of the attention's input, its slot in the groups' concatenated
    # query slots (a padding token of a padded input: slot 0, an output nothing reads).
    inverse: Tensor
    # Unpadded: (N,) the flat (B * T) index of each real token, row by row; and
    # `restore` (B * T,) the real index of each position, N for padding (a zero row).
    tokens: Tensor | None = None
    restore: Tensor | None = None

    def unpad(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> (1, N, ...): the real tokens, row by row."""
        assert self.tokens is not None, "a padded layout"
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.tokens)[None]

    def pad(self, x: Tensor, shape: tuple[int, int]) -> Tensor:
        """(1, N, C) -> (B, T, C), zeros at the padding."""
        assert self.restore is not None, "a padded layout"
        flat = torch.cat([x[0], x.new_zeros(1, x.shape[-1])])  # (N + 1, C)
        return flat.index_select(0, self.restore).view(*shape, x.shape[-1])


def packed_layout(
    attention_mask: Tensor | None,
    segment_ids: Tensor | None,
    shape: tuple[int, int],
    unpad: bool,
    slack: float = 1.3,
) -> PackedLayout | None:
    """The `PackedLayout` of a batch (B, T) with its padding mask (1 = real; None: none) and
    segments (None: every row one causal sequence), or None where the batch is not of that
    shape (a row's real tokens not one span, a prefix token after an exchange, one segment id
    in two runs): the caller then uses the dense mask.

    unpad: index the real tokens only (the decoder runs on (1, N, C)); else B * T.
    slack: blocks go into one group while the longest is at most `slack` times the shortest
    (+ 4 tokens): fewer calls against less padding inside a group.
    """
    B, T = shape
    device = (attention_mask if attention_mask is not None else segment_ids).device  # type: ignore[union-attr]
    real = (
        torch.ones(B, T, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.detach().to("cpu").bool()
    )
    seg = (
        torch.zeros(B, T, dtype=torch.long)
        if segment_ids is None
        else segment_ids.detach().to("cpu").long()
    )
    counts = real.sum(1).tolist()
    first = real.int().argmax(1).tolist()
    blocks: list[tuple[int, int, int, int]] = []  # (query start, length, prefix start, length)
    offset = 0
    for r in range(B):
        n, a = counts[r], first[r]
        if n == 0:
            continue
        if not bool(real[r, a : a + n].all()):
            return None  # the real tokens of the row are not one span
        base = offset - a if unpad else r * T  # token index of the row's position p: base + p
        ids, lens = torch.unique_consecutive(seg[r, a : a + n], return_counts=True)
        pos, prefix, seen = a, 0, set()
        for i, (s, length) in enumerate(zip(ids.tolist(), lens.tolist(), strict=True)):
            if s == 0:
                if i != 0:
                    return None  # a prefix token after an exchange
                prefix = length
                blocks.append((base + pos, length, base + a, 0))
            else:
                if s in seen:
                    return None  # one exchange in two runs
                seen.add(s)
                blocks.append((base + pos, length, base + a, prefix))
            pos += length
        offset += n
    n_tokens = offset if unpad else B * T
    blocks.sort(key=lambda b: b[1])
    groups: list[AttentionGroup] = []
    inverse = torch.zeros(n_tokens, dtype=torch.long)
    slots = 0
    start = 0
    while start < len(blocks):
        end = start + 1
        limit = blocks[start][1] * slack + 4
        while end < len(blocks) and blocks[end][1] <= limit:
            end += 1
        q_start, q_len, p_start, p_len = torch.tensor(blocks[start:end], dtype=torch.long).unbind(1)
        G, Lq, Lp = end - start, int(q_len.max()), int(p_len.max())
        i = torch.arange(Lq)
        own = i[None] < q_len[:, None]  # (G, Lq) real query slots
        queries = torch.where(own, q_start[:, None] + i, q_start[:, None])  # pads repeat the first
        j = torch.arange(Lp)
        in_prefix = j[None] < p_len[:, None]  # (G, Lp)
        prefix_keys = torch.where(in_prefix, p_start[:, None] + j, q_start[:, None])
        keys = torch.cat([prefix_keys, queries], 1)  # (G, Lp + Lq)
        causal = (i[None, :] <= i[:, None])[None] & own[:, None, :]  # (G, Lq, Lq)
        mask = torch.cat([in_prefix[:, None, :].expand(G, Lq, Lp), causal], 2)[:, None]
        slot = slots + torch.arange(G * Lq).view(G, Lq)
        inverse[queries[own]] = slot[own]
        slots += G * Lq
        groups.append(AttentionGroup(queries.flatten().to(device), keys.flatten().to(device),
                                     mask.to(device), (G, Lq, Lp + Lq)))  # fmt: skip
        start = end
    layout = PackedLayout(groups, inverse.to(device))
    if unpad:
        flat = real.flatten()
        layout.tokens = flat.nonzero().flatten().to(device)
        restore = torch.full((B * T,), n_tokens, dtype=torch.long)
        restore[flat] = torch.arange(n_tokens)
        layout.restore = restore.to(device)
    return layout


# --------------------------------------------------------------------------------------------
# Attention


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads (Ainslie et al. 2023).

    n_kv_heads < n_heads shares each key/value head among n_heads // n_kv_heads query heads
    (n_kv_heads = 1 is multi-query attention). `kv_dim` sets the width of the sequence keys and
    values come from in cross-attention (defaults to `dim`). `out_name` names the output
    projection: "o_proj" (Llama) or "out_proj" (CLIP/SigLIP), so state dicts export by a key map.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        kv_dim: int | None = None,
        bias: bool = False,
        out_bias: bool | None = None,
        out_name: str = "o_proj",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if head_dim is None:
            assert dim % n_heads == 0, f"dim {dim} is not divisible by n_heads {n_heads}"
            head_dim = dim // n_heads
        assert n_heads % n_kv_heads == 0, (
            f"n_heads {n_heads} not a multiple of n_kv_heads {n_kv_heads}"
        )
        assert out_name in ("o_proj", "out_proj"), out_name
        kv_dim = kv_dim or dim
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.dropout = dropout
        self.out_name = out_name
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, n_kv_heads * head_dim, bias=bias)
        out_bias = bias if out_bias is None else out_bias
        setattr(self, out_name, nn.Linear(n_heads * head_dim, dim, bias=out_bias))

    @property
    def out(self) -> nn.Linear:
        return getattr(self, self.out_name)

    def _heads(self, x: Tensor, name: str, n: int, expert: Expert | None = None) -> Tensor:
        """Projection `name` of x (B, T, C) split into n heads (B, n, T, hd)."""
        B, T, _ = x.shape
        proj = getattr(self, name)
        y = proj(x) if expert is None else expert.linear(name, proj, x)
        return y.view(B, T, n, self.head_dim).transpose(1, 2)

    def context_heads(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """The keys and values of a cross-attention context (B, S, kv_dim), each
        (B, H_kv, S, hd): computed once and passed as `context_kv` when the same context is
        read again (every decoding step reads the same images)."""
        return self._heads(context, "k_proj", self.n_kv_heads), self._heads(
            context, "v_proj", self.n_kv_heads
        )

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: LayerCache | None = None,
        context_kv: tuple[Tensor, Tensor] | None = None,
        expert: Expert | None = None,
        packed: PackedLayout | None = None,
    ) -> Tensor:
        """x (B, T, dim) -> (B, T, dim).

        context: (B, S, kv_dim) for cross-attention; keys/values come from it (no rotary,
            no causality between the two sequences).
        mask: boolean, True = attend, broadcastable to (B, n_heads, T_q, T_k).
        causal: each query sees keys up to its own position (aligned to the end when a cache
            holds earlier positions).
        rope: (cos, sin) from `RotaryEmbedding` for the positions of x.
        cache: this layer's `LayerCache`; the new keys/values are appended to it in place.
        context_kv: `context_heads(context)`, computed earlier: used instead of projecting
            `context` again.
        expert: self-attention only: the positions `expert.mask` marks are projected by the
            expert's q/k/v/o where it has them (CogVLM's visual expert, `visto.nn.experts`).
        packed: a training batch's `PackedLayout` (its causality, padding and segments):
            only the blocks it names are computed, instead of a mask.
        """
        assert x.ndim == 3, f"attention input must be (B, T, C), got {tuple(x.shape)}"
        if packed is not None:
            assert context is None and context_kv is None and cache is None and mask is None, (
                "a packed layout is self-attention over a whole training batch"
            )
            return self._packed(x, packed, rope, expert)
        B, T, _ = x.shape
        q = self._heads(x, "q_proj", self.n_heads, expert)  # (B, H, T, hd)
        cross = context is not None or context_kv is not None  # no rotary, no causality
        assert not (cross and expert is not None), (
            "an expert routes self-attention projections only"
        )
        if context_kv is None and expert is not None:
            context_kv = (
                self._heads(x, "k_proj", self.n_kv_heads, expert),
                self._heads(x, "v_proj", self.n_kv_heads, expert),
            )
        if context_kv is None:
            context_kv = self.context_heads(x if context is None else context)
        k, v = context_kv  # (B, H_kv, S, hd)
        if rope is not None and not cross:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H_kv, T_past + T, hd)

        is_causal = False
        if causal and not cross:
            if mask is None and k.shape[2] == T:
                is_causal = True  # let SDPA pick its fast causal path
            else:
                cm = causal_mask(T, k.shape[2], x.device)
                mask = cm if mask is None else (mask & cm)
        if mask is not None:
            mask = mask.bool()
            # A query that may attend to nothing (a padding position) would give NaN; let it
            # attend everywhere instead: its output is ignored by the loss and by generation.
            mask = mask | ~mask.any(dim=-1, keepdim=True)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H * hd)
        return self.out(y) if expert is None else expert.linear(self.out_name, self.out, y)

    def _packed(
        self, x: Tensor, layout: PackedLayout, rope: tuple[Tensor, Tensor] | None,
        expert: Expert | None,
    ) -> Tensor:  # fmt: skip
        """Self-attention over the blocks of `layout` (see `PackedLayout`): x (B, T, dim),
        B * T tokens (or (1, N, dim), the real ones) -> (B, T, dim)."""
        B, T, _ = x.shape
        H, H_kv, hd = self.n_heads, self.n_kv_heads, self.head_dim

        def proj(name: str, n: int) -> Tensor:  # (B, T, n, hd)
            module = getattr(self, name)
            y = module(x) if expert is None else expert.linear(name, module, x)
            return y.view(B, T, n, hd)

        q, k, v = proj("q_proj", H), proj("k_proj", H_kv), proj("v_proj", H_kv)
        if rope is not None:
            cos, sin = rope[0][:, :, None], rope[1][:, :, None]  # (B, T, 1, hd)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        q, k, v = q.reshape(B * T, H, hd), k.reshape(B * T, H_kv, hd), v.reshape(B * T, H_kv, hd)
        outs = []
        for g in layout.groups:
            G, Lq, Lk = g.shape
            y = F.scaled_dot_product_attention(
                q.index_select(0, g.queries).view(G, Lq, H, hd).transpose(1, 2),
                k.index_select(0, g.keys).view(G, Lk, H_kv, hd).transpose(1, 2),
                v.index_select(0, g.keys).view(G, Lk, H_kv, hd).transpose(1, 2),
                attn_mask=g.mask,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=H_kv != H,
            )  # (G, H, Lq, hd)
            outs.append(y.transpose(1, 2).reshape(G * Lq, H * hd))
        y = torch.cat(outs).index_select(0, layout.inverse).view(B, T, H * hd)
        return self.out(y) if expert is None else expert.linear(self.out_name, self.out, y)
