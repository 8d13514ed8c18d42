"""A tool call that does not fit max_tokens, in tool_choice "auto", over real HTTP with the
openai SDK: at every budget short of the whole call the answer ends with finish_reason
"length" and no tool-call markup in its content (whole or streamed), never a dangling
`<tool_call...` (the budget cut it, or the grammar ended the answer mid-`<tool_call>` because
the call could not close in what was left); at the call's own length it comes back whole in
`tool_calls`.

The model is a tiny LLaVA wired to begin a call: its blocks add nothing (so the last hidden
state is the last token's embedding) and an untied head maps `<|assistant|>` -> `<` -> `tool`
-> `_` -> `call` -> `>`, a chain of distinct tokens, after which the grammar (tools.py) decodes
the call's JSON under the tool's schema."""

from __future__ import annotations

import dataclasses
import json

import openai
import pytest
import torch

from test_serve_support import corpus, running
from visto.cli import build_parser
from visto.commands.serve import build_app
from visto.data.tool_calls import TOOL_CALL_START

pytestmark = pytest.mark.timeout(300)

PAINT = {"type": "function", "function": {
    "name": "paint", "description": "Paint the square",
    "parameters": {"type": "object", "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "glossy": {"type": "boolean"}, "label": {"type": "string", "maxLength": 4}},
        "required": ["colour", "glossy", "label"], "additionalProperties": False},
    "strict": True,  # so that the SDK's parse() takes it
}}  # fmt: skip
ASK = dict(model="caller", messages=[{"role": "user", "content": "Paint the square red."}],
           tools=[PAINT], tool_choice="auto", parallel_tool_calls=False, temperature=0)  # fmt: skip


def make_caller_checkpoint(path):
    from visto.checkpoint import save_checkpoint
    from visto.data.processor import Processor
    from visto.data.special_tokens import ROLE_TOKENS
    from visto.data.tokenizer import train_tokenizer
    from visto.models import build_model
    from visto.models.llava import LlavaConfig

    config = LlavaConfig.preset("tiny")
    decoder = dataclasses.replace(config.decoder, max_position_embeddings=2048,
                                  tie_word_embeddings=False)  # fmt: skip
    config = dataclasses.replace(config, decoder=decoder)
    texts = [*corpus(), *[f"{TOOL_CALL_START} tool call tool_call {i}" for i in range(100)]]
    tokenizer = train_tokenizer(texts, vocab_size=config.processor.vocab_size,
                                loc_bins=config.processor.loc_bins)  # fmt: skip
    model = build_model("llava", config, seed=0)
    model.processor = Processor(config.processor, tokenizer)
    chain = [tokenizer.token_to_id(ROLE_TOKENS["assistant"]), *tokenizer.encode(TOOL_CALL_START)]
    assert len(set(chain)) == len(chain) == 6, [tokenizer.decode([i]) for i in chain]
    lm = model.language_model
    embed, head = lm.model.embed_tokens.weight, lm.lm_head.weight
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
        embed.copy_(0.02 * torch.randn(embed.shape, generator=g))
        head.copy_(0.02 * torch.randn(head.shape, generator=g))
        for token, following in zip(chain, chain[1:], strict=False):
            u = torch.randn(embed.shape[1], generator=g)
            u /= u.norm()
            embed[token] = 4 * u
            head[following] = u
    return save_checkpoint(model, path)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    ckpt = make_caller_checkpoint(tmp_path_factory.mktemp("budget") / "caller" / "checkpoint")
    app = build_app(build_parser().parse_args(["serve", "--model", str(ckpt)]))
    with running(app) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


def valid(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"colour", "glossy", "label"} and args["colour"] in ("red", "green", "blue")
    assert isinstance(args["glossy"], bool) and len(args["label"]) <= 4


def streamed(client, max_tokens: int) -> tuple[str, list, str]:
    content, calls, finish = "", [], None
    for chunk in client.chat.completions.create(**ASK, max_tokens=max_tokens, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    return content, calls, finish


def test_a_call_cut_by_max_tokens_never_leaks_as_content(client) -> None:
    whole = client.chat.completions.create(**ASK, max_tokens=200)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    assert call.function.name == "paint"
    valid(call.function.arguments)
    n = whole.usage.completion_tokens  # the call's tokens (its end-of-turn included)
    assert n > 10

    # With one token the grammar may end the answer before it writes any of the call (it
    # closes what it begins within the budget): nothing to drop then, and "stop" is true.
    one = client.chat.completions.create(**ASK, max_tokens=1).choices[0]
    assert (one.message.content, one.message.tool_calls) == ("", None)
    assert one.finish_reason in ("stop", "length")
    kinds = []
    for budget in range(2, n):
        reply = client.chat.completions.create(**ASK, max_tokens=budget)
        choice, content = reply.choices[0], reply.choices[0].message.content
        assert TOOL_CALL_START[:2] not in (content or ""), (budget, content)
        streamed_content, streamed_calls, streamed_finish = streamed(client, budget)
        assert streamed_finish == choice.finish_reason, budget
        if choice.finish_reason == "length":  # the call did not fit: dropped, whole and streamed
            assert (content, choice.message.tool_calls) == ("", None), budget
            assert (streamed_content, streamed_calls) == ("", []), budget
            # the SDK's parse() reads "length" as a cut answer, as it does for OpenAI's
            with pytest.raises(openai.LengthFinishReasonError):
                client.chat.completions.parse(**ASK, max_tokens=budget)
        else:  # or the grammar closed a shorter call within the budget: a whole, valid one
            assert choice.finish_reason == "tool_calls", (budget, choice)
            [call_b] = choice.message.tool_calls
            valid(call_b.function.arguments)
            assert reply.usage.completion_tokens <= budget
            assert streamed_calls[1].function.arguments == call_b.function.arguments
        kinds.append(choice.finish_reason)
    # small budgets cut (the call needs ~n tokens), and the largest ones close it in time
    assert kinds[:20] == ["length"] * 20 and "tool_calls" in kinds, kinds

    # at the call's own length: whole, parsed, the same call, streamed too
    for budget in (n, n + 5):
        reply = client.chat.completions.create(**ASK, max_tokens=budget)
        [again] = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls"
        assert again.function.arguments == call.function.arguments
    content, calls, finish = streamed(client, n)
    assert (content, finish) == ("", "tool_calls")
    assert calls[1].function.arguments == call.function.arguments
    parsed = client.chat.completions.parse(**ASK, max_tokens=n)
    assert parsed.choices[0].message.tool_calls[0].function.name == "paint"
