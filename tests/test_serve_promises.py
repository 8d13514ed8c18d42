"""`visto serve` keeps the promises its --help makes, at their edges, over real HTTP with the
openai SDK: JSON under response_format or a tool's schema closes within max_tokens (a model
that would run a string on gets the closing path when the budget only just suffices); one
context length, advertised and enforced by serve, chat and eval alike; answers show boxes as
"[x1, y1, x2, y2]" (0..999), never as the model's location tokens."""

from __future__ import annotations

import io
import json

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_constrain_budget import conforms
from test_serve_support import (
    data_url,
    make_llava_checkpoint,
    make_repeating_llava_checkpoint,
    make_scripted_llava_checkpoint,
    png_bytes,
    running,
)
from visto.cli import build_parser
from visto.commands.serve import build_app

pytestmark = pytest.mark.timeout(300)

NAMES = {"type": "object", "properties": {"objects": {"type": "array", "items": {"type": "string"}}},
         "required": ["objects"], "additionalProperties": False}  # fmt: skip
NOTE = {"type": "function", "function": {"name": "note", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"},
                                     "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["text", "tags"], "additionalProperties": False}}}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # a model that opens arrays and strings and then writes 'a' for ever
    path = tmp_path_factory.mktemp("promises") / "tiny-llava" / "checkpoint"
    # with the quickstart's mismatch: training truncates at 256 tokens, the decoder has 512
    return make_repeating_llava_checkpoint(path, ["a", "[", '"'], max_length=256)


@pytest.fixture(scope="module")
def url(checkpoint):
    app = build_app(build_parser().parse_args(["serve", "--model", str(checkpoint)]))
    with running(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(text: str = "List the objects.") -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
        {"type": "text", "text": text}]}]  # fmt: skip


def structured(client, max_tokens: int, **kwargs):
    return client.chat.completions.create(
        model="tiny-llava", messages=ask(), max_tokens=max_tokens,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "names", "schema": NAMES, "strict": True}},
        **kwargs)  # fmt: skip


def test_json_schema_closes_at_every_budget_edge(client) -> None:
    """Unbounded string in an unbounded array, tiny budgets: always parseable, schema-valid
    JSON that ends by the stop token; the model's string is as long as the budget allows."""
    fewest = None
    for max_tokens in range(1, 40):
        try:
            reply = structured(client, max_tokens)
        except openai.BadRequestError as e:  # too few tokens to close any answer: said up front
            assert fewest is None and "too few" in e.message and e.body["param"] == "max_tokens"
            continue
        choice = reply.choices[0]
        if fewest is None:  # the budget only suffices to close: the shortest answer
            fewest = max_tokens
            assert choice.message.content == '{"objects":[]}'
            assert reply.usage.completion_tokens == fewest
        assert choice.finish_reason == "stop", (max_tokens, choice.message.content)
        assert conforms(json.loads(choice.message.content), NAMES)
        assert reply.usage.completion_tokens <= max_tokens
    assert fewest is not None
    assert json.loads(choice.message.content)["objects"][0].startswith("aaaaaaaaaa")
    for seed in range(4):  # sampled the same
        reply = structured(client, fewest + 3 + seed, temperature=1.5, seed=seed)
        assert reply.choices[0].finish_reason == "stop"
        assert conforms(json.loads(reply.choices[0].message.content), NAMES)


def test_without_a_budget_edge_the_string_runs_on(client) -> None:
    """What the guard saves: the same model as plain text fills its whole budget."""
    reply = client.chat.completions.create(model="tiny-llava", messages=ask(), max_tokens=20)
    assert reply.choices[0].finish_reason == "length"
    assert "aaaaaaaaaa" in reply.choices[0].message.content


def test_streamed_json_closes_too(client) -> None:
    stream = structured(client, 15, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert conforms(json.loads(text), NAMES)


def test_tool_call_arguments_close_within_the_budget(client) -> None:
    """A required call's arguments, and a named one's: valid under the tool's schema at every
    budget from the first that can hold a call."""
    answered = 0
    for max_tokens in range(60, 115, 3):  # the tool definitions fill most of the context
        for choice in ("required", {"type": "function", "function": {"name": "note"}}):
            try:
                reply = client.chat.completions.create(
                    model="tiny-llava", messages=ask("Take a note."), tools=[NOTE],
                    tool_choice=choice, max_tokens=max_tokens)  # fmt: skip
            except openai.BadRequestError as e:
                assert "too few" in e.message
                continue
            answered += 1
            out = reply.choices[0]
            assert out.finish_reason == "tool_calls", (max_tokens, out.message)
            [call] = out.message.tool_calls
            assert call.function.name == "note"
            assert conforms(json.loads(call.function.arguments), NOTE["function"]["parameters"])
    assert answered >= 30
    assert json.loads(call.function.arguments)["text"].startswith("aaaaa")


def long_text(words: int) -> str:
    return " ".join(["the red square is left of the blue circle"] * (words // 9))


def test_one_context_length_advertised_and_enforced_everywhere(url, client, checkpoint):
    """The tiny preset's processor truncates training samples at 256 tokens, its decoder has
    512 positions: /v1/models says 512, and serve, chat (visto.tasks.runner.Chat) and eval
    (make_generate) all take a prompt between the two and refuse one beyond 512, the server
    with OpenAI's error."""
    import httpx

    from visto.checkpoint import load
    from visto.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
    from visto.errors import UserError
    from visto.tasks.runner import Chat, make_generate

    [card] = httpx.get(url + "/v1/models").json()["data"]
    model = load(checkpoint)
    assert model.processor.config.max_length == 256 < card["context_length"] == 512

    def served(text: str, max_tokens: int = 4):
        return client.chat.completions.create(model="tiny-llava", messages=ask(text),
                                              max_tokens=max_tokens)  # fmt: skip

    fits = long_text(300)
    reply = served(fits)
    assert 256 < reply.usage.prompt_tokens <= 512 - 4
    chat = Chat(model, images=[image()])
    assert chat.ask(fits).text  # chat reads it whole
    sample = Sample("long", [image()], [Turn("user", f"{IMAGE_PLACEHOLDER}\n{fits}")])
    assert len(make_generate(model, constrain_json=False)([sample])) == 1  # and so does eval

    too_long = long_text(700)
    with pytest.raises(openai.BadRequestError) as e:
        served(too_long)
    error = e.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "maximum context length is 512 tokens" in error["message"]
    with pytest.raises(openai.BadRequestError) as e:  # the prompt fits, the answer would not
        served(fits, max_tokens=512 - reply.usage.prompt_tokens + 1)
    assert e.value.body["code"] == "context_length_exceeded"
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(UserError, match="context is 512"):
        Chat(model, images=[image()]).ask(too_long)
    sample = Sample("long", [image()], [Turn("user", f"{IMAGE_PLACEHOLDER}\n{too_long}")])
    with pytest.raises(UserError, match="context is 512"):
        make_generate(model, constrain_json=False)([sample])
    assert httpx.get(url + "/health").json()["status"] == "ok"


def image():
    from PIL import Image

    return Image.open(io.BytesIO(png_bytes())).convert("RGB")


# the scripted model's answer to anything: a box as four location tokens, and a stray one
SCRIPT = "the red square<loc_3><loc_7><loc_12><loc_20> is left<loc_9> of blue circle"
PLAIN = "the red square[109, 234, 390, 640] is left of blue circle"


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    path = tmp_path_factory.mktemp("scripted") / "tiny-llava" / "checkpoint"
    checkpoint = make_scripted_llava_checkpoint(path, SCRIPT)
    app = build_app(build_parser().parse_args(["serve", "--model", str(checkpoint)]))
    with running(app) as base:
        yield checkpoint, openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def test_location_tokens_become_boxes_in_the_text(scripted) -> None:
    """ "Describe the image." answered with location tokens: the text says "[x1, y1, x2, y2]"
    (0..999) where the model wrote a box and leaves a stray token out, plain and streamed
    alike, as `visto chat` shows it; the boxes field has the box."""
    from visto.checkpoint import load
    from visto.tasks.runner import Chat

    checkpoint, client = scripted
    reply = client.chat.completions.create(model="tiny-llava", messages=ask("Describe the image."),
                                           max_tokens=30)  # fmt: skip
    assert reply.choices[0].message.content == PLAIN
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].model_extra["boxes"] == [[109, 234, 390, 640]]
    chunks = list(
        client.chat.completions.create(
            model="tiny-llava", messages=ask("Describe the image."), max_tokens=30, stream=True
        )
    )
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert "".join(pieces) == PLAIN and not any("<loc_" in p for p in pieces)
    assert chunks[-1].choices[0].model_extra["boxes"] == [[109, 234, 390, 640]]
    assert Chat(load(checkpoint), images=[image()]).ask("Describe the image.").text == PLAIN
    # cut inside the box: what was written of it is left out, not shown as tokens
    short = client.chat.completions.create(model="tiny-llava", messages=ask("Describe it."),
                                           max_tokens=5)  # fmt: skip
    assert short.choices[0].message.content == "the red square"


def test_boxes_users_write_reach_the_model_as_its_location_tokens(scripted) -> None:
    """A conversation sent back with the answer's plain boxes, or a question about a box, reads
    as the model wrote and learned them: the same prompt as with the location tokens."""
    _, client = scripted

    def prompt_tokens(answer: str, question: str) -> int:
        messages = [*ask("Describe the image."), {"role": "assistant", "content": answer},
                    {"role": "user", "content": question}]  # fmt: skip
        reply = client.chat.completions.create(model="tiny-llava", messages=messages,
                                               max_tokens=1)  # fmt: skip
        return reply.usage.prompt_tokens

    assert prompt_tokens(PLAIN, "What is at [109, 234, 390, 640]?") == prompt_tokens(
        "the red square<loc_3><loc_7><loc_12><loc_20> is left of blue circle",
        "What is at <loc_3><loc_7><loc_12><loc_20>?",
    )
    # a list that is not a box (a number over 999) stays text
    assert prompt_tokens(PLAIN, "And [1200, 5, 6, 7]?") > prompt_tokens(
        PLAIN, "And [100, 5, 6, 7]?"
    )


BAD_TOOLS = """\
import time
from visto.errors import UserError
from visto.tools import Tool

def _unreadable(image):
    raise UserError("cannot decode the image: it is 1 x 1 pixels")

boom = Tool("boom", "raises", lambda image: 1 / 0)
slow = Tool("slow", "hangs", lambda image: time.sleep(3), timeout_s=0.3)
unreadable = Tool("unreadable", "refuses the image", _unreadable)
"""


def test_tools_that_fail_give_the_model_an_error_and_the_server_stays_up(tmp_path, monkeypatch):
    """The server's own tools (--tools) when they raise, hang past their timeout or cannot
    read the image: the run reports ok false with a clear error, the model gets that error as
    the tool's result and answers, and the next request is served."""
    import httpx

    from visto.data.tool_calls import assistant_turn
    from visto.tools import load_tools
    from visto.tools.loop import run_tool_calls

    (tmp_path / "bad_tools.py").write_text(BAD_TOOLS)
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = make_llava_checkpoint(tmp_path / "tiny-llava" / "checkpoint", context=2048)
    names = "bad_tools:boom,bad_tools:slow,bad_tools:unreadable"
    app = build_app(build_parser().parse_args(["serve", "--model", str(checkpoint),
                                               "--tools", names]))  # fmt: skip
    expected = {"boom": "ZeroDivisionError", "slow": "longer than its 0.3 s",
                "unreadable": "cannot decode the image: it is 1 x 1 pixels"}  # fmt: skip
    with running(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        for name, error in expected.items():
            reply = client.chat.completions.create(
                model="tiny-llava", messages=ask(f"Use {name}."), max_tokens=100,
                tool_choice={"type": "function", "function": {"name": name}})  # fmt: skip
            choice = reply.choices[0]
            run = choice.model_extra["tool_runs"][0]
            assert run["name"] == name and run["ok"] is False and error in run["result"]["error"]
            assert choice.finish_reason in ("stop", "length")  # the model answered after it
        assert httpx.get(base + "/health").json()["status"] == "ok"
        assert client.chat.completions.create(model="tiny-llava", messages=ask(), max_tokens=3)
    # what the next round's prompt gets for such a call: the error as the tool's result
    tools = load_tools(names)
    done = run_tool_calls(assistant_turn("", [("boom", "{}")]).content, tools, image())
    assert "ZeroDivisionError" in json.loads(done.result_turns()[0].content.split(">", 1)[1]
                                             .rsplit("<", 1)[0])["error"]  # fmt: skip


SCHEMAS = [NAMES, NOTE["function"]["parameters"],
           {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"},
                                             "tags": {"type": "array", "maxItems": 2,
                                                      "items": {"type": "string", "maxLength": 3}}},
            "required": ["n", "ok", "tags"], "additionalProperties": False}]  # fmt: skip


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=st.sampled_from(SCHEMAS), max_tokens=st.integers(1, 80),
       temperature=st.sampled_from([0.0, 1.0, 2.0]), seed=st.integers(0, 99))  # fmt: skip
def test_fuzzed_budgets_get_valid_json_or_an_openai_error(url, schema, max_tokens, temperature,
                                                           seed) -> None:  # fmt: skip
    import httpx

    body = {"model": "tiny-llava", "messages": ask(), "max_tokens": max_tokens,
            "temperature": temperature, "seed": seed,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "s", "schema": schema}}}  # fmt: skip
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    if r.status_code == 400:
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "max_tokens"
        return
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert conforms(json.loads(choice["message"]["content"]), schema)
