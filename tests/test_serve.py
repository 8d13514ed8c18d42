"""`visto serve` over real HTTP: the official openai SDK and raw httpx against uvicorn on
127.0.0.1, serving a tiny LLaVA, a tiny CLIP and an index, all saved and loaded as checkpoints."""

from __future__ import annotations

import base64
import http.server
import json
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from test_serve_support import (
    data_url,
    make_clip_checkpoint,
    make_index,
    make_llava_checkpoint,
    png_bytes,
    running,
)
from visto.cli import build_parser
from visto.commands.serve import build_app

pytestmark = pytest.mark.timeout(300)

SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "enum": [0, 1, 2, 3]},
        "left": {"type": "boolean"},
    },
    "required": ["colour", "count", "left"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    llava = make_llava_checkpoint(root / "tiny-llava" / "checkpoint")
    clip = make_clip_checkpoint(root / "tiny-clip" / "checkpoint")
    images = make_index(root / "db", clip, root / "images")
    return {"root": root, "llava": llava, "clip": clip, "db": root / "db", "images": images}


def app_for(files, *extra: str):
    args = build_parser().parse_args(
        ["serve", "--model", str(files["llava"]), "--clip", str(files["clip"]),
         "--db", str(files["db"]), *extra]  # fmt: skip
    )
    return build_app(args)


@pytest.fixture(scope="module")
def url(files):
    with running(app_for(files, "--batch-wait-ms", "30")) as base:
        yield base


@pytest.fixture()
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def image_part(colour=(200, 40, 40), size=(24, 16)):
    return {"type": "image_url", "image_url": {"url": data_url(png_bytes(colour, size)),
                                               "detail": "low"}}  # fmt: skip


def conversation():
    return [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": [image_part(), {"type": "text", "text": "the red square"}]},
        {"role": "assistant", "content": "is left"},
        {"role": "user", "content": [{"type": "text", "text": "and this?"},
                                     image_part((30, 30, 220)), image_part((30, 200, 30))]},  # fmt: skip
    ]


def test_models_and_health(url, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-llava", "tiny-clip"]
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["models"] == ids


def test_chat_plain_seeded_and_n(client):
    kw = dict(model="tiny-llava", messages=conversation(), max_tokens=8, temperature=1.0, seed=7)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content  # seeded: reproducible
    assert a.choices[0].finish_reason in ("stop", "length")
    assert a.usage.prompt_tokens > 3 * 16  # three images of 16 visual tokens each
    assert 1 <= a.usage.completion_tokens <= 8
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    many = client.chat.completions.create(**{**kw, "n": 3})
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].message.content == a.choices[0].message.content  # choice i: seed + i
    # max_completion_tokens wins over max_tokens
    short = client.chat.completions.create(**{**kw, "max_completion_tokens": 1})
    assert short.usage.completion_tokens == 1


def test_stream_with_usage_matches_the_plain_answer(url, client):
    kw = dict(model="tiny-llava", messages=conversation(), max_tokens=12)
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens
    # On the wire: data: lines, the last one [DONE].
    with httpx.stream("POST", url + "/v1/chat/completions", json={**kw, "stream": True},
                      timeout=60) as r:  # fmt: skip
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert "usage" not in json.loads(lines[0][6:])  # only with stream_options.include_usage


def test_json_schema_and_json_object_are_always_valid(client):
    for seed in range(3):
        out = client.chat.completions.create(
            model="tiny-llava", messages=conversation(), max_tokens=60, temperature=1.0, seed=seed,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "scene", "schema": SCHEMA, "strict": True}},
        )  # fmt: skip
        assert out.choices[0].finish_reason == "stop"
        content = out.choices[0].message.content
        # Compact, as the world's JSON answers are written: ',' and ':' with no spaces.
        assert content == json.dumps(json.loads(content), separators=(",", ":"))
        value = json.loads(content)
        assert set(value) == {"colour", "count", "left"}
        assert value["colour"] in ("red", "green", "blue") and value["count"] in (0, 1, 2, 3)
        assert isinstance(value["left"], bool)
    # json_object: any JSON object; whatever was generated within max_tokens is a valid prefix,
    # and a finished answer parses.
    out = client.chat.completions.create(
        model="tiny-llava", messages=conversation(), max_tokens=120,
        response_format={"type": "json_object"},
    )  # fmt: skip
    content = out.choices[0].message.content
    assert content.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


def test_embeddings_text_and_images(url, client):
    res = client.embeddings.create(model="tiny-clip", input=["a red square", "a blue circle"])
    vectors = np.array([d.embedding for d in res.data])  # the SDK asked for base64 and decoded it
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    body = {"model": "tiny-clip", "encoding_format": "float",
            "input": ["a red square", image_part(), {"type": "text", "text": "a blue circle"}]}
    r = httpx.post(url + "/v1/embeddings", json=body, timeout=60)
    assert r.status_code == 200
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    assert got.shape == (3, 32)
    np.testing.assert_allclose(got[[0, 2]], vectors, atol=1e-5)  # same text, same vector


def test_search_by_text_and_by_image(url, files):
    r = httpx.post(url + "/v1/search", json={"query": "a red square", "k": 3, "thumbnails": True},
                   timeout=60)  # fmt: skip
    hits = r.json()["data"]
    assert r.status_code == 200 and [h["rank"] for h in hits] == [1, 2, 3]
    assert all(h["thumbnail"].startswith("data:image/png;base64,") for h in hits)
    query = data_url(Path(files["images"][2]).read_bytes())
    top = httpx.post(url + "/v1/search", json={"image_url": query, "k": 1}, timeout=60).json()
    assert top["data"][0]["path"] == str(files["images"][2].resolve())
    assert top["data"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def bomb_png(width: int = 5000, height: int = 5000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_errors_have_the_openai_shape(url, client):
    def post(body, path="/v1/chat/completions", **kw):
        r = httpx.post(url + path, timeout=60, **({"json": body} if body is not None else kw))
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        return r.status_code, error

    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=msgs)
    assert post(None, content=b'{"model": "tiny-llava", "messages": [',
                headers={"content-type": "application/json"})[0] == 400  # fmt: skip
    status, error = post({"model": "tiny-llava", "messages": msgs, "temperature": "hot"})
    assert status == 400 and error["param"] == "temperature"
    status, error = post({"model": "tiny-llava", "messages": [{"role": "user", "content": 5}]})
    assert status == 400 and error["param"].startswith("messages[0].content")

    def with_image(url_: str):
        return {"model": "tiny-llava", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url_}}]}]}  # fmt: skip

    status, error = post(with_image(data_url(b"not an image at all")))
    assert status == 400 and error["param"] == "messages[0].content[0].image_url"
    assert post(with_image("data:image/png;base64,@@@not base64"))[0] == 400
    status, error = post(with_image(data_url(bomb_png())))
    assert status == 400 and "pixels" in error["message"]
    status, error = post(with_image("http://example.com/cat.png"))
    assert status == 400 and "--allow-remote-images" in error["message"]
    many = [image_part() for _ in range(9)]
    status, error = post({"model": "tiny-llava", "messages": [{"role": "user", "content": many}]})
    assert status == 400 and error["code"] == "too_many_images"
    status, error = post({"model": "tiny-llava", "messages": msgs, "max_tokens": 10_000})
    assert status == 400 and error["code"] == "context_length_exceeded"
    r = httpx.post(url + "/v1/chat/completions", content=b"x" * (25 * 1024 * 1024), timeout=60,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    status, error = post({"model": "nope", "input": "x"}, "/v1/embeddings")
    assert status == 404
    # ...and the server still answers.
    assert client.chat.completions.create(model="tiny-llava", messages=msgs, max_tokens=2)


def test_concurrent_requests_are_batched_and_match_single_runs(url, client):
    prompts = [f"the {w} square" for w in ("red", "green", "blue", "red red")]
    singles = [client.chat.completions.create(
        model="tiny-llava", messages=[{"role": "user", "content": p}], max_tokens=6
    ).choices[0].message.content for p in prompts]  # fmt: skip
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        out = c.chat.completions.create(
            model="tiny-llava", messages=[{"role": "user", "content": prompts[i]}], max_tokens=6
        )
        results[i] = out.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(len(prompts))] == singles
    metrics = httpx.get(url + "/metrics").text
    batched = [line for line in metrics.splitlines() if line.startswith("visto_batch_rows_bucket")]
    le1 = next(float(line.split()[-1]) for line in batched if 'le="1.0"' in line)
    total = next(float(line.split()[-1]) for line in batched if 'le="+Inf"' in line)
    assert total > le1, "no batch held more than one request"


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))  # fmt: skip


def test_client_disconnect_stops_the_generation(url):
    before = httpx.get(url + "/metrics").text
    body = {"model": "tiny-llava", "messages": [{"role": "user", "content": "the red"}],
            "max_tokens": 480, "stream": True, "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        next(r.iter_lines())  # the first chunk arrives; then the client hangs up
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = httpx.get(url + "/metrics").text
        if metric(now, 'visto_requests_cancelled_total{reason="client_disconnected"}') > metric(
            before, 'visto_requests_cancelled_total{reason="client_disconnected"}'
        ) and httpx.get(url + "/health").json()["busy_rows"] == 0:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the disconnected stream was not cancelled")
    assert httpx.get(url + "/health").json()["in_flight"] == 0



def test_client_disconnect_stops_a_plain_request_too(files, tmp_path):
    # Not streamed: the handler polls request.is_disconnected() (blind before the API-key and
    # metrics middleware became plain ASGI), and stops the job when its client has gone.
    # The job must outlive the client's 0.3 s and the handler's 0.25 s poll on any machine:
    # 480 tokens x 8 rows took 0.71 s here and finished first on a faster CI machine, so a
    # 4,096-position model writes 4,000 tokens x 8 rows (about 6 s here).
    long = make_llava_checkpoint(tmp_path / "tiny-llava" / "checkpoint", context=4096)
    with running(app_for({**files, "llava": long}, "--batch-wait-ms", "30")) as url:
        abandon_a_plain_request(url)


def abandon_a_plain_request(url: str) -> None:
    name = 'visto_requests_cancelled_total{reason="client_disconnected"}'
    before = metric(httpx.get(url + "/metrics").text, name)
    body = {"model": "tiny-llava", "messages": [{"role": "user", "content": "the red"}],
            "max_tokens": 4000, "n": 8, "ignore_eos": True}  # fmt: skip
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if metric(httpx.get(url + "/metrics").text, name) > before:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the abandoned request was not cancelled")
    while httpx.get(url + "/health").json()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(url + "/health").json()["in_flight"] == 0

def test_api_key_and_concurrency_limit(files):
    app = app_for(files, "--api-key", "sekret", "--max-concurrency", "1", "--max-queue", "0")
    with running(app) as base:
        msgs = [{"role": "user", "content": "the red"}]
        r = httpx.post(base + "/v1/chat/completions", json={"model": "tiny-llava", "messages": msgs})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=base + "/v1", api_key="sekret", max_retries=0, timeout=30)
        assert client.models.list().data
        # One long stream holds the only slot and nothing may wait, so the next request gets 429.
        stream = client.chat.completions.create(
            model="tiny-llava", messages=msgs, max_tokens=480, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="tiny-llava", messages=msgs, max_tokens=2)
        assert info.value.response.headers["retry-after"] == "1"  # the SDK waits that long
        stream.close()


def test_timeout_answers_504_and_ends_streams_with_an_error(files):
    with running(app_for(files, "--timeout", "0.05")) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=30)
        kw = dict(model="tiny-llava", messages=[{"role": "user", "content": "the red"}],
                  max_tokens=480, extra_body={"ignore_eos": True})  # fmt: skip
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(**kw)
        assert info.value.status_code == 504
        with pytest.raises(openai.APIError, match="timeout"):
            for _ in client.chat.completions.create(**kw, stream=True):
                pass
        deadline = time.monotonic() + 10
        while httpx.get(base + "/health").json()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(base + "/health").json()["in_flight"] == 0


class _PNGHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        data = png_bytes((10, 200, 10))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_remote_images_only_from_allowed_hosts(files):
    source = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PNGHandler)
    threading.Thread(target=source.serve_forever, daemon=True).start()
    image_url = f"http://127.0.0.1:{source.server_address[1]}/green.png"
    body = {"model": "tiny-llava", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}}]}]}  # fmt: skip
    try:
        with running(app_for(files, "--allow-remote-images", "--allowed-hosts", "127.0.0.1")) as b:
            assert httpx.post(b + "/v1/chat/completions", json=body, timeout=60).status_code == 200
            other = json.loads(json.dumps(body).replace("127.0.0.1", "localhost"))
            r = httpx.post(b + "/v1/chat/completions", json=other, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["code"] == "image_host_not_allowed"
    finally:
        source.shutdown()


def test_embedding_vectors_decode_from_base64(url):
    body = {"model": "tiny-clip", "input": "a red square", "encoding_format": "base64"}
    data = httpx.post(url + "/v1/embeddings", json=body, timeout=60).json()["data"][0]
    vector = np.frombuffer(base64.b64decode(data["embedding"]), dtype="<f4")
    assert vector.shape == (32,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-4
