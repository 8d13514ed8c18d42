"""Continuous batching: requests that join or leave a running generation change nobody's tokens;
and the engine's fast path (runner.py) computes what the model's own decode does."""

from __future__ import annotations

import pytest
import torch

from test_engine import PROMPTS, one_thread, tokenizer  # noqa: F401 (fixtures)
from visto.errors import UserError
from visto.infer import Engine, PromptBatch, SamplingParams
from visto.infer.continuous import ContinuousBatch
from visto.nn.language import DecoderConfig, DecoderLM


@pytest.fixture(scope="module")
def model(tokenizer):  # noqa: F811
    torch.manual_seed(1)
    lm = DecoderLM(DecoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size)).eval()
    with torch.no_grad():  # peaked, context-dependent logits
        for p in lm.parameters():
            p.normal_(0.0, 0.25)
    return lm


@pytest.fixture(scope="module")
def engine(model, tokenizer):  # noqa: F811
    return Engine(model, tokenizer, eos_token_ids=[])


def _batch(engine, prompts):
    return PromptBatch.left_padded([engine.tokenizer.encode(p) for p in prompts], pad_id=0)


def _run(batch: ContinuousBatch, joins: dict[int, tuple]) -> dict[str, list]:
    """Step until idle; at step k add joins[k] = (engine-batch, params, name)."""
    requests, step = {}, 0
    while batch.busy or any(k >= step for k in joins):
        if step in joins:
            prompt_batch, params, names = joins[step]
            for name, r in zip(names, batch.add(prompt_batch, params), strict=True):
                requests[name] = r
        batch.step()
        step += 1
    return requests


def test_fast_path_matches_the_models_own_decode(model, tokenizer):  # noqa: F811
    fast, slow = Engine(model, tokenizer, eos_token_ids=[]), Engine(
        model, tokenizer, eos_token_ids=[], fast=False
    )
    assert fast.can_join and not slow.can_join
    params = [SamplingParams(max_new_tokens=n) for n in (14, 5, 9)]
    assert [c.token_ids for c in fast.generate(PROMPTS, params)] == [
        c.token_ids for c in slow.generate(PROMPTS, params)
    ]
    # Logits too, step by step, with padding and rows leaving.
    batch = _batch(fast, PROMPTS)
    a, sa = fast.prefill(batch, room=4)
    b, sb = model.prefill(batch)
    for step in range(8):  # 8 > room: the cache grows
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        ids = a.argmax(-1)
        if step == 3:  # row 0 leaves
            keep = torch.tensor([1, 2])
            sa, sb, ids = sa.select(keep), sb.select(keep), ids[keep]
        a, sa = fast.decode_step(ids, sa)
        b, sb = model.decode_step(ids, sb)


def test_a_request_joining_mid_generation_gets_its_solo_tokens(engine):
    params = [SamplingParams(max_new_tokens=n) for n in (16, 12, 10)]
    alone = [engine.generate([p], [q])[0].token_ids for p, q in zip(PROMPTS, params, strict=True)]
    batch = ContinuousBatch(engine)
    # The short prompt starts; the longest prompt joins at step 3 (its cache is wider than the
    # running one), the middle one at step 6; the first finishes while the others run.
    done = _run(batch, {
        0: (_batch(engine, PROMPTS[:1]), params[:1], ["a"]),
        3: (_batch(engine, PROMPTS[2:]), params[2:], ["c"]),
        6: (_batch(engine, PROMPTS[1:2]), params[1:2], ["b"]),
    })  # fmt: skip
    got = [done[k].completion.token_ids for k in "abc"]
    assert got == alone
    assert all(done[k].completion.finish_reason == "length" for k in "abc")
    assert not batch.busy and batch.state is None


def test_seeded_sampling_and_stop_strings_survive_joining(engine, tokenizer):  # noqa: F811
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    [alone] = engine.generate([PROMPTS[1]], sampled)
    free = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=10))[0]
    text = tokenizer.decode(free.token_ids)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = SamplingParams(max_new_tokens=10, stop=[stop])
    [alone_stop] = engine.generate([PROMPTS[0]], stopped)
    batch = ContinuousBatch(engine)
    done = _run(batch, {
        0: (_batch(engine, PROMPTS[2:]), [SamplingParams(max_new_tokens=15)], ["x"]),
        2: (_batch(engine, PROMPTS[1:2]), [sampled], ["s"]),
        4: (_batch(engine, PROMPTS[:1]), [stopped], ["t"]),
    })  # fmt: skip
    assert done["s"].completion.token_ids == alone.token_ids
    assert done["t"].completion.text == alone_stop.text
    assert done["t"].completion.finish_reason == alone_stop.finish_reason == "stop"


def test_cancelling_one_row_leaves_the_others_unchanged(engine):
    params = [SamplingParams(max_new_tokens=12) for _ in PROMPTS]
    alone = [c.token_ids for c in engine.generate(PROMPTS, params)]
    batch = ContinuousBatch(engine)
    requests = batch.add(_batch(engine, PROMPTS), params)
    streamed = {id(r): "" for r in requests}
    for step in range(20):
        if step == 4:
            requests[1].cancel()
        pieces, _ = batch.step()
        for r, piece in pieces:
            streamed[id(r)] += piece
        if not batch.busy:
            break
    cancelled = requests[1].completion
    assert cancelled.finish_reason == "cancelled" and len(cancelled.token_ids) == 4
    assert cancelled.token_ids == alone[1][:4]
    for i in (0, 2):
        assert requests[i].completion.token_ids == alone[i]
        assert streamed[id(requests[i])] == requests[i].completion.text
    # A request cancelled before it ever ran costs nothing and finishes at the next step.
    [late] = batch.add(_batch(engine, PROMPTS[:1]), params[:1])
    late.cancel()
    _, done = batch.step()
    assert done == [late] and late.completion.token_ids == [] and not batch.busy


def test_continuous_batching_needs_the_fast_path(model, tokenizer):  # noqa: F811
    with pytest.raises(UserError, match="DecoderLM"):
        ContinuousBatch(Engine(model, tokenizer, fast=False))


def test_lora_adapters_keep_the_models_own_decode(model, tokenizer):  # noqa: F811
    import copy

    import peft  # noqa: F401  (a hard dependency: fail, do not skip)

    from visto.nn.lora import LoraConfig, apply_lora

    adapted = copy.deepcopy(model)
    apply_lora(adapted, LoraConfig(rank=2, alpha=4, targets=["q_proj", "v_proj"], modules=["model"]))
    with torch.no_grad():  # a non-zero adapter, so dropping it would change the tokens
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    engine = Engine(adapted, tokenizer, eos_token_ids=[])
    assert engine.runner is None and not engine.can_join
    slow = Engine(adapted, tokenizer, eos_token_ids=[], fast=False)
    params = SamplingParams(max_new_tokens=8)
    assert engine.generate(PROMPTS, params)[0].token_ids == slow.generate(PROMPTS, params)[0].token_ids
