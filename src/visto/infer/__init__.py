"""Inference: the generation engine (KV cache, batching, sampling, streaming)."""

from visto.infer.engine import Completion, Engine, Generation, PromptBatch, TextStream, Timing
from visto.infer.sampling import SamplingParams

__all__ = [
    "Completion",
    "Engine",
    "Generation",
    "PromptBatch",
    "SamplingParams",
    "TextStream",
    "Timing",
]
