"""The generation engine on a tiny DecoderLM and a real byte-level BPE trained here."""

from __future__ import annotations

import pytest
import torch

from visto.data.tokenizer import train_tokenizer
from visto.errors import UserError
from visto.infer import Engine, PromptBatch, SamplingParams
from visto.nn.language import DecoderConfig, DecoderLM

WORDS = ["red", "blue", "green", "square", "circle", "triangle", "left", "right", "of", "the"]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls on 2 busy cores: OpenMP hand-offs cost more than the work (30x here).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [
        f"the {WORDS[i % 3]} {WORDS[3 + i % 3]} is {WORDS[6 + i % 2]} of the {WORDS[(i * 7) % 10]}"
        for i in range(300)
    ]
    return train_tokenizer(texts, vocab_size=340, loc_bins=4)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    lm = DecoderLM(DecoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size)).eval()
    with torch.no_grad():  # larger weights than the init: peaked, context-dependent logits
        for p in lm.parameters():
            p.normal_(0.0, 0.25)
    return lm


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    return Engine(model, tokenizer, eos_token_ids=[])  # no eos: runs reach max_new_tokens


PROMPTS = ["the", "the red square is left", "blue circle right of the green triangle is"]


def test_cached_decoding_matches_uncached_at_every_step(model, tokenizer):
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    batch = PromptBatch.left_padded(prompts, pad_id=0)
    logits, state = model.prefill(batch)
    ids, mask = batch.input_ids, batch.attention_mask
    for _ in range(8):
        with torch.no_grad():
            full, _ = model(ids, attention_mask=mask)  # the whole sequence, no cache
        torch.testing.assert_close(logits, full[:, -1], atol=1e-5, rtol=0)
        nxt = logits.argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
        logits, state = model.decode_step(nxt, state)


def test_batch_gives_the_same_greedy_tokens_as_one_by_one(engine):
    # Different lengths, and different max_new_tokens so rows finish (and leave) at different steps.
    params = [SamplingParams(max_new_tokens=n) for n in (12, 4, 9)]
    batched = engine.generate(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, batched, strict=True):
        [alone] = engine.generate([prompt], p)
        assert out.token_ids == alone.token_ids
        assert out.text == alone.text
        assert len(out.token_ids) == p.max_new_tokens and out.finish_reason == "length"
    assert len(set(tuple(o.token_ids[:4]) for o in batched)) > 1, "outputs should depend on prompts"


def test_max_tokens_and_stop_token_ids(engine, tokenizer):
    [free] = engine.generate(["the red"], SamplingParams(max_new_tokens=10))
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    assert free.text == tokenizer.decode(free.token_ids)
    assert free.timing.ttft_s > 0 and free.timing.decode_tokens == 9
    assert free.timing.decode_tokens_per_s > 0
    stop_id = free.token_ids[3]
    first = free.token_ids.index(stop_id)
    [out] = engine.generate(
        ["the red"], SamplingParams(max_new_tokens=10, stop_token_ids=[stop_id])
    )
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[: first + 1]  # the stop token is reported ...
    assert out.text == tokenizer.decode(free.token_ids[:first])  # ... but not part of the text
    # The engine's own eos ids (here taken from visto's tokenizer) apply to every request.
    eos_engine = Engine(engine.model, tokenizer, eos_token_ids=[stop_id])
    assert (
        eos_engine.generate(["the red"], SamplingParams(max_new_tokens=10))[0].token_ids
        == out.token_ids
    )


def _two_token_stop(tokenizer, ids: list[int]) -> tuple[str, int]:
    """A 2-character stop string made of the last char of token k and the first of token k+1."""
    for k in range(len(ids) - 1):
        a, b = tokenizer.decode([ids[k]]), tokenizer.decode([ids[k + 1]])
        if a and b and "\ufffd" not in a + b:
            stop = a[-1] + b[0]
            if stop not in tokenizer.decode(ids[: k + 1]):  # first seen across the boundary
                return stop, k
    raise AssertionError("no usable token pair in the greedy output")


def test_stop_string_spanning_two_tokens_is_trimmed(engine, tokenizer):
    p = SamplingParams(max_new_tokens=16)
    [free] = engine.generate(["the red"], p)
    stop, k = _two_token_stop(tokenizer, free.token_ids)
    params = SamplingParams(max_new_tokens=16, stop=[stop, "never-appears"])
    [out] = engine.generate(["the red"], params)
    full = tokenizer.decode(free.token_ids)
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)]
    assert out.token_ids == free.token_ids[: k + 2]  # ended on the token that completed it
    # Streaming must not leak the first half of the stop string before it is complete.
    stream = engine.stream("the red", params)
    pieces = list(stream)
    assert "".join(pieces) == out.text == stream.completion.text


def test_top_k_1_equals_greedy(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8))
    for seed in (1, 2):
        sampled = engine.generate(
            PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, seed=seed)
        )
        assert [o.token_ids for o in sampled] == [o.token_ids for o in greedy]


def test_seeded_sampling_is_reproducible_and_batch_invariant(engine):
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    [a] = engine.generate([PROMPTS[1]], p)
    [b] = engine.generate([PROMPTS[1]], p)
    assert a.token_ids == b.token_ids
    others = [SamplingParams(max_new_tokens=5, temperature=1.3, seed=s) for s in (1, 2)]
    batched = engine.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [others[0], p, others[1]])
    assert batched[1].token_ids == a.token_ids
    [c] = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=12, temperature=1.0, seed=8))
    assert c.token_ids != a.token_ids


def test_logits_processor_forces_tokens_and_streaming_never_splits_a_character(model):
    # A tokenizer that has never seen non-ASCII text: every accented letter, CJK character and
    # emoji is split into single-byte tokens, so partial UTF-8 sequences appear mid-stream.
    tok = train_tokenizer(["hello world " * 3] * 50, vocab_size=300, loc_bins=1)
    target = "héllo 世界 🎉!"
    script = tok.encode(target)
    assert len(script) > len(target)  # multi-byte characters really span several tokens
    calls = []

    def force(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        calls.append(list(generated))
        forced = torch.full_like(logits, float("-inf"))
        forced[script[len(generated)]] = 0.0
        return forced

    engine = Engine(model, tok, eos_token_ids=[])
    params = SamplingParams(
        max_new_tokens=len(script), temperature=0.7, seed=0, logits_processor=force
    )
    stream = engine.stream("hello", params)
    pieces = list(stream)
    assert "".join(pieces) == target == stream.completion.text
    assert all("\ufffd" not in piece for piece in pieces)
    assert len(pieces) > 3  # it did stream, piece by piece
    assert calls == [script[:i] for i in range(len(script))]


def test_streamed_sampling_concatenates_to_the_completion(engine):
    for seed in range(3):
        stream = engine.stream(
            PROMPTS[2], SamplingParams(max_new_tokens=15, temperature=1.2, seed=seed)
        )
        pieces = list(stream)
        assert "".join(pieces) == stream.completion.text
        assert stream.completion.token_ids  # something was generated


def test_bad_settings_are_user_errors(engine):
    for bad in (
        dict(max_new_tokens=0),
        dict(temperature=-1),
        dict(top_p=0.0),
        dict(top_k=-2),
        dict(repetition_penalty=0),
        dict(stop=[""]),
    ):
        with pytest.raises(UserError):
            SamplingParams(**bad)
    with pytest.raises(UserError, match="empty"):
        engine.generate([""])
    with pytest.raises(UserError, match="2 sampling settings"):
        engine.generate(["a"], [SamplingParams(), SamplingParams()])
