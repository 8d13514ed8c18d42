"""`visto serve --quote-results {auto,always,never}` over real HTTP with the openai SDK: the
answer after a tool result that holds text is made of that result's words (visto.tools.quote),
as `visto chat --quote-results` makes it, whether the client ran the tool and sent its result
back as a `role: tool` message or the server ran one of its own (--tools).

The model is a tiny random LLaVA: what it says of its own is noise, never the tool's text. A
one-word result ("EXIT") can only be quoted one way, so a quoted answer is that word exactly;
a longer one ("SALE 50% OFF") gives an answer made of its words, each at most as often."""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from typing import Any

import openai
import pytest

from test_serve_support import data_url, make_llava_checkpoint, png_bytes, running
from visto.cli import build_parser
from visto.commands.serve import build_app
from visto.errors import UserError
from visto.serve import ServeSettings
from visto.tasks import ocr
from visto.tools import Tool

pytestmark = pytest.mark.timeout(300)

WORD = "EXIT"
LABEL = "SALE 50% OFF"
READ_LABEL = {"type": "function", "function": {
    "name": "read_label", "description": "Read the text on the label",
    "parameters": {"type": "object", "properties": {}},
}}  # fmt: skip


def read_word(image) -> dict:
    """The server's own reading tool (--tools test_serve_quote:WORD_TOOL)."""
    return {"text": WORD, "words": [{"text": WORD, "box": [1, 2, 3, 4], "confidence": 0.9}]}


WORD_TOOL = Tool("read", "Read the text in the image", read_word)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # 2,048 positions: tool definitions are long in a tokenizer trained on 300 short lines
    path = tmp_path_factory.mktemp("serve-quote") / "tiny-llava" / "checkpoint"
    return make_llava_checkpoint(path, context=2048)


@pytest.fixture(scope="module")
def clients(checkpoint):
    """`clients(how, *more_args)`: an openai client of `visto serve --quote-results how`,
    started once per argument list."""
    started = {}
    with contextlib.ExitStack() as stack:

        def client(how: str, *more: str) -> openai.OpenAI:
            argv = ["serve", "--model", str(checkpoint), "--quote-results", how, *more]
            if tuple(argv) not in started:
                base = stack.enter_context(running(build_app(build_parser().parse_args(argv))))
                started[tuple(argv)] = openai.OpenAI(base_url=base + "/v1", api_key="unused",
                                                     max_retries=0, timeout=60)  # fmt: skip
            return started[tuple(argv)]

        yield client


def question(text: str) -> dict:
    return {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
        {"type": "text", "text": text},
    ]}  # fmt: skip


def after_result(text: str, content: str) -> list[dict]:
    """The client's tool loop: its question, the model's call, the tool's result."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "read_label", "arguments": "{}"}}  # fmt: skip
    return [question(text), {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": content}]  # fmt: skip


def answer(client, messages: list[dict], **kwargs) -> tuple[str, str]:
    """(content, finish_reason) of a whole answer ("", "tool_calls" when it calls)."""
    kwargs = {k: v for k, v in {"tools": [READ_LABEL], "max_tokens": 40, **kwargs}.items() if v}
    choice = client.chat.completions.create(model="tiny-llava", messages=messages,
                                            **kwargs).choices[0]  # fmt: skip
    assert (choice.message.tool_calls is not None) == (choice.finish_reason == "tool_calls")
    return choice.message.content or "", choice.finish_reason


def streamed(client, messages: list[dict], **kwargs) -> tuple[str, str | None, list[dict]]:
    """(content, finish_reason, tool_runs) of a streamed answer."""
    kwargs = {k: v for k, v in {"tools": [READ_LABEL], "max_tokens": 40, **kwargs}.items() if v}
    content, finish, runs = "", None, []
    for chunk in client.chat.completions.create(model="tiny-llava", messages=messages,
                                                stream=True, **kwargs):  # fmt: skip
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        runs += (choice.model_extra or {}).get("tool_runs", [])
        finish = choice.finish_reason or finish
    return content, finish, runs


def quotes(content: str, text: str) -> bool:
    """Whether `content` is made of the words of `text`, each at most as often, separated by
    one space or line break each."""
    said = re.split("[ \n]", content)
    return bool(content) and all(said) and not Counter(said) - Counter(text.split())


QUESTIONS = ["What does the label say?", "What is written?", "Read it."]


def test_always_quotes_the_clients_tool_result_exactly_whole_and_streamed(clients) -> None:
    always, never = clients("always"), clients("never")
    for text in QUESTIONS:
        messages = after_result(text, json.dumps({"text": WORD}))
        assert answer(always, messages) == (WORD, "stop")
        assert streamed(always, messages) == (WORD, "stop", [])
        # never: the model's own answer, whole and streamed alike
        own, _ = answer(never, messages)
        assert own != WORD and not quotes(own, WORD), own
        assert streamed(never, messages)[0] == own
    # a longer text: its words, each at most as often as the result holds it, nothing else
    answers = [answer(always, after_result(t, json.dumps({"text": LABEL})))[0] for t in QUESTIONS]
    assert all(quotes(a, LABEL) for a in answers), answers
    owns = [answer(never, after_result(t, json.dumps({"text": LABEL})))[0] for t in QUESTIONS]
    assert not any(quotes(a, LABEL) for a in owns), owns
    # sampled: any draw of the quote is still the tool's words
    for seed in range(3):
        messages = after_result("What does the label say?", json.dumps({"text": LABEL}))
        sampled, _ = answer(always, messages, temperature=1.5, seed=seed)
        assert quotes(sampled, LABEL), sampled


def test_which_results_and_answers_are_quoted(clients) -> None:
    always, never = clients("always"), clients("never")
    messages = after_result("What does the label say?", json.dumps({"text": WORD}))
    own, _ = answer(never, messages)
    # plain text content is the result's text; a JSON object without "text" holds none, and a
    # failed result ({"error": ...}) is not quoted
    assert answer(always, after_result("What does the label say?", WORD))[0] == WORD
    for content in ({"boxes": [[1, 2, 3, 4]]}, {"error": "the label is unreadable", "text": WORD}):
        free = after_result("What does the label say?", json.dumps(content))
        assert answer(always, free) == answer(never, free)
    # an answer that must call, or be JSON, is not quoted
    required = always.chat.completions.create(
        model="tiny-llava", messages=messages, tools=[READ_LABEL], tool_choice="required",
        max_tokens=120).choices[0].message  # fmt: skip
    assert required.tool_calls and required.tool_calls[0].function.name == "read_label"
    as_json, _ = answer(always, messages, response_format={"type": "json_object"},
                        tool_choice="none", max_tokens=120)
    assert isinstance(json.loads(as_json), dict)
    # a question that follows no tool result is the model's own
    plain = [question("What does the label say?")]
    assert answer(always, plain) == answer(never, plain)
    assert own != WORD  # (what the quote would be)


def test_auto_quotes_the_ocr_tasks_question_only(clients) -> None:
    auto, never = clients("auto"), clients("never")
    ocr_question = after_result(ocr.PROMPT, json.dumps({"text": WORD}))
    assert answer(auto, ocr_question) == (WORD, "stop")  # what visto chat --task ocr asks
    assert streamed(auto, ocr_question) == (WORD, "stop", [])
    loud = after_result("  READ all the text   in the image. ", json.dumps({"text": WORD}))
    assert answer(auto, loud)[0] == WORD  # case and spacing aside
    assert answer(never, ocr_question)[0] != WORD
    for text in QUESTIONS:  # any other question: the model's own answer, as with never
        messages = after_result(text, json.dumps({"text": WORD}))
        assert answer(auto, messages) == answer(never, messages)


def test_the_servers_own_tool_loop_quotes_its_result(clients) -> None:
    spec = ("--tools", "test_serve_quote:WORD_TOOL")
    named = {"type": "function", "function": {"name": "read"}}
    messages = [question("What does the label say?")]
    for how in ("always", "never"):
        client = clients(how, *spec)
        reply = client.chat.completions.create(model="tiny-llava", messages=messages,
                                               tool_choice=named, max_tokens=60)  # fmt: skip
        choice = reply.choices[0]
        runs = choice.model_extra["tool_runs"]
        assert runs[0]["name"] == "read" and runs[0]["result"]["text"] == WORD
        content, finish, streamed_runs = streamed(client, messages, tools=None,
                                                  tool_choice=named, max_tokens=60)  # fmt: skip
        assert (content, streamed_runs) == (choice.message.content, runs)
        if how == "always":  # quoted, and no call after it: one round
            assert (choice.message.content, choice.finish_reason, len(runs)) == (WORD, "stop", 1)
            assert finish == "stop"
        else:
            assert choice.message.content != WORD


def quoted_flags(client, messages: list[dict], **kwargs) -> tuple[Any, Any]:
    """The choice's `quoted` (visto's extension, which the SDK keeps in model_extra) of the
    whole answer and of the streamed one's last chunk (the one with the finish reason)."""
    kwargs = {k: v for k, v in {"tools": [READ_LABEL], "max_tokens": 40, **kwargs}.items() if v}
    whole = client.chat.completions.create(model="tiny-llava", messages=messages, **kwargs)
    last = [c.choices[0] for c in client.chat.completions.create(
        model="tiny-llava", messages=messages, stream=True, **kwargs)
        if c.choices and c.choices[0].finish_reason]  # fmt: skip
    assert len(last) == 1
    return whole.choices[0].model_extra.get("quoted"), last[0].model_extra.get("quoted")


def test_the_choice_says_whether_the_answer_quoted(clients) -> None:
    always, never, auto = clients("always"), clients("never"), clients("auto")
    messages = after_result("What does the label say?", json.dumps({"text": WORD}))
    assert quoted_flags(always, messages) == (True, True)
    assert quoted_flags(never, messages) == (False, False)
    assert quoted_flags(auto, messages) == (False, False)  # a free question under auto
    assert quoted_flags(auto, after_result(ocr.PROMPT, json.dumps({"text": WORD}))) == (True, True)
    # nothing to quote, or an answer that may not be text: not quoted, even with always
    assert quoted_flags(always, [question("What does the label say?")]) == (False, False)
    failed = after_result("What does the label say?", json.dumps({"error": "unreadable"}))
    assert quoted_flags(always, failed) == (False, False)
    assert quoted_flags(always, messages, response_format={"type": "json_object"},
                        tool_choice="none", max_tokens=120) == (False, False)  # fmt: skip
    assert quoted_flags(always, messages, tool_choice="required",
                        max_tokens=120) == (False, False)  # fmt: skip
    # the server's own tool loop: the final answer's choice says it quoted the result
    named = {"type": "function", "function": {"name": "read"}}
    spec = ("--tools", "test_serve_quote:WORD_TOOL")
    plain = [question("What does the label say?")]
    assert quoted_flags(clients("always", *spec), plain, tools=None, tool_choice=named,
                        max_tokens=60) == (True, True)  # fmt: skip
    assert quoted_flags(clients("never", *spec), plain, tools=None, tool_choice=named,
                        max_tokens=60) == (False, False)  # fmt: skip
    # LangChain's ChatOpenAI reads the same body unchanged (the extra field is ignored)
    from langchain_openai import ChatOpenAI

    base = str(always.base_url)
    llm = ChatOpenAI(model="tiny-llava", base_url=base, api_key="unused", max_tokens=40,
                     max_retries=0)  # fmt: skip
    assert llm.bind_tools([READ_LABEL]).invoke(messages).content == WORD


def test_bad_values_get_a_clear_error(capsys) -> None:
    for bad in ("sometimes", "ALWAYS", ""):
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args(["serve", "--model", "ckpt", "--quote-results", bad])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --quote-results: invalid choice: '{bad}'" in err, err
        assert "auto" in err and "always" in err and "never" in err
    assert build_parser().parse_args(["serve", "--model", "ckpt"]).quote_results == "auto"
    with pytest.raises(UserError, match="quote_results 'sometimes': give one of auto, always"):
        ServeSettings(quote_results="sometimes")


def test_the_help_documents_it(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--quote-results {auto,always,never}" in out
    assert "--tools ocr --quote-results always" in out  # an example
    assert 'each choice says whether its answer quoted: "quoted": true/false' in out
