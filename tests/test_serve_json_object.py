"""`response_format: {"type": "json_object"}` is a JSON object at the root, as OpenAI promises
("the message the model generates is a valid JSON object"), over real HTTP with the openai SDK.

The model answers `[1,2]` to anything, greedily (test_serve_support's scripted bigram machine):
a JSON array, which xgrammar's built-in JSON grammar, json_object's before, let through at the
root. Under json_object its `[` is masked and the answer is an object that closes within
max_tokens, whole, streamed, beside tools (the grammar of an answer that may call,
serve/grammar.py) and in the last round of the server's tool loop (test_serve_tool_rounds)."""

from __future__ import annotations

import json

import openai
import pytest

from test_serve_support import data_url, make_scripted_llava_checkpoint, png_bytes, running
from test_serve_tool_budget import PAINT
from visto.cli import build_parser
from visto.commands.serve import build_app

pytestmark = pytest.mark.timeout(300)

ARRAY = "[1,2]"
OBJECT = {"type": "json_object"}
MESSAGES = [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
    {"type": "text", "text": "List the objects as JSON."},
]}]  # fmt: skip


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    path = tmp_path_factory.mktemp("json-object") / "tiny-llava" / "checkpoint"
    checkpoint = make_scripted_llava_checkpoint(path, ARRAY)
    app = build_app(build_parser().parse_args(["serve", "--model", str(checkpoint)]))
    with running(app) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, **kwargs):
    return client.chat.completions.create(model="tiny-llava", messages=MESSAGES, **kwargs)


def an_object(content: str | None) -> dict:
    assert content is not None
    value = json.loads(content)
    assert isinstance(value, dict), content
    return value


def test_the_model_answers_an_array(client) -> None:
    """The bias the other tests lean on: unconstrained, and under a schema that allows an
    array at the root, the answer is the array."""
    assert ask(client, max_tokens=20).choices[0].message.content == ARRAY
    items = {"type": "array", "items": {"type": "integer"}}
    reply = ask(client, max_tokens=20, response_format={
        "type": "json_schema", "json_schema": {"name": "numbers", "schema": items}})  # fmt: skip
    assert json.loads(reply.choices[0].message.content) == [1, 2]


@pytest.mark.parametrize("max_tokens", [3, 8, 40])
def test_json_object_answers_an_object_at_the_root(client, max_tokens) -> None:
    reply = ask(client, max_tokens=max_tokens, response_format=OBJECT)
    choice = reply.choices[0]
    an_object(choice.message.content)
    assert choice.finish_reason == "stop" and reply.usage.completion_tokens <= max_tokens
    content, finish = "", None
    for chunk in ask(client, max_tokens=max_tokens, response_format=OBJECT, stream=True):
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert (content, finish) == (choice.message.content, "stop")


def test_json_object_beside_tools_answers_an_object_or_calls(client) -> None:
    """With tools in "none" the answer is the response_format's alone; in "auto" the model may
    call instead (this one does: its `[` masked, `<` is the likeliest token left), its arguments
    under the tool's schema."""
    reply = ask(client, max_tokens=120, response_format=OBJECT, tools=[PAINT], tool_choice="none")
    an_object(reply.choices[0].message.content)
    reply = ask(client, max_tokens=120, response_format=OBJECT, tools=[PAINT], tool_choice="auto")
    message = reply.choices[0].message
    if message.tool_calls:
        assert [c.function.name for c in message.tool_calls] == ["paint"]
        json.loads(message.tool_calls[0].function.arguments)
    else:
        an_object(message.content)


def test_the_grammars_of_json_object_take_objects_only(client, tmp_path_factory) -> None:
    """The grammar of an answer under json_object alone (compile) and beside tools
    (compile_tool_calls, "auto" and the tool loop's last round): an object, compact or spaced
    (as xgrammar's JSON grammar allowed), never an array, a string or a number at the root."""
    import xgrammar as xgr

    from test_serve_support import corpus
    from visto.data.tokenizer import train_tokenizer
    from visto.serve.grammar import GrammarFactory, OpenEnded
    from visto.serve.tools import ToolPlan
    from visto.tools.loop import MAX_TOOL_ROUNDS

    tokenizer = train_tokenizer(corpus(), vocab_size=512, loc_bins=16)
    factory = GrammarFactory(tokenizer, tokenizer.vocab_size, [tokenizer.end_id])
    plan = ToolPlan([PAINT], {"paint": PAINT["function"]["parameters"]}, "auto", ("paint",),
                    True)  # fmt: skip
    grammars = {
        "alone": factory.compile(OBJECT),
        "auto": factory.compile_tool_calls(plan, OBJECT),
        "final": factory.compile_tool_calls(plan.after_tool_round(MAX_TOOL_ROUNDS), OBJECT),
    }

    def accepts(compiled, text: str) -> bool:
        compiled = compiled.compiled if isinstance(compiled, OpenEnded) else compiled
        matcher = xgr.GrammarMatcher(compiled)
        return all(matcher.accept_token(t) for t in tokenizer.encode(text)) and (
            matcher.is_terminated() or matcher.accept_token(tokenizer.end_id))

    for name, compiled in grammars.items():
        for text in ['{}', '{"a":[1,2],"b":{"c":null}}', '{"a": [1, 2], "b": {"c": "x"}}']:
            assert accepts(compiled, text), (name, text)
        for text in ["[1,2]", "[]", '"text"', "3"]:
            assert not accepts(compiled, text), (name, text)
    call = '<tool_call>{"name":"paint","arguments":{"colour":"red","glossy":true,"label":"a"}}'
    assert accepts(grammars["auto"], call + "</tool_call>")
