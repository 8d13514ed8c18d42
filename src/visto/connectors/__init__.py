"""Connectors: what turns vision features into something a language model reads.

`projector` (linear, MLP, pixel shuffle) is here; resamplers, Q-Formers and gated
cross-attention join as their families land.
"""

from visto.connectors.projector import ProjectorConfig, build_projector, pixel_shuffle

__all__ = ["ProjectorConfig", "build_projector", "pixel_shuffle"]
