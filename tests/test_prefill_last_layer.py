"""The engine's prefill runs the decoder's last layer on the last position only (issue 19):
a LLaVA reading images gives the same greedy tokens and first logits as the model's own
prefill/decode, alone and in a left-padded batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from test_llava import tiny, tokenizer_dir  # noqa: F401 (fixture)
from visto.data.sample import Sample, Turn
from visto.infer import Engine, SamplingParams

QUESTIONS = ["what is in the image?", "red", "is the blue square left of the circle"]


@pytest.fixture(scope="module")
def model(tokenizer_dir):  # noqa: F811
    torch.manual_seed(0)
    llava = tiny(tokenizer_dir).eval()
    with torch.no_grad():  # peaked logits: greedy choices far from ties
        for p in llava.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    return llava


def _samples(n: int) -> list[Sample]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]
    return [
        Sample(f"q{i}", [images[i]], [Turn("user", "<image>\n" + QUESTIONS[i % len(QUESTIONS)])])
        for i in range(n)
    ]


@pytest.mark.parametrize("n", [1, 3])
def test_first_logits_and_tokens_equal_the_models_own_path(model, n):
    tokenizer = model.processor.tokenizer
    fast = Engine(model, tokenizer, eos_token_ids=[])
    slow = Engine(model, tokenizer, eos_token_ids=[], fast=False)
    assert fast.runner is not None and slow.runner is None
    batch = model.prompt_batch(_samples(n))
    assert n == 1 or not bool(batch.attention_mask.bool().all())  # left padding in the batch
    ours, _ = fast.prefill(batch, room=8)
    theirs, _ = model.prefill(batch)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    params = SamplingParams(max_new_tokens=12)
    got = [c.token_ids for c in fast.generate_batch(batch, params)]
    assert got == [c.token_ids for c in slow.generate_batch(batch, params)]
    assert all(len(t) == 12 for t in got)
