"""Third-party clients against `visto serve`: langchain-openai, and a bounded fuzz of malformed
bodies and image bytes (every one answered 4xx in OpenAI's error shape; the server stays up)."""

from __future__ import annotations

import base64
import json
from typing import Literal

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from test_serve_support import data_url, make_llava_checkpoint, png_bytes, running
from visto.cli import build_parser
from visto.commands.serve import build_app

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    ckpt = make_llava_checkpoint(tmp_path_factory.mktemp("clients") / "tiny-llava" / "checkpoint")
    app = build_app(build_parser().parse_args(["serve", "--model", str(ckpt)]))
    with running(app) as base:
        yield base


class Scene(BaseModel):
    colour: Literal["red", "green", "blue"]
    left: bool


def test_langchain_chat_with_image_parts_and_structured_output(url):
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="tiny-llava", base_url=url + "/v1", api_key="unused",
                     max_tokens=8, temperature=0, max_retries=0, timeout=60)  # fmt: skip
    message = HumanMessage(content=[
        {"type": "text", "text": "What colour is the square?"},
        {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
    ])  # fmt: skip
    reply = llm.invoke([SystemMessage(content="Answer briefly."), message])
    assert isinstance(reply.content, str)
    assert reply.usage_metadata["input_tokens"] > 16  # the image's visual tokens were counted
    streamed = "".join(chunk.content for chunk in llm.stream([message]))
    assert streamed == llm.invoke([message]).content

    structured = llm.model_copy(update={"max_tokens": 40}).with_structured_output(Scene)
    scene = structured.invoke([message])
    assert isinstance(scene, Scene) and scene.colour in ("red", "green", "blue")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)  # httpx sends only standard JSON
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _bad_bodies():
    good_message = {"role": "user", "content": "hi"}
    field_values = st.fixed_dictionaries({}, optional={
        "model": JSON_VALUES | st.just("tiny-llava"),
        "messages": JSON_VALUES | st.lists(st.just(good_message) | JSON_VALUES, max_size=2),
        "temperature": JSON_VALUES,
        "max_tokens": JSON_VALUES,
        "n": JSON_VALUES,
        "stop": JSON_VALUES,
        "stream": JSON_VALUES,
        "response_format": JSON_VALUES | st.just({"type": "json_schema", "json_schema": {"schema": 3}}),
    })  # fmt: skip
    image_parts = st.builds(
        lambda data, mime: {"model": "tiny-llava", "max_tokens": 2, "messages": [{"role": "user",
            "content": [{"type": "image_url", "image_url": {"url": f"data:{mime};base64,"
                         + base64.b64encode(data).decode()}}]}]},  # fmt: skip
        st.binary(max_size=300) | st.builds(lambda b, i: b[:i], st.just(png_bytes()), st.integers(0, 80)),
        st.sampled_from(["image/png", "image/jpeg", "text/plain"]),
    )
    raw = st.binary(max_size=200).map(lambda b: ("raw", b))
    return st.one_of(field_values.map(lambda d: ("json", d)), image_parts.map(lambda d: ("json", d)), raw)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=_bad_bodies())
def test_fuzzed_bodies_get_4xx_or_a_valid_answer(url, case):
    kind, value = case
    if kind == "raw":
        r = httpx.post(url + "/v1/chat/completions", content=value, timeout=60,
                       headers={"content-type": "application/json"})  # fmt: skip
    else:
        r = httpx.post(url + "/v1/chat/completions", json=value, timeout=60)
    if r.status_code == 200:  # a fuzzed body can be valid; then the answer must be too
        if r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]")
        else:
            assert r.json()["object"] == "chat.completion"
        return
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


@pytest.mark.parametrize("number", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_non_finite_numbers_get_400(url, number):
    """Python's json module reads these (non-standard) tokens; the server must not pass an
    infinite temperature on to the sampler."""
    fields = '"model": "tiny-llava", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]'
    body = "{" + fields + f', "temperature": {number}' + "}"
    r = httpx.post(url + "/v1/chat/completions", content=body, timeout=60,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert "temperature" in r.json()["error"]["message"] + str(r.json()["error"]["param"])


def test_server_survives_the_fuzz(url):
    # Runs after the fuzz in file order; on its own it is a plain liveness check.
    assert httpx.get(url + "/health").json()["status"] == "ok"
    body = {"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    assert json.loads(httpx.get(url + "/v1/models").text)["data"][0]["id"] == "tiny-llava"
