"""Sampling maths: repetition penalty by hand, filters against an independent reference."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from visto.infer.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    sample_token,
)


def test_repetition_penalty_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    seen = torch.tensor([0, 1, 1])  # repeats count once
    out = apply_repetition_penalty(logits, seen, 2.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -2.0, 0.5, 3.0]))
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0]))  # input untouched
    # Penalised in the draw too: greedy picks token 3 either way, but with token 3 seen and a
    # strong penalty it drops below token 0.
    p = SamplingParams(repetition_penalty=4.0)
    assert sample_token(logits, p, None, torch.tensor([3]), []) == 0
    assert sample_token(logits, SamplingParams(), None, torch.tensor([3]), []) == 3


def test_filters_by_hand():
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0])
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [True, False, False, True]
    # probs ~ [0.032, 0.644, 0.237, 0.087]: 0.5 needs only the top token, 0.8 needs two.
    assert torch.isfinite(filter_top_p(logits, 0.5)).tolist() == [False, True, False, False]
    assert torch.isfinite(filter_top_p(logits, 0.8)).tolist() == [False, True, True, False]


def _reference_support(logits: torch.Tensor, temperature: float, k: int, p: float) -> set[int]:
    """The tokens a top-k-then-top-p sampler may return, computed the plain way."""
    order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))
    if k > 0:
        order = order[:k]
    probs = torch.softmax(logits[order] / temperature, dim=0).tolist()
    kept, total = [], 0.0
    for i, prob in zip(order, probs, strict=True):
        kept.append(i)
        total += prob
        if total >= p + 1e-6:  # float slack on the side of a larger set
            break
    return set(kept)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(2, 40),
    temperature=st.floats(0.2, 3.0),
    k=st.integers(0, 12),
    p=st.floats(0.05, 1.0),
)
def test_sampled_tokens_stay_in_the_filtered_support(seed, vocab, temperature, k, p):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=g) * 3
    params = SamplingParams(temperature=temperature, top_k=k, top_p=p, seed=seed)
    support = _reference_support(logits, temperature, k, p)
    draws = {
        sample_token(logits, params, g, torch.tensor([], dtype=torch.long), []) for _ in range(30)
    }
    assert draws <= support
    # Same generator state, same draw: reproducible with a seed.
    a = sample_token(
        logits, params, torch.Generator().manual_seed(seed), torch.tensor([], dtype=torch.long), []
    )
    b = sample_token(
        logits, params, torch.Generator().manual_seed(seed), torch.tensor([], dtype=torch.long), []
    )
    assert a == b
