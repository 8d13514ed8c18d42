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

This module is the routes and the HTTP middleware (body limit, API key, request metrics);
what the routes call is the server (server.py: the served models, admission, submission to
the batcher), the rounds of a chat request (rounds.py) and its answers (answers.py). A chat
request first takes one of --max-concurrency slots, waiting in line for one (up to
--max-queue requests wait; admission.py); then it becomes a `Job` for the batcher's worker
thread (batching.py); the handler awaits the job's events and writes them out, so the event
loop is never blocked by the model. Nothing below imports this module.
"""

from __future__ import annotations

import base64
import hmac
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from visto.serve.answers import stream_chat, whole_chat
from visto.serve.content import embedding_inputs, load_image
from visto.serve.errors import APIError, error_body, error_response, install_error_handlers
from visto.serve.metrics import Metrics
from visto.serve.schemas import ChatCompletionRequest, EmbeddingRequest, SearchRequest
from visto.serve.server import ChatModel, ServedModels, Server, ServeSettings

STATIC_DIR = Path(__file__).parent / "static"


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
    """The batcher's worker thread runs while the app does, and so do the processes of the
    server's own tools (--tools): started, if `visto serve` has not started them already, so
    that the first call finds its expert loaded; stopped at shutdown (visto.tools.registry)."""

    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tools = server.models.tools
        if tools is not None:
            tools.start()  # returns at once
        if server.batcher is not None:
            server.batcher.start()
        try:
            yield
        finally:
            if server.batcher is not None:
                server.batcher.stop()
            if tools is not None:
                await run_in_threadpool(tools.stop)

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
            raise server.unknown_model(model_id, "the")
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
                    stream_chat(server, job, body, ready, start),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            return JSONResponse(await whole_chat(server, body, request, ready, job, start,
                                                deadline))  # fmt: skip
        finally:
            if not handed_off:
                server.release()


def _add_embedding_routes(app: FastAPI, server: Server) -> None:
    """/v1/embeddings and /v1/search, over the two-tower model and the vector store."""
    models, settings = server.models, server.settings

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        if models.embedder is None:
            raise APIError(404, "this server has no embedding model (start it with --clip CKPT)",
                           "model", "model_not_found")
        if body.model not in (models.embedder_name, models.embedder.name):
            raise server.unknown_model(body.model, "embedding")
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
        if server.models.tools is not None:  # the server's own tools (--tools), for the page
            card["tools"] = server.models.tools.names
    else:
        card.update(kind="embedding", dim=server.models.embedder.dim,
                    search=server.models.store is not None)
    return card


__all__ = ["ChatModel", "ServeSettings", "ServedModels", "create_app", "error_body"]
