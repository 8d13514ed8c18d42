"""Inference: the generation engine (KV cache, batching, sampling, streaming)."""

from visto.infer.continuous import ContinuousBatch, Request
from visto.infer.engine import Completion, Engine, Generation, PromptBatch, TextStream, Timing
from visto.infer.sampling import SamplingParams

__all__ = [
    "Completion",
    "ContinuousBatch",
    "Engine",
    "Generation",
    "PromptBatch",
    "Request",
    "SamplingParams",
    "TextStream",
    "Timing",
]
