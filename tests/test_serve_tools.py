"""Function calling in `visto serve`, over real HTTP with the clients people bring: the openai
SDK (tools, tool_choice auto / none / required / named, streaming, a tool result sent back) and
LangChain's `bind_tools` with a small agent loop that runs a Python tool. The model is a tiny
random LLaVA, so what it says is noise; what the server promises is not: a required or named
call always comes back, and its arguments parse and follow the tool's schema (the grammar)."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_serve_support import data_url, make_llava_checkpoint, png_bytes, running
from visto.cli import build_parser
from visto.commands.serve import build_app
from visto.serve.tools import ToolCallStream, ToolPlan

pytestmark = pytest.mark.timeout(300)

COLOURS = ["red", "green", "blue"]
PAINT = {"type": "function", "function": {
    "name": "paint", "description": "Paint the square",
    "parameters": {"type": "object", "properties": {
        "colour": {"type": "string", "enum": COLOURS}, "glossy": {"type": "boolean"},
        "label": {"type": "string", "maxLength": 6}},
        "required": ["colour", "glossy", "label"], "additionalProperties": False},
}}  # fmt: skip
COUNT = {"type": "function", "function": {
    "name": "count_shapes", "parameters": {"type": "object", "properties": {
        "shape": {"type": "string", "enum": ["circle", "square"]}}, "required": ["shape"]},
}}  # fmt: skip


def valid_paint(arguments: str) -> dict:
    args = json.loads(arguments)
    assert set(args) == {"colour", "glossy", "label"}, args
    assert args["colour"] in COLOURS and isinstance(args["glossy"], bool)
    assert isinstance(args["label"], str) and len(args["label"]) <= 6
    return args


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    # 2,048 positions: tool definitions are long in a tokenizer trained on 300 short lines
    path = tmp_path_factory.mktemp("tools") / "tiny-llava" / "checkpoint"
    ckpt = make_llava_checkpoint(path, context=2048)
    app = build_app(build_parser().parse_args(["serve", "--model", str(ckpt)]))
    with running(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(image: bool = True) -> list[dict]:
    content = [{"type": "text", "text": "Paint the square red."}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url(png_bytes())}})
    return [{"role": "user", "content": content}]


def test_a_named_tool_is_called_with_arguments_that_follow_its_schema(client) -> None:
    for seed in range(3):  # sampled, so the arguments differ; each one is valid
        reply = client.chat.completions.create(
            model="tiny-llava", messages=ask(), tools=[PAINT, COUNT], max_tokens=200,
            tool_choice={"type": "function", "function": {"name": "paint"}},
            parallel_tool_calls=False, temperature=1.0, seed=seed,
        )  # fmt: skip
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "paint"
        assert call.id.startswith("call_")
        valid_paint(call.function.arguments)


def test_required_calls_one_of_the_tools_and_none_calls_none(client) -> None:
    reply = client.chat.completions.create(
        model="tiny-llava", messages=ask(), tools=[PAINT, COUNT], tool_choice="required",
        parallel_tool_calls=False, max_tokens=200,
    )  # fmt: skip
    [call] = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls"
    if call.function.name == "paint":
        valid_paint(call.function.arguments)
    else:
        assert call.function.name == "count_shapes"
        assert json.loads(call.function.arguments)["shape"] in ("circle", "square")

    reply = client.chat.completions.create(
        model="tiny-llava", messages=ask(), tools=[PAINT], tool_choice="none", max_tokens=8
    )
    assert reply.choices[0].message.tool_calls is None
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_auto_answers_in_text_or_in_valid_calls(client) -> None:
    for seed in range(4):
        reply = client.chat.completions.create(
            model="tiny-llava", messages=ask(), tools=[PAINT], max_tokens=60, temperature=1.0,
            seed=seed,
        )  # fmt: skip
        choice = reply.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                valid_paint(call.function.arguments)
        else:
            assert choice.finish_reason in ("stop", "length")
            assert isinstance(choice.message.content, str)


NOTE = {"type": "json_schema", "json_schema": {"name": "note", "schema": {
    "type": "object", "properties": {"colour": {"type": "string", "enum": COLOURS},
                                     "note": {"type": "string", "maxLength": 5}},
    "required": ["colour", "note"], "additionalProperties": False}}}  # fmt: skip


def valid_note(content: str) -> None:
    note = json.loads(content)  # strict: a raw control character in a string would fail here
    assert note["colour"] in COLOURS and len(note["note"]) <= 5


def test_tools_beside_a_json_response_format(client) -> None:
    """auto: calls or the schema's JSON; none: the JSON. maxLength strings hold JSON's rules
    (xgrammar's own maxLength admits raw control characters; serve/grammar.plain_strings)."""
    kinds = set()
    for seed in range(6):
        reply = client.chat.completions.create(
            model="tiny-llava", messages=ask(), tools=[PAINT], response_format=NOTE,
            max_tokens=200, temperature=1.0, seed=seed,
        )  # fmt: skip
        choice = reply.choices[0]
        if choice.message.tool_calls:
            kinds.add("calls")
            for call in choice.message.tool_calls:
                valid_paint(call.function.arguments)
        else:
            kinds.add("json")
            assert choice.finish_reason == "stop"
            valid_note(choice.message.content)
        reply = client.chat.completions.create(
            model="tiny-llava", messages=ask(), tools=[PAINT], tool_choice="none",
            response_format=NOTE, max_tokens=100, temperature=1.0, seed=seed,
        )  # fmt: skip
        valid_note(reply.choices[0].message.content)
    assert kinds == {"calls", "json"}  # with these seeds the random model picks both


def test_streamed_tool_calls_assemble_in_the_sdk_as_the_whole_answer(client) -> None:
    kwargs = dict(model="tiny-llava", messages=ask(), tools=[PAINT, COUNT], max_tokens=300,
                  tool_choice={"type": "function", "function": {"name": "paint"}},
                  temperature=1.0, seed=3)  # fmt: skip
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    assert len(whole) == 2  # parallel calls allowed: with this seed the model makes two
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    streamed = final.choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in streamed] == [
        (c.function.name, c.function.arguments) for c in whole
    ]
    # the raw deltas: per call id, type and name first, then its arguments; then finish_reason
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    assert [d.index for d in deltas] == [0, 0, 1, 1]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "paint"
    assert deltas[1].id is None and deltas[1].function.arguments == whole[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_tool_result_goes_back_and_the_model_answers(client) -> None:
    first = client.chat.completions.create(
        model="tiny-llava", messages=ask(), tools=[PAINT], max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "paint"}},
    )  # fmt: skip
    message = first.choices[0].message
    messages = [*ask(), message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "done"}]  # fmt: skip
    reply, before = (client.chat.completions.create(
        model="tiny-llava", messages=m, tools=[PAINT], tool_choice="none", max_tokens=8
    ) for m in (messages, ask()))  # fmt: skip
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage.prompt_tokens > before.usage.prompt_tokens + 40  # the call and result


def error_of(client, **kwargs) -> openai.BadRequestError:
    kwargs = {"model": "tiny-llava", "messages": ask(image=False), "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**kwargs)
    assert info.value.body["type"] == "invalid_request_error"
    return info.value


def test_bad_tool_requests_get_openai_errors_that_say_what_to_fix(client, url) -> None:
    e = error_of(
        client, tools=[PAINT], tool_choice={"type": "function", "function": {"name": "fly"}}
    )
    assert e.body["param"] == "tool_choice.function.name" and "'fly'" in e.body["message"]
    assert "paint" in e.body["message"]
    e = error_of(client, tools=[PAINT], tool_choice="always")
    assert e.body["param"] == "tool_choice"
    e = error_of(client, tool_choice="required")
    assert "tool_choice needs tools" in e.body["message"]
    bad_name = {
        "type": "function",
        "function": {"name": "paint it!", "parameters": {"type": "object"}},
    }
    assert error_of(client, tools=[bad_name]).body["param"] == "tools[0].function.name"
    not_object = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
    assert error_of(client, tools=[not_object]).body["param"] == "tools[0].function.parameters"
    assert error_of(client, tools=[PAINT, PAINT]).body["param"] == "tools[1].function.name"
    e = error_of(client, tools=[{"type": "retrieval"}])
    assert e.body["param"].startswith("tools[0]")
    e = error_of(client, tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strnig"}}}}}], tool_choice="required")  # fmt: skip
    assert "could not be compiled" in e.body["message"]
    e = error_of(client, tools=[PAINT], response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strnig"}}}}})  # fmt: skip
    assert e.body["param"] == "response_format.json_schema.schema"

    call = {"id": "call_1", "type": "function", "function": {"name": "paint", "arguments": "{}"}}
    orphan = [*ask(False), {"role": "tool", "tool_call_id": "call_9", "content": "done"}]
    e = error_of(client, messages=orphan, tools=[PAINT])
    assert e.body["param"] == "messages[1].tool_call_id" and e.body["code"] == "tool_call_not_found"
    wrong_id = [*ask(False), {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_2", "content": "done"}]  # fmt: skip
    assert "'call_2'" in error_of(client, messages=wrong_id).body["message"]
    no_id = [*ask(False), {"role": "assistant", "tool_calls": [call]},
             {"role": "tool", "content": "done"}]  # fmt: skip
    assert error_of(client, messages=no_id).body["param"] == "messages[2].tool_call_id"
    unanswered = [*ask(False), {"role": "assistant", "tool_calls": [call]},
                  {"role": "user", "content": "and?"}]  # fmt: skip
    assert "have no answer" in error_of(client, messages=unanswered).body["message"]
    # the server is still up and answers
    assert client.chat.completions.create(model="tiny-llava", messages=ask(), max_tokens=2).choices


def test_langchain_bind_tools_and_an_agent_loop_that_runs_a_python_tool(url) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    ran = []

    @tool  # an enum argument: a random model's free string could run to max_tokens
    def count_shapes(shape: Literal["circle", "square"]) -> str:
        """Count the shapes of one kind in the picture."""
        ran.append(shape)
        return f"there are 2 {shape}s"

    llm = ChatOpenAI(model="tiny-llava", base_url=url + "/v1", api_key="unused",
                     max_tokens=200, temperature=0, max_retries=0, timeout=60)  # fmt: skip
    caller = llm.bind_tools([count_shapes], tool_choice="count_shapes")
    messages = [HumanMessage(content=[
        {"type": "text", "text": "How many circles?"},
        {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
    ])]  # fmt: skip
    # the agent loop: the model calls, the tool runs, its result goes back, the model answers
    reply = caller.invoke(messages)
    assert [c["name"] for c in reply.tool_calls] == ["count_shapes"]
    assert reply.tool_calls[0]["args"]["shape"] in ("circle", "square")
    messages.append(reply)
    for call in reply.tool_calls:
        messages.append(ToolMessage(content=count_shapes.invoke(call["args"]),
                                    tool_call_id=call["id"]))  # fmt: skip
    answer = llm.bind_tools([count_shapes], tool_choice="none").invoke(messages)
    assert ran and not answer.tool_calls and isinstance(answer.content, str)


def test_the_stream_holds_back_only_what_may_be_a_call() -> None:
    plan = ToolPlan([PAINT], {"paint": PAINT["function"]["parameters"]}, "auto", ("paint",), True)
    stream = ToolCallStream(plan)
    call = '<tool_call>{"name":"paint","arguments":{"colour":"red","glossy":true,"label":""}}</tool_call>'
    pieces = ["Sure", ", <", "b> ok ", "<tool", "_call>", call[11:30], call[30:]]
    sent = "".join(stream.feed(p) for p in pieces)
    assert sent == "Sure, <b> ok "  # "<b>" went out once it could not start a call
    rest, deltas, finish = stream.finish("stop")
    assert (rest, finish) == ("", "tool_calls")
    assert deltas[0]["function"] == {"name": "paint", "arguments": ""} and deltas[0]["index"] == 0
    valid_paint(deltas[1]["function"]["arguments"])

    for finish in ("length", "stop"):  # the beginning of a call that did not fit the budget
        cut = ToolCallStream(plan)
        assert "".join(cut.feed(p) for p in ["a <tool", "_ca"]) == "a "
        assert cut.finish(finish) == ("", [], "length")
    cut = ToolCallStream(plan)
    assert "".join(cut.feed(p) for p in ["a ", call, " b", call[:20]]) == "a "
    rest, deltas, finish = cut.finish("length")  # one call closed, the next cut
    assert (rest, finish, len(deltas)) == (" b", "length", 2)
    plain = ToolCallStream(plan)
    assert "".join(plain.feed(p) for p in ["a <tool", "_ca", "ke> ok"]) == "a <tool_cake> ok"
    assert plain.finish("stop") == ("", [], "stop")  # not a call after all


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
SCHEMA_TYPES = st.sampled_from(
    ["string", "integer", "number", "boolean", "array", "object", "null", "x"]
)


@st.composite
def tool_bodies(draw) -> dict:
    """Near-valid tool requests: real tool shapes with fuzzed names, schemas and choices."""
    properties = draw(st.dictionaries(st.text(min_size=1, max_size=5), st.fixed_dictionaries(
        {"type": SCHEMA_TYPES}, optional={"enum": st.lists(JSON_VALUES, max_size=3),
                                          "maxLength": st.integers(-1, 4), "items": JSON_VALUES}),
        max_size=3))  # fmt: skip
    tool = {"type": draw(st.sampled_from(["function", "function", "code"])), "function": {
        "name": draw(st.sampled_from(["f", "g-1", "", "a b", "x" * 70])),
        "parameters": draw(st.just({"type": "object", "properties": properties}) | JSON_VALUES)}}  # fmt: skip
    call = {"id": draw(st.sampled_from(["c1", "c2"])), "type": "function",
            "function": {"name": "f", "arguments": draw(st.sampled_from(["{}", "nope", "<image>"]))}}  # fmt: skip
    history = draw(st.sampled_from([[], [{"role": "assistant", "tool_calls": [call]}],
                                     [{"role": "assistant", "tool_calls": [call]},
                                      {"role": "tool", "tool_call_id": "c1", "content": "ok"}]]))  # fmt: skip
    body = {"model": "tiny-llava", "max_tokens": 3, "stream": draw(st.booleans()),
            "messages": [{"role": "user", "content": "go"}, *history],
            "tools": draw(st.lists(st.just(tool), max_size=2) | JSON_VALUES),
            "tool_choice": draw(st.sampled_from(["auto", "none", "required", "any", None])
                                | st.just({"type": "function", "function": {"name": "f"}})
                                | JSON_VALUES)}  # fmt: skip
    return {k: v for k, v in body.items() if v is not None or draw(st.booleans())}


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=tool_bodies())
def test_fuzzed_tool_requests_get_4xx_or_a_valid_answer(url, body) -> None:
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    if r.status_code == 200:
        if body.get("stream"):
            assert r.text.rstrip().endswith("data: [DONE]")
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
        return
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_a_text_answer_cut_by_max_tokens_ends_by_length_beside_tools(client) -> None:
    """With tools in "auto" a text answer is decoded under the tool-call grammar, whose closing
    within the budget ended free text with the stop token at the budget's last token: a cut
    answer came back "stop" (without tools, "length"). Text is cut like text; a call begun
    still closes in time (test_serve_tool_budget)."""
    for tools in ([], [PAINT]):
        extra = {"tools": tools, "tool_choice": "auto"} if tools else {}
        reply = client.chat.completions.create(model="tiny-llava", messages=ask(), max_tokens=6,
                                               **extra)  # fmt: skip
        choice = reply.choices[0]
        assert choice.message.tool_calls is None and choice.message.content, choice
        assert (choice.finish_reason, reply.usage.completion_tokens) == ("length", 6), tools
