"""Choosing the next token from one row of logits: penalties, filters, and a seeded draw.

The order is the one transformers and vLLM use:

    logits -> repetition penalty -> logits_processor (constraints) -> temperature
           -> top-k -> top-p -> softmax -> draw (or argmax when temperature == 0)

Every function works on one request's logits (V,), so that each request in a batch keeps its
own settings and its own `torch.Generator`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from visto.errors import UserError

# (generated ids so far, logits (V,)) -> logits (V,); e.g. a JSON grammar masking bad tokens.
LogitsProcessor = Callable[[list[int], Tensor], Tensor]


@runtime_checkable
class Settles(Protocol):
    """A logits processor that also has the last word on the drawn token: `settle(generated,
    token, left)` returns the token to take, given that `left` tokens (this one included)
    remain of max_new_tokens. A JSON grammar replaces a draw after which the answer could no
    longer close in time (visto.infer.constrain)."""

    def __call__(self, generated: list[int], logits: Tensor) -> Tensor: ...

    def settle(self, generated: list[int], token: int, left: int) -> int: ...


@dataclass
class SamplingParams:
    """How one request is decoded. temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    repetition_penalty: float = 1.0  # 1 = none; > 1 discourages tokens already seen
    stop: Sequence[str] = ()  # stop strings, matched on decoded text and trimmed from it
    stop_token_ids: Sequence[int] = ()  # added to the engine's end-of-sequence ids
    seed: int | None = None  # None: a fresh random seed per request
    ignore_eos: bool = False  # the engine's eos ids neither end the request nor get chosen
    logits_processor: LogitsProcessor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise UserError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"
            )
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not s for s in self.stop):
            raise UserError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that edits logits: a whole batch of these is one argmax."""
        return self.greedy and self.repetition_penalty == 1.0 and self.logits_processor is None


def apply_repetition_penalty(logits: Tensor, seen_ids: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty (Keskar et al. 2019, sec. 4.1) as transformers applies it: every token in
    `seen_ids` (prompt and generated) has its logit divided by `penalty` if positive and
    multiplied by it if negative, so the penalty always lowers its probability."""
    if penalty == 1.0 or seen_ids.numel() == 0:
        return logits
    logits = logits.clone()
    seen = logits[seen_ids]
    logits[seen_ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k highest logits (ties at the k-th value kept too), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter (Holtzman et al. 2020): the smallest set of most likely tokens whose
    probability reaches p; the most likely token is always kept."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    # Drop a token when the tokens before it already reach p.
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(
    logits: Tensor, params: SamplingParams, seen_ids: Tensor, generated: list[int]
) -> Tensor:
    """Everything before the draw: penalty, constraints, temperature, top-k, top-p. (V,) -> (V,)"""
    assert logits.ndim == 1, f"one row of logits (V,) expected, got {tuple(logits.shape)}"
    logits = logits.float()
    logits = apply_repetition_penalty(logits, seen_ids, params.repetition_penalty)
    if params.logits_processor is not None:
        logits = params.logits_processor(generated, logits)
        assert logits.ndim == 1, "a logits_processor must return logits of shape (V,)"
    if params.greedy:
        return logits
    logits = logits / params.temperature
    logits = filter_top_k(logits, params.top_k)
    return filter_top_p(logits, params.top_p)


def sample_token(
    logits: Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    seen_ids: Tensor,
    generated: list[int],
) -> int:
    """The next token id for one request."""
    logits = process_logits(logits, params, seen_ids, generated)
    if params.greedy:
        token = int(logits.argmax())
    else:
        probs = logits.softmax(-1)
        if not torch.isfinite(probs).all() or probs.sum() <= 0:
            raise RuntimeError("every token was filtered out (check the logits_processor)")
        token = int(torch.multinomial(probs, 1, generator=generator))
    if isinstance(params.logits_processor, Settles):
        token = params.logits_processor.settle(
            generated, token, params.max_new_tokens - len(generated)
        )
    return token
