"""Function calling in the chat template: the Python side (data/tool_calls.py, render_chat) and
its Jinja copy for transformers write the same text, and the model's calls parse back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visto.data.chat import render_chat
from visto.data.sample import Turn
from visto.data.tokenizer import train_tokenizer
from visto.data.tool_calls import (
    ParsedCall,
    assistant_turn,
    parse_tool_calls,
    tool_call_text,
    tool_line,
    tool_result_turn,
    with_tools,
)

OCR = {"type": "function", "function": {
    "name": "ocr", "description": "Read the text in the image — every word, with its box",
    "parameters": {"type": "object", "properties": {"lang": {"type": "string", "enum": ["en", "de"]}}},
}}  # fmt: skip
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip


@pytest.fixture(scope="module")
def hf():
    corpus = [f'the red circle {i} is left of {{"count": {i}}}' for i in range(200)]
    return train_tokenizer(corpus, vocab_size=400, loc_bins=4).to_hf_tokenizer()


def _hf_text(hf, messages, tools, gen):
    return hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)


def test_a_tool_conversation_renders_the_same_in_python_and_jinja(hf) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "ocr", "arguments": '{"lang":"en"}'}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Köln"}}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"text":"SALE"}'},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
        {"role": "assistant", "content": "SALE, and rain."},
    ]  # fmt: skip
    turns = [
        Turn("system", "Be brief."),
        Turn("user", "<image>Read it."),
        assistant_turn(None, [("ocr", '{"lang":"en"}'), ("get_weather", {"city": "Köln"})]),
        tool_result_turn('{"text":"SALE"}'),
        tool_result_turn("rain"),
        Turn("assistant", "SALE, and rain."),
    ]
    for gen in (False, True):
        ours = render_chat(with_tools(turns, [OCR, WEATHER]), add_generation_prompt=gen)
        assert _hf_text(hf, messages, [OCR, WEATHER], gen) == ours
        # without a system message the tools open a system turn of their own
        ours = render_chat(with_tools(turns[1:], [OCR]), add_generation_prompt=gen)
        assert _hf_text(hf, messages[1:], [OCR], gen) == ours
    text = render_chat(with_tools(turns, [OCR]))
    assert text.startswith('<s><|system|>Call a tool as <tool_call>{"name":NAME,"arguments":{...}}</tool_call>.')
    assert '<tools>ocr(lang?: "en"|"de"): Read the text in the image — every word, with its box</tools>' in text
    assert "</tools>\nBe brief.<|end|>" in text
    assert (
        '<|assistant|><tool_call>{"name":"ocr","arguments":{"lang":"en"}}</tool_call>'
        '<tool_call>{"name":"get_weather","arguments":{"city":"Köln"}}</tool_call><|end|>'
    ) in text
    assert "<|user|><tool_response>rain</tool_response><|end|>" in text
    # no tools: the template is the one it always was
    assert (
        render_chat(with_tools(turns[:2], None))
        == "<s><|system|>Be brief.<|end|><|user|><image>Read it.<|end|>"
    )


names = st.text(alphabet="abcxyz_-0123", min_size=1, max_size=8)
values = st.text(
    alphabet=st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), max_size=10
)


@settings(max_examples=30, deadline=None)
@given(
    calls=st.lists(st.tuples(names, st.dictionaries(names, values | st.integers(), max_size=2)),
                   min_size=1, max_size=3),
    content=values, result=values, gen=st.booleans(),
)  # fmt: skip
def test_jinja_matches_python_for_any_calls(hf, calls, content, result, gen) -> None:
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": content,
         "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]},
        {"role": "tool", "content": result},
    ]  # fmt: skip
    turns = [Turn("user", "go"), assistant_turn(content, calls), tool_result_turn(result)]
    assert _hf_text(hf, messages, [WEATHER], gen) == render_chat(with_tools(turns, [WEATHER]), gen)


def test_calls_parse_back_from_the_models_answer() -> None:
    text = (
        "Let me look. "
        + tool_call_text("ocr", {"lang": "de"})
        + tool_call_text("get_weather", '{"city": "Köln"}')
    )
    content, calls = parse_tool_calls(text, {"ocr", "get_weather"})
    assert content == "Let me look. "
    assert calls == [
        ParsedCall("ocr", '{"lang":"de"}'),
        ParsedCall("get_weather", '{"city":"Köln"}'),
    ]
    raw = '<tool_call>{"name":"ocr","arguments":{"label":"a\x15b"}}</tool_call>'
    assert parse_tool_calls(raw)[1] == [ParsedCall("ocr", '{"label":"a\\u0015b"}')]
    # what is not a well-formed call of a known tool stays plain text
    assert parse_tool_calls("just text") is None
    assert parse_tool_calls(tool_call_text("ocr", {}), {"weather"}) is None
    assert parse_tool_calls('<tool_call>{"name":"ocr","arguments":[1]}</tool_call>') is None
    assert parse_tool_calls('<tool_call>{"name":"ocr","argu') is None  # cut by the token budget
    assert parse_tool_calls(tool_call_text("ocr", {}) + '<tool_call>{"name"') is None


def test_tools_read_as_one_line_signatures() -> None:
    assert tool_line(WEATHER) == "get_weather(city: string)"
    assert tool_line({"type": "function", "function": {"name": "f"}}) == "f()"
    big = {"type": "function", "function": {"name": "find", "description": "Find things.", "parameters": {
        "type": "object", "required": ["query", "box"], "properties": {
            "query": {"type": "string", "maxLength": 80, "description": "what to find"},
            "limit": {"type": ["integer", "null"]},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
            "box": {"type": "object", "required": ["x"], "properties": {
                "x": {"type": "number", "description": "not shown"}, "y": {"type": "number"}}},
            "any": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "flag": {"type": "boolean", "enum": [True]}}}}}  # fmt: skip
    assert tool_line(big) == (
        'find(query: string /*what to find*/, limit?: integer|null, tags?: ("a"|"b")[], '
        'box: {x: number, y?: number}, any?: {"anyOf":[{"type":"string"},{"type":"integer"}]}, '
        "flag?: true): Find things."
    )


SCHEMA_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
TYPES = st.sampled_from(["string", "integer", "number", "boolean", "null", "array", "object", "x"])
schemas = st.recursive(
    st.fixed_dictionaries({}, optional={"type": TYPES | st.lists(TYPES, max_size=2) | SCHEMA_VALUES,
                                        "enum": st.lists(SCHEMA_VALUES, max_size=3) | SCHEMA_VALUES,
                                        "description": values | SCHEMA_VALUES}) | SCHEMA_VALUES,
    lambda inner: st.fixed_dictionaries({"type": st.sampled_from(["object", "array"])}, optional={
        "properties": st.dictionaries(names, inner, max_size=3) | SCHEMA_VALUES,
        "items": inner, "required": st.lists(names, max_size=2) | SCHEMA_VALUES,
        "description": values}),
    max_leaves=8,
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(parameters=schemas, description=values | st.none(), name=names)
def test_jinja_writes_the_same_signature_for_any_schema(hf, parameters, description, name) -> None:
    fn = {"name": name, "parameters": parameters}
    if description is not None:
        fn["description"] = description
    tools = [{"type": "function", "function": fn}, WEATHER]
    messages = [{"role": "user", "content": "go"}]
    assert _hf_text(hf, messages, tools, True) == render_chat(
        with_tools([Turn("user", "go")], tools), True
    )
