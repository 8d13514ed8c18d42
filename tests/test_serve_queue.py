"""`visto serve` under overload: requests beyond --max-concurrency wait in a bounded line,
first come first served; beyond --max-queue the answer is 429 with Retry-After; a client that
leaves the line frees its place. Over real HTTP with the official openai SDK.

To make "the slots are full" deterministic, a request whose text is HOLD keeps its slot (it
blocks before the model runs) until the test opens the gate; every other request runs the
real tiny LLaVA. The server records the order in which requests got past admission.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from test_serve_support import make_llava_checkpoint, running
from visto.cli import build_parser
from visto.commands.serve import build_app
from visto.errors import UserError

pytestmark = pytest.mark.timeout(120)

MODEL = "tiny-llava"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_llava_checkpoint(tmp_path_factory.mktemp("queue") / MODEL / "checkpoint")


class Gate:
    """Wraps the server's request preparation (the first step after admission): records each
    request's text in admission order, and holds HOLD requests until `open()`."""

    def __init__(self, server) -> None:
        self.admitted: list[str] = []
        self._open = threading.Event()
        prepare = server.prepare_chat

        def held(body):
            text = body.messages[-1].content
            self.admitted.append(text)
            if text == "HOLD":
                assert self._open.wait(60), "the test never opened the gate"
            return prepare(body)

        server.prepare_chat = held

    def open(self) -> None:
        self._open.set()


@contextlib.contextmanager
def serving(checkpoint, *flags: str) -> Iterator[tuple[str, Gate]]:
    app = build_app(build_parser().parse_args(["serve", "--model", str(checkpoint), *flags]))
    gate = Gate(app.state.server)
    with running(app) as url:
        try:
            yield url, gate
        finally:
            gate.open()


def sdk(url: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=retries, timeout=60)


def ask(url: str, text: str, retries: int = 0) -> str:
    out = sdk(url, retries).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=3
    )
    return out.choices[0].message.content


class Caller(threading.Thread):
    """`ask` in a thread; `.result` is the answer or the exception raised."""

    def __init__(self, url: str, text: str, retries: int = 0) -> None:
        super().__init__(daemon=True)
        self.args_, self.result = (url, text, retries), None
        self.start()

    def run(self) -> None:
        try:
            self.result = ask(*self.args_)
        except Exception as e:  # handed to the test
            self.result = e

    def answer(self) -> str:
        self.join(60)
        assert isinstance(self.result, str), f"request failed: {self.result!r}"
        return self.result


def health(url: str) -> dict:
    return httpx.get(url + "/health").json()


def wait_for(url: str, timeout: float = 20.0, **expected: int) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = health(url)
        if all(now[k] == v for k, v in expected.items()):
            return
        time.sleep(0.02)
    pytest.fail(f"the server never reached {expected}: {health(url)}")


def metric(url: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in httpx.get(url + "/metrics").text.splitlines()
               if line.startswith(name))  # fmt: skip


def test_the_line_is_bounded_and_429_says_when_to_retry(checkpoint):
    with serving(checkpoint, "--max-concurrency", "1", "--max-queue", "2") as (url, gate):
        holder = Caller(url, "HOLD")
        wait_for(url, in_flight=1)
        queued = [Caller(url, "the red"), None]
        wait_for(url, waiting=1)
        queued[1] = Caller(url, "the blue")
        wait_for(url, waiting=2)
        with pytest.raises(openai.RateLimitError, match="--max-queue 2") as refused:
            ask(url, "the green")
        assert refused.value.response.headers["retry-after"] == "1"
        assert metric(url, "visto_requests_waiting") == 2
        gate.open()
        for caller in (holder, *queued):
            caller.answer()
        wait_for(url, in_flight=0, waiting=0)
        assert gate.admitted == ["HOLD", "the red", "the blue"]  # the refused one never ran
        assert metric(url, "visto_requests_rejected_total") == 1
        assert metric(url, "visto_queue_wait_seconds_count") == 3


def test_waiting_requests_are_served_first_come_first_served(checkpoint):
    texts = ["the red", "the blue square", "the green", "left of the circle"]
    with serving(checkpoint, "--max-concurrency", "1", "--max-queue", "8") as (url, gate):
        callers = [Caller(url, "HOLD")]
        wait_for(url, in_flight=1)
        for i, text in enumerate(texts):
            callers.append(Caller(url, text))
            wait_for(url, waiting=i + 1)  # arrival order is the order they were sent
        gate.open()
        answers = [c.answer() for c in callers]
        assert gate.admitted == ["HOLD", *texts]
        # Waiting changed nothing in the answers: each equals the same request asked alone.
        assert answers[1:] == [ask(url, text) for text in texts]


def test_a_client_that_leaves_the_line_frees_its_place(checkpoint):
    with serving(checkpoint, "--max-concurrency", "1", "--max-queue", "1") as (url, gate):
        holder = Caller(url, "HOLD")
        wait_for(url, in_flight=1)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "leaves"}]}
        with pytest.raises(httpx.ReadTimeout):  # it waits in line, then hangs up
            httpx.post(url + "/v1/chat/completions", json=body, timeout=1.0)
        wait_for(url, waiting=0)
        assert metric(url, 'visto_requests_cancelled_total{reason="client_disconnected"}') == 1
        stays = Caller(url, "the red")  # the freed place takes it: queued, not refused
        wait_for(url, waiting=1)
        gate.open()
        holder.answer(), stays.answer()
        assert gate.admitted == ["HOLD", "the red"]
        wait_for(url, in_flight=0, waiting=0)


def test_the_sdk_retry_honours_retry_after(checkpoint):
    # --max-queue 0: a full server refuses at once; the SDK's own retry loop waits the
    # Retry-After second and gets in once the slot is free.
    with serving(checkpoint, "--max-concurrency", "1", "--max-queue", "0") as (url, gate):
        holder = Caller(url, "HOLD")
        wait_for(url, in_flight=1)
        start = time.monotonic()
        patient = Caller(url, "the red", retries=3)
        deadline = time.monotonic() + 20
        while metric(url, "visto_requests_rejected_total") < 1:
            assert time.monotonic() < deadline, "the request was never refused"
            time.sleep(0.02)
        gate.open()
        holder.answer(), patient.answer()
        assert time.monotonic() - start >= 1.0  # it waited as told, not its own backoff
        assert gate.admitted[-1] == "the red"


def test_waiting_counts_against_the_timeout(checkpoint):
    with serving(checkpoint, "--max-concurrency", "1", "--timeout", "0.5") as (url, gate):
        holder = Caller(url, "HOLD")
        wait_for(url, in_flight=1)
        with pytest.raises(openai.APIStatusError) as late:
            ask(url, "the red")
        assert late.value.status_code == 504 and "--timeout" in late.value.message
        assert gate.admitted == ["HOLD"]
        gate.open()
        holder.join(30)
        wait_for(url, in_flight=0, waiting=0)


def test_max_queue_must_not_be_negative(checkpoint):
    with pytest.raises(UserError, match="--max-queue"):
        build_app(build_parser().parse_args(
            ["serve", "--model", str(checkpoint), "--max-queue", "-1"]))  # fmt: skip


def test_a_slot_handed_to_a_request_as_it_leaves_passes_to_the_next():
    import asyncio

    from visto.serve.admission import Admission

    async def scenario() -> tuple[int, int]:
        async def present() -> bool:
            return False

        far = time.monotonic() + 60
        line = Admission(max_running=1, max_queued=2, poll_s=0.01)
        await line.acquire(present, far)
        leaving = asyncio.create_task(line.acquire(present, far))
        staying = asyncio.create_task(line.acquire(present, far))
        await asyncio.sleep(0.05)
        assert line.waiting == 2
        line.release()  # the slot goes to `leaving`...
        leaving.cancel()  # ...whose handler is cancelled before it can use it
        await asyncio.wait_for(staying, 5)
        return line.running, line.waiting

    assert asyncio.run(scenario()) == (1, 0)
