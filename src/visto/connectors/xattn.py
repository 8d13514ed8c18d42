"""Gated cross-attention dense blocks (Alayrac et al. 2022, "Flamingo", Sec. 2.2 and Fig. 4),
run between the layers of a frozen `DecoderLM`.

    x  (B, T, C) text hidden states entering decoder layer i (every k-th layer)
    x += tanh(alpha_cross_attn) * mask_no_media(cross_attn(RMSNorm(x), visual tokens))
    x += tanh(alpha_dense)      * SwiGLU(RMSNorm(x))
    -> decoder layer i, unchanged and frozen

Both alphas start at 0, so a freshly built model *is* the pretrained language model, exactly:
tanh(0) = 0 and x + 0 * y == x bit for bit. Training opens the gates gradually, which is what
kept Flamingo's frozen LM from being disrupted at the start (paper Sec. 2.2, Fig. 6).

Which visual tokens a text token may read is the media mask (`media_mask`): token t reads only
the image whose `<image>` marker is the last one at or before t (paper Sec. 2.3, "per-image
attention"); tokens before the first image read nothing, and their cross-attention output is
zeroed, as in transformers' Idefics. The feed-forward part applies to every token.

The decoder is not copied or subclassed: Flamingo passes its blocks to the decoder's layer
loop as an argument (`Conditioning(before_layer={i: block reading media})`, visto.nn.language),
so the same `DecoderLM` called without it is the plain language model, and its own forward,
KV cache, prefill and decode_step (and the engine's fast path) do the rest.
Parameter and module names follow transformers' `IdeficsGatedCrossAttentionLayer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from visto.nn.attention import Attention
from visto.nn.transformer import RMSNorm, SwiGLU

GATE_SHAPES = ("float", "vector")  # one scalar per gate, or one per channel (Idefics' alpha_type)


@dataclass
class Media:
    """What the gated blocks read during one forward call of the decoder."""

    tokens: Tensor  # (B, S, D_v): every image's visual tokens in the row, image after image
    mask: Tensor  # (B, 1, T, S) bool: text position t may read visual token s
    has_media: Tensor  # (B, T) bool: an image precedes t (others get no cross-attention output)
    # Each gated block's keys and values of `tokens` (block index -> (k, v)) when computed
    # beforehand: decoding steps reuse those of the prefill instead of projecting the images
    # again. A block missing here projects `tokens` itself.
    kv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)


def media_mask(media_index: Tensor, tokens_per_image: int, num_images: int) -> tuple[Tensor, Tensor]:
    """Per-image attention: (mask (B, 1, T, M*n), has_media (B, T)).

    media_index: (B, T) 1-based index (within its row) of the last image at or before each
        text position, 0 before the first (`cumsum(input_ids == <image>)`).
    """
    assert media_index.ndim == 2, f"media_index must be (B, T), got {tuple(media_index.shape)}"
    key_image = torch.arange(1, num_images + 1, device=media_index.device)  # (M,)
    key_image = key_image.repeat_interleave(tokens_per_image)  # (M*n,) image of each key
    mask = media_index[:, None, :, None] == key_image  # (B, 1, T, M*n)
    return mask, media_index > 0


class GatedCrossAttentionBlock(nn.Module):
    """Tanh-gated cross-attention to the visual tokens, then a tanh-gated feed-forward."""

    def __init__(
        self,
        dim: int,
        kv_dim: int,
        n_heads: int,
        mlp_hidden: int,
        eps: float = 1e-6,
        gate: str = "float",
    ) -> None:
        super().__init__()
        assert gate in GATE_SHAPES, f"gate must be one of {GATE_SHAPES}, got {gate!r}"
        self.input_layernorm = RMSNorm(dim, eps=eps)
        self.cross_attn = Attention(dim, n_heads, kv_dim=kv_dim, bias=False)
        self.post_attention_layernorm = RMSNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, mlp_hidden)
        shape = (1,) if gate == "float" else (1, 1, dim)
        self.alpha_cross_attn = nn.Parameter(torch.zeros(shape))  # tanh(0) = 0: gate closed
        self.alpha_dense = nn.Parameter(torch.zeros(shape))
        for module in (self.cross_attn, self.mlp):
            for linear in module.modules():
                if isinstance(linear, nn.Linear):
                    nn.init.normal_(linear.weight, std=0.02)

    def forward(self, x: Tensor, media: Media, index: int | None = None) -> Tensor:
        """x (B, T, C) -> (B, T, C); `index` finds this block's keys/values in `media.kv`."""
        assert media.mask.shape[-2] == x.shape[1], (
            f"media mask covers {media.mask.shape[-2]} text positions, x has {x.shape[1]}"
        )
        kv = media.kv.get(index) if index is not None else None
        if kv is None:
            kv = self.visual_kv(media.tokens.to(x.dtype))
        attended = self.cross_attn(
            self.input_layernorm(x), context_kv=kv, mask=media.mask
        )  # (B, T, C)
        # Positions with no image before them attend to nothing: their output is zero.
        attended = attended.masked_fill(~media.has_media[..., None], 0.0)
        x = x + torch.tanh(self.alpha_cross_attn) * attended
        return x + torch.tanh(self.alpha_dense) * self.mlp(self.post_attention_layernorm(x))

    def visual_kv(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """The keys and values this block reads from visual tokens (B, S, D_v), each
        (B, H, S, hd)."""
        return self.cross_attn.context_heads(tokens)

    def hf_key_map(self) -> dict[str, str]:
        """Our key -> transformers' `IdeficsGatedCrossAttentionLayer` key (the same names)."""
        return {k: k for k in self.state_dict()}


def num_gated_blocks(num_layers: int, every: int) -> int:
    """Blocks before layers 0, every, 2*every, ... (transformers' Idefics places them alike)."""
    return len(range(0, num_layers, every))


__all__ = [
    "GATE_SHAPES",
    "GatedCrossAttentionBlock",
    "Media",
    "media_mask",
    "num_gated_blocks",
]
