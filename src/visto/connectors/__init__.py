"""Connectors: what turns vision features into something a language model reads.

`projector` (linear, MLP, pixel shuffle) is here; resamplers, Q-Formers and gated
cross-attention join as their families land.
"""

from visto.connectors.projector import ProjectorConfig, build_projector, pixel_shuffle
from visto.connectors.resampler import PerceiverResampler, ResamplerConfig
from visto.connectors.xattn import GatedCrossAttentionBlock, media_mask

__all__ = [
    "GatedCrossAttentionBlock",
    "PerceiverResampler",
    "ProjectorConfig",
    "ResamplerConfig",
    "build_projector",
    "media_mask",
    "pixel_shuffle",
]
