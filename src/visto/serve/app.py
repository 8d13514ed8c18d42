"""The OpenAI-compatible HTTP API over visto's engine, two-tower model and vector store.

    app = create_app(ServedModels(chat=ChatModel.from_model(model, "llava")), ServeSettings())
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints (all JSON; errors in OpenAI's `{"error": {...}}` shape, see errors.py):

    GET  /health                  liveness, requests in flight and waiting, queue depth
    GET  /metrics                 Prometheus text
    GET  /v1/models               the served model ids
    POST /v1/chat/completions     text + images in, text out; streaming (SSE); n; seed; stop;
                                  response_format json_object / json_schema (grammar-constrained);
                                  tools / tool_choice (function calling, tools.py)
    POST /v1/embeddings           texts and images -> unit vectors (two-tower model)
    POST /v1/search               text or image -> top-k images of the index
    GET  /                        the web page (static/)

The server knows HTTP; it calls the layers below (processor, engine, embedder, store) and
nothing calls it. A chat request first takes one of --max-concurrency slots, waiting in line
for one (up to --max-queue requests wait; admission.py); then it becomes a `Job` for the
batcher's worker thread (batching.py); the handler awaits the job's events and writes them
out, so the event loop is never blocked by the model.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from visto.data.sample import Sample
from visto.data.tokenizer import LocText, loc_to_text
from visto.data.tool_calls import with_tools
from visto.errors import UserError
from visto.serve.admission import Admission, LeftQueue, QueueFull
from visto.serve.batching import Batcher, Job
from visto.serve.content import ImagePolicy, embedding_inputs, load_image, messages_to_turns
from visto.serve.errors import APIError, error_body, error_response, install_error_handlers
from visto.serve.metrics import Metrics
from visto.serve.schemas import (
    MAX_SEED,
    ChatCompletionRequest,
    EmbeddingRequest,
    SearchRequest,
)
from visto.serve.tools import ToolCallStream, ToolPlan, answer_message, tool_plan
from visto.tasks.runner import NO_CUT, AnswerTokenizer, context_length
from visto.tools.loop import ToolRound, run_tool_calls

STATIC_DIR = Path(__file__).parent / "static"


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ServeSettings:
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer KEY"
    max_concurrency: int = 32  # chat requests in flight at once (being prepared, batched, run)
    max_queue: int = 64  # chat requests waiting in line for a slot; more -> 429 + Retry-After
    max_batch: int = 8  # rows (requests x n) per batched generation
    batch_wait_ms: float = 5.0  # how long the batcher waits for more requests to join a batch
    timeout_s: float = 120.0  # per chat request, from arrival (waiting included) to the last token
    max_body_bytes: int = 24 * 1024 * 1024  # larger bodies -> 413
    default_max_tokens: int = 256  # when the request gives no max_tokens
    max_n: int = 8  # choices per request
    images: ImagePolicy = field(default_factory=ImagePolicy)


@dataclass
class ChatModel:
    """A generative model (engine protocol: prefill/decode_step) with its processor."""

    model: Any
    processor: Any
    name: str
    accepts_images: bool
    context_length: int
    vocab_size: int

    @classmethod
    def from_model(cls, model: Any, name: str, processor: Any = None) -> ChatModel:
        from visto.nn.language import DecoderLM

        processor = processor if processor is not None else getattr(model, "processor", None)
        if processor is None:
            raise UserError(f"model {name} carries no processor (tokenizer, chat template)")
        if not (hasattr(model, "prefill") and hasattr(model, "decode_step")):
            raise UserError(
                f"model {name} ({getattr(model, 'family', type(model).__name__)}) cannot generate "
                "text: chat needs a generative family such as llava (a CLIP checkpoint goes to --clip)"
            )
        # The logits' width: the output head's rows (the tokenizer may be smaller).
        heads = [m for n, m in model.named_modules() if n.endswith("lm_head")]
        vocab = heads[0].out_features if heads else processor.tokenizer.vocab_size
        return cls(
            model=model,
            processor=processor,
            name=name,
            # A plain decoder would read <image> placeholders as ordinary tokens.
            accepts_images=not isinstance(model, DecoderLM),
            context_length=context_length(model),  # chat and eval enforce the same
            vocab_size=int(vocab),
        )


@dataclass
class ServedModels:
    chat: ChatModel | None = None
    embedder: Any = None  # visto.index.Embedder (name, dim, embed_images, embed_texts)
    embedder_name: str | None = None  # the id clients use; default embedder.name
    store: Any = None  # visto.index.VectorStore
    tools: Any = None  # visto.tools.ToolRegistry: tools the server runs itself (--tools)

    def __post_init__(self) -> None:
        if self.chat is None and self.embedder is None:
            raise UserError("nothing to serve: give a chat model (--model) or a two-tower (--clip)")
        if self.store is not None:
            if self.embedder is None:
                raise UserError("search needs the index's embedding model (--clip)")
            if self.embedder.name != self.store.model:
                raise UserError(
                    f"the index at {self.store.path} was built with {self.store.model!r}, but "
                    f"--clip is {self.embedder.name!r}: their vectors are not comparable; pass "
                    "the checkpoint that built the index"
                )
        if self.embedder is not None and self.embedder_name is None:
            self.embedder_name = self.embedder.name


# ----------------------------------------------------------------------------- middleware


class BodyLimit:
    """413 for bodies over `limit` bytes: by Content-Length up front, else while reading."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is larger than this server's limit of {self.limit:,} bytes"
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await error_response(413, message)(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    # An HTTPException passes through FastAPI's body parsing unchanged.
                    raise StarletteHTTPException(413, message)
            return msg

        await self.app(scope, limited, send)


class Observe:
    """Checks the API key on /v1/* and counts and times every request by endpoint and status.

    Plain ASGI rather than Starlette's `@app.middleware("http")`: that one wraps `receive` so
    that `request.is_disconnected()` never sees a client leave, and requests waiting in line
    or for their completion poll it to give up their place when their client has gone.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, api_key: str | None) -> None:
        self.app, self.metrics, self.api_key = app, metrics, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"
        if self.api_key and path.startswith("/v1/"):
            given = Headers(scope=scope).get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                self.metrics.requests.labels(endpoint, "401").inc()
                response = error_response(
                    401,
                    "missing or wrong API key: send the header 'Authorization: Bearer KEY' "
                    "with the key the server was started with (--api-key)",
                    None,
                    "invalid_api_key",
                )
                return await response(scope, receive, send)

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, observed)


@dataclass
class ChatRound:
    """What one generation of a chat request needs: the prompts (one per choice), their
    sampling params, and the tool plan its answers are read with. A request whose answer calls
    the server's own tools (--tools) has several rounds (visto.tools.loop)."""

    prompts: list[Any]
    params: list[Any]
    prompt_tokens: int
    plan: ToolPlan | None
    turns: list[Any]  # the conversation, for the tool loop's next round
    images: list[Any]


# ----------------------------------------------------------------------------- the server


class Server:
    """Everything one app serves with; handlers are its methods."""

    def __init__(self, models: ServedModels, settings: ServeSettings) -> None:
        self.models, self.settings = models, settings
        self.metrics = Metrics()
        self.admission = Admission(settings.max_concurrency, settings.max_queue)
        self.metrics.in_flight.set_function(lambda: self.admission.running)
        self.metrics.waiting.set_function(lambda: self.admission.waiting)
        self.started = int(time.time())
        self.embed_lock = threading.Lock()  # one embedding/search computation at a time
        self.batcher: Batcher | None = None
        self.grammars: Any = None
        chat = models.chat
        # answers show boxes as "[x1, y1, x2, y2]" (0..999), never as location tokens
        self.loc_bins = chat.processor.tokenizer.loc_bins if chat is not None else 0
        if chat is not None:
            from visto.infer import Engine

            tokenizer = AnswerTokenizer(chat.processor.tokenizer)
            self.engine = Engine(chat.model, tokenizer)
            collator = chat.processor.collator(padding_side="left")
            device = self.engine.device

            def collate(items: list[Any]) -> Any:
                return collator(items).to(device)

            self.batcher = Batcher(
                self.engine,
                collate,
                max_batch=settings.max_batch,
                wait_s=settings.batch_wait_ms / 1000,
                on_batch=self.metrics.batch_rows.observe,
            )

    # ---- model lookup ----------------------------------------------------------------

    def model_ids(self) -> list[str]:
        ids = [self.models.chat.name] if self.models.chat else []
        return ids + ([self.models.embedder_name] if self.models.embedder is not None else [])

    def _unknown_model(self, name: str, kind: str) -> APIError:
        return APIError(
            404,
            f"the model {name!r} does not exist on this server; {kind} models here: "
            f"{self.model_ids() or 'none'} (GET /v1/models)",
            "model",
            "model_not_found",
        )

    def chat_model(self, name: str) -> ChatModel:
        chat = self.models.chat
        if chat is None:
            raise APIError(404, "this server has no chat model (start it with --model CKPT)",
                           "model", "model_not_found")
        if name != chat.name:
            raise self._unknown_model(name, "chat")
        return chat

    def grammar_factory(self) -> Any:
        if self.grammars is None:
            from visto.serve.grammar import GrammarFactory

            chat = self.models.chat
            assert chat is not None
            self.grammars = GrammarFactory(
                chat.processor.tokenizer, chat.vocab_size, list(self.engine.eos_token_ids)
            )
        return self.grammars

    # ---- chat ------------------------------------------------------------------------

    def _check_supported(self, body: ChatCompletionRequest, plan: ToolPlan | None) -> None:
        if plan is not None and plan.server_run and plan.calls and body.n > 1:
            raise APIError(400, "with the server's own tools (--tools) a request has one choice: "
                           "send n 1 (or tool_choice none)", "n")  # fmt: skip
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", "logprobs")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(body, name) not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported (only 0)", name)
        if body.n > self.settings.max_n:
            raise APIError(400, f"n is {body.n}; this server allows at most {self.settings.max_n}",
                           "n")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", "stop")
        fmt = body.response_format
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
            raise APIError(400, "response_format json_schema needs a json_schema object "
                           '{"name": ..., "schema": {...}}', "response_format.json_schema")

    def prepare_chat(self, body: ChatCompletionRequest) -> ChatRound:
        """The request's first round: prompts and sampling params; runs in a worker thread."""
        chat = self.chat_model(body.model)
        tools = self.models.tools
        plan = tool_plan(body, tools.openai() if tools is not None else [])
        self._check_supported(body, plan)
        turns, images = messages_to_turns(body.messages, self.settings.images, self.loc_bins)
        turns = with_tools(turns, plan.offered if plan else None)
        if images and not chat.accepts_images:
            raise APIError(400, f"the model {chat.name!r} reads text only; send no image_url parts",
                           "messages", "images_not_supported")
        return self.encode_round(body, turns, images, plan)

    def run_server_tools(self, ready: ChatRound, text: str) -> ToolRound | None:
        """Runs the server's own tools that `text` calls on the latest image (worker thread)."""
        if self.models.tools is None or ready.plan is None or not ready.plan.calls:
            return None
        return run_tool_calls(text, self.models.tools, ready.images[-1] if ready.images else None)

    def next_round(self, body: ChatCompletionRequest, ready: ChatRound, done: ToolRound,
                   index: int) -> ChatRound:
        """Round `index` of the tool loop: the conversation with the calls and their results."""
        assert ready.plan is not None
        plan = ready.plan.after_tool_round(index)
        return self.encode_round(body, [*ready.turns, *done.turns()], ready.images, plan)

    def encode_round(self, body: ChatCompletionRequest, turns: list[Any], images: list[Any],
                     plan: ToolPlan | None) -> ChatRound:
        from visto.infer import SamplingParams

        chat = self.chat_model(body.model)
        try:  # not cut at the processor's max_length (training's): the context decides
            encoded = chat.processor.encode(Sample("request", images, turns), max_length=NO_CUT,
                                            train=False)  # fmt: skip
        except ValueError as e:  # the processor's own consistency checks
            raise APIError(400, str(e), "messages") from None
        prompt_tokens = int(encoded.input_ids.shape[0])
        room = chat.context_length - prompt_tokens
        # OpenAI's words and code, which clients (LangChain) recognise
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {chat.context_length} "
                           f"tokens (GET /v1/models: context_length). However, your messages "
                           f"resulted in {prompt_tokens} tokens (images included). Please reduce "
                           "the length of the messages.", "messages", "context_length_exceeded")
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and asked > room:
            raise APIError(400, f"This model's maximum context length is {chat.context_length} "
                           f"tokens. However, you requested {prompt_tokens + asked} tokens "
                           f"({prompt_tokens} in the messages, {asked} in the completion). Please "
                           f"reduce the length of the messages or completion (max_tokens at most "
                           f"{room}).", "max_tokens", "context_length_exceeded")  # fmt: skip
        max_new = asked or min(self.settings.default_max_tokens, room)
        compiled = None
        fmt = body.response_format
        fmt = fmt.model_dump(by_alias=True, exclude_none=True) if fmt is not None else None
        if plan is not None and plan.calls:  # calls decode under their tools' schemas
            # the answer: calls, or (auto) the response_format's JSON (or free text)
            compiled = self.grammar_factory().compile_tool_calls(plan, fmt)
        elif fmt is not None and fmt["type"] != "text":
            compiled = self.grammar_factory().compile(fmt)
        if compiled is not None:
            # the answer closes within max_tokens (infer/constrain.py), given room to close at all
            fewest = self.grammar_factory().fewest_tokens(compiled)
            if fewest is not None and max_new < fewest:
                raise APIError(400, f"max_tokens {max_new} is too few for this answer's grammar "
                               f"(response_format or tool calls): closing it takes {fewest} "
                               "tokens; ask for more", "max_tokens")  # fmt: skip
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = []
        for choice in range(body.n):
            constraint = (
                self.grammar_factory().constraint(compiled) if compiled is not None else None
            )
            params.append(SamplingParams(
                max_new_tokens=max_new,
                # visto's small models answer best greedily: temperature defaults to 0.
                temperature=body.temperature or 0.0,
                top_p=body.top_p if body.top_p is not None else 1.0,
                stop=tuple(stops),
                # n choices of one seeded request differ, and each is reproducible.
                seed=None if body.seed is None else (body.seed + choice) % (MAX_SEED + 1),
                ignore_eos=body.ignore_eos,  # eos neither ends nor is chosen (batched, fast)
                logits_processor=constraint,
            ))
        return ChatRound([encoded] * body.n, params, prompt_tokens, plan, turns, images)

    @property
    def in_flight(self) -> int:
        return self.admission.running

    async def admit(self, request: Request, deadline: float) -> None:
        """Take a slot for a chat request, waiting in line for one; 429 when the line is full."""
        arrived = time.perf_counter()
        try:
            await self.admission.acquire(request.is_disconnected, deadline)
        except QueueFull:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is busy ({self.admission.running} requests in "
                           f"flight, {self.admission.waiting} waiting; limits --max-concurrency "
                           f"{self.settings.max_concurrency}, --max-queue "
                           f"{self.settings.max_queue}); retry after the Retry-After seconds",
                           None, "server_busy") from None
        except LeftQueue as left:
            self.metrics.cancelled.labels(left.reason).inc()
            if left.reason == "timeout":
                raise self._timeout_error() from None
            raise APIError(499, "the client closed the connection") from None
        self.metrics.queue_wait_seconds.observe(time.perf_counter() - arrived)

    def release(self) -> None:
        self.admission.release()

    def submit(self, prompts: list[Any], params: list[Any], deadline: float) -> Job:
        assert self.batcher is not None
        job = Job(prompts, params, asyncio.get_running_loop(), deadline=deadline)
        self.batcher.submit(job)
        self.metrics.queue_depth.set(self.batcher.queue_depth)
        return job

    def _stop(self, job: Job, reason: str) -> None:
        if not job.cancelled.is_set():
            job.cancelled.set()
            self.metrics.cancelled.labels(reason).inc()

    def _timeout_error(self) -> APIError:
        return APIError(504, f"the request took longer than this server's timeout of "
                        f"{self.settings.timeout_s:g} s (--timeout)", None, "timeout")

    @staticmethod
    def _engine_error(exc: Exception) -> APIError:
        if isinstance(exc, UserError):
            return APIError(400, str(exc))
        return APIError(500, f"generation failed: {type(exc).__name__}: {exc}")

    def _account(self, job: Job, prompt_tokens: int, completions: list[Any], start: float) -> int:
        generated = sum(len(c.token_ids) for c in completions)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.completion_tokens.inc(generated)
        self.metrics.generation_seconds.observe(time.perf_counter() - start)
        return generated

    async def wait_done(self, job: Job, request: Request) -> list[Any]:
        """The completions of a non-streamed job; stops it if the client leaves or time runs out."""
        while True:
            remaining = job.deadline - time.monotonic()
            if remaining <= 0:
                self._stop(job, "timeout")
                raise self._timeout_error()
            try:
                event = await asyncio.wait_for(job.events.get(), min(remaining, 0.25))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self._stop(job, "client_disconnected")
                    raise APIError(499, "the client closed the connection") from None
                continue
            if event[0] == "done":
                return event[1]
            if event[0] == "error":
                raise self._engine_error(event[1])

    def boxes(self, text: str) -> list[list[int]]:
        assert self.models.chat is not None
        return self.models.chat.processor.tokenizer.parse_boxes(text)

    def completion_body(self, body: ChatCompletionRequest, completions: list[Any],
                        prompt_tokens: int, generated: int, plan: ToolPlan | None = None,
                        tool_runs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        choices = [self._choice(i, c, plan) for i, c in enumerate(completions)]
        if self.models.tools is not None:
            # visto's extension: the server's own tools that ran, with their results, in order
            choices[0]["tool_runs"] = tool_runs or []
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model,
            "system_fingerprint": None,
            "choices": choices,
            "usage": _usage(prompt_tokens, generated),
        }

    def _choice(self, i: int, completion: Any, plan: ToolPlan | None) -> dict[str, Any]:
        message, finish_reason = answer_message(completion.text, completion.finish_reason, plan)
        if message["content"]:
            message["content"] = loc_to_text(message["content"], self.loc_bins)
        return {"index": i, "message": message, "finish_reason": finish_reason, "logprobs": None,
                # visto's extension: boxes in the answer, [x1, y1, x2, y2] in 0..999.
                "boxes": self.boxes(message["content"] or "")}  # fmt: skip

    async def stream_chat(self, job: Job, body: ChatCompletionRequest, ready: ChatRound,
                          start: float) -> AsyncIterator[str]:
        """OpenAI's chat.completion.chunk events, then `data: [DONE]`. When the answer calls the
        server's own tools, a chunk reports their runs (`tool_runs`) and the next round's
        answer streams on in the same choice."""
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        finished = False
        prompt_tokens = generated = rounds = 0

        def call_streams(plan: ToolPlan | None) -> list[ToolCallStream] | None:
            # With tools, a call's text is held back and sent as tool_calls deltas at the end.
            return [ToolCallStream(plan) for _ in range(body.n)] if plan and plan.calls else None

        calls = call_streams(ready.plan)
        texts = [LocText(self.loc_bins) for _ in range(body.n)]  # location tokens as boxes

        def chunk(choices: list[dict[str, Any]], usage: Any = None) -> str:
            data: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk",
                                    "created": created, "model": body.model,
                                    "system_fingerprint": None, "choices": choices}
            if include_usage:
                data["usage"] = usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        try:
            for i in range(body.n):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
            while True:
                remaining = job.deadline - time.monotonic()
                try:
                    if remaining <= 0:
                        raise asyncio.TimeoutError
                    event = await asyncio.wait_for(job.events.get(), remaining)
                except asyncio.TimeoutError:
                    self._stop(job, "timeout")
                    yield f"data: {json.dumps(self._timeout_error().body())}\n\n"
                    break
                if event[0] == "piece":
                    _, i, text = event
                    text = texts[i].feed(calls[i].feed(text) if calls else text)
                    if text:
                        yield chunk([{"index": i, "delta": {"content": text}, "logprobs": None,
                                      "finish_reason": None}])
                elif event[0] == "done":
                    completions = event[1]
                    generated += self._account(job, ready.prompt_tokens, completions, start)
                    prompt_tokens += ready.prompt_tokens
                    done = await run_in_threadpool(self.run_server_tools, ready, completions[0].text)
                    if done is not None:
                        yield chunk([{"index": 0, "delta": {}, "logprobs": None,
                                      "finish_reason": None, "tool_runs": done.report()}])
                        rounds += 1
                        try:
                            ready = await run_in_threadpool(self.next_round, body, ready, done,
                                                            rounds)  # fmt: skip
                        except APIError as e:  # e.g. the results outgrew the context
                            yield f"data: {json.dumps(e.body())}\n\n"
                            break
                        job = self.submit(ready.prompts, ready.params, job.deadline)
                        calls = call_streams(ready.plan)
                        texts = [LocText(self.loc_bins) for _ in range(body.n)]
                        continue
                    plan = ready.plan
                    for i, c in enumerate(completions):
                        finish_reason, content, deltas, held = c.finish_reason, c.text, [], ""
                        if calls:
                            held, deltas, finish_reason = calls[i].finish(c.finish_reason)
                            content = answer_message(c.text, c.finish_reason, plan)[0]["content"]
                        rest = texts[i].feed(held) + texts[i].finish()
                        if rest:
                            yield chunk([{"index": i, "delta": {"content": rest},
                                          "logprobs": None, "finish_reason": None}])
                        for delta in deltas:
                            yield chunk([{"index": i, "delta": {"tool_calls": [delta]},
                                          "logprobs": None, "finish_reason": None}])
                        yield chunk([{"index": i, "delta": {}, "logprobs": None,
                                      "finish_reason": finish_reason,
                                      "boxes": self.boxes(content or "")}])
                    if include_usage:
                        yield chunk([], _usage(prompt_tokens, generated))
                    break
                else:
                    err = self._engine_error(event[1])
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
            finished = True
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away mid-stream
                self._stop(job, "client_disconnected")
            self.release()

    # ---- embeddings and search ---------------------------------------------------------

    def embed(self, items: list[tuple[str, Any]]) -> np.ndarray:
        embedder = self.models.embedder
        texts = [(i, v) for i, (kind, v) in enumerate(items) if kind == "text"]
        images = [(i, v) for i, (kind, v) in enumerate(items) if kind == "image"]
        out = np.zeros((len(items), embedder.dim), dtype=np.float32)
        with self.embed_lock:
            if texts:
                out[[i for i, _ in texts]] = embedder.embed_texts([v for _, v in texts])
            if images:
                out[[i for i, _ in images]] = embedder.embed_images([v for _, v in images])
        return out  # (N, dim)

    def count_tokens(self, texts: list[str]) -> int:
        processor = getattr(getattr(self.models.embedder, "model", None), "processor", None)
        if processor is None:
            return sum(len(t.split()) for t in texts)
        return sum(len(processor.tokenizer.encode(t)) for t in texts)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _thumbnail(path: str, side: int = 128) -> str | None:
    from visto.data.images import BadImage, open_image

    try:
        image = open_image(path)
    except (BadImage, OSError):
        return None
    image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ----------------------------------------------------------------------------- the app


def create_app(models: ServedModels, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    server = Server(models, settings)
    app = FastAPI(
        title="visto",
        summary="OpenAI-compatible API for visto's vision-language models",
        version="1",
        lifespan=_lifespan(server),
    )
    app.state.server = server
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(Observe, metrics=server.metrics, api_key=settings.api_key)
    _add_status_routes(app, server)
    _add_chat_route(app, server)
    _add_embedding_routes(app, server)
    _add_page(app)
    return app


def _lifespan(server: Server) -> Any:
    """The batcher's worker thread runs while the app does."""

    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if server.batcher is not None:
            server.batcher.start()
        yield
        if server.batcher is not None:
            server.batcher.stop()

    return lifespan


def _add_status_routes(app: FastAPI, server: Server) -> None:
    """/health, /metrics and the model list."""

    @app.get("/health")
    async def health() -> dict[str, Any]:
        batcher = server.batcher
        return {"status": "ok", "models": server.model_ids(), "in_flight": server.in_flight,
                "waiting": server.admission.waiting,
                "queue_depth": batcher.queue_depth if batcher else 0,
                "busy_rows": batcher.busy_rows if batcher else 0}

    @app.get("/metrics")
    async def metrics() -> Response:
        if server.batcher is not None:
            server.metrics.queue_depth.set(server.batcher.queue_depth)
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(m, server) for m in server.model_ids()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id not in server.model_ids():
            raise server._unknown_model(model_id, "the")
        return _model_card(model_id, server)


def _add_chat_route(app: FastAPI, server: Server) -> None:
    """/v1/chat/completions: admitted, prepared off the event loop, generated by the batcher,
    then streamed or answered whole."""
    settings = server.settings

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        server.chat_model(body.model)  # 404 before any work
        deadline = time.monotonic() + settings.timeout_s
        await server.admit(request, deadline)
        handed_off = False
        try:
            ready = await run_in_threadpool(server.prepare_chat, body)
            start = time.perf_counter()
            job = server.submit(ready.prompts, ready.params, deadline)
            if body.stream:
                handed_off = True  # the stream releases the slot when it ends
                return StreamingResponse(
                    server.stream_chat(job, body, ready, start),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            return await _whole_chat(server, body, request, ready, job, start, deadline)
        finally:
            if not handed_off:
                server.release()


async def _whole_chat(server: Server, body: ChatCompletionRequest, request: Request, ready: Any,
                      job: Job, start: float, deadline: float) -> JSONResponse:  # fmt: skip
    """A non-streamed answer: one round, or more while the answer calls the server's own tools."""
    prompt_tokens = generated = rounds = 0
    tool_runs: list[dict[str, Any]] = []
    while True:
        completions = await server.wait_done(job, request)
        generated += server._account(job, ready.prompt_tokens, completions, start)
        prompt_tokens += ready.prompt_tokens
        done = await run_in_threadpool(server.run_server_tools, ready, completions[0].text)
        if done is None:
            break
        tool_runs += done.report()
        rounds += 1
        ready = await run_in_threadpool(server.next_round, body, ready, done, rounds)
        job = server.submit(ready.prompts, ready.params, deadline)
    return JSONResponse(server.completion_body(body, completions, prompt_tokens,
                                               generated, ready.plan, tool_runs))  # fmt: skip


def _add_embedding_routes(app: FastAPI, server: Server) -> None:
    """/v1/embeddings and /v1/search, over the two-tower model and the vector store."""
    models, settings = server.models, server.settings

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        if models.embedder is None:
            raise APIError(404, "this server has no embedding model (start it with --clip CKPT)",
                           "model", "model_not_found")
        if body.model not in (models.embedder_name, models.embedder.name):
            raise server._unknown_model(body.model, "embedding")
        if body.dimensions is not None and body.dimensions != models.embedder.dim:
            raise APIError(400, f"this model's embeddings have {models.embedder.dim} dimensions; "
                           "leave out `dimensions` or set it to that", "dimensions")
        items = await run_in_threadpool(embedding_inputs, body.input, settings.images)
        vectors = await run_in_threadpool(server.embed, items)
        data = []
        for i, v in enumerate(vectors):
            value: Any = (base64.b64encode(v.astype("<f4").tobytes()).decode()
                          if body.encoding_format == "base64" else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = server.count_tokens([v for kind, v in items if kind == "text"])
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/search")
    async def search(body: SearchRequest) -> dict[str, Any]:
        store = models.store
        if store is None:
            raise APIError(404, "this server has no index (start it with --db PATH --clip CKPT)")
        if (body.query is None) == (body.image_url is None):
            raise APIError(400, "give either a text `query` or an `image_url`, not both", "query")
        if body.query is not None and not body.query.strip():
            raise APIError(400, "the text query is empty", "query")

        def run() -> list[Any]:
            if body.query is not None:
                item = ("text", body.query)
            else:
                item = ("image", load_image(body.image_url, settings.images, "image_url"))
            vector = server.embed([item])[0]
            with server.embed_lock:
                return store.search(vector, k=body.k, model=models.embedder.name)

        hits = await run_in_threadpool(run)
        results = []
        for rank, hit in enumerate(hits, 1):
            result = {"rank": rank, "id": hit.id, "score": round(float(hit.score), 6),
                      "path": hit.path, "metadata": hit.metadata}
            if body.thumbnails:
                result["thumbnail"] = await run_in_threadpool(_thumbnail, hit.path)
            results.append(result)
        return {"object": "list", "model": models.embedder_name, "data": results}


def _add_page(app: FastAPI) -> None:
    """The web page and its static files."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


_ENDPOINTS = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions",
              "/v1/embeddings", "/v1/search"}


def _model_card(model_id: str, server: Server) -> dict[str, Any]:
    chat = server.models.chat
    card: dict[str, Any] = {"id": model_id, "object": "model", "created": server.started,
                            "owned_by": "visto"}
    if chat is not None and model_id == chat.name:
        from visto.nn.quantize import is_int8

        card.update(kind="chat", accepts_images=chat.accepts_images,
                    context_length=chat.context_length, int8=is_int8(chat.model))
    else:
        card.update(kind="embedding", dim=server.models.embedder.dim,
                    search=server.models.store is not None)
    return card


__all__ = ["ChatModel", "ServeSettings", "ServedModels", "create_app", "error_body"]
