"""The server behind the routes: what one app serves (a chat model, an embedder, a vector
store, tools), with the machinery a chat request runs through.

    server.admit(request, deadline)       a slot (admission.py), waiting in line for one
    ready = server.prepare_chat(body)     prompts and params (rounds.py), in a worker thread
    job = server.submit(ready.prompts, ready.params, deadline)   to the batcher (batching.py)
    completions = await server.wait_done(job, request)           or answers.stream_chat
    server.release()

The routes (app.py) call it; the answers (answers.py) write what it produced as OpenAI's
JSON. It knows the request's models, limits and metrics, not its HTTP routes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.requests import Request

from visto.errors import UserError
from visto.serve import rounds
from visto.serve.admission import Admission, LeftQueue, QueueFull
from visto.serve.batching import Batcher, Job
from visto.serve.content import ImagePolicy
from visto.serve.errors import APIError
from visto.serve.metrics import Metrics
from visto.serve.rounds import ChatRound
from visto.serve.schemas import ChatCompletionRequest
from visto.tasks.runner import AnswerTokenizer, context_length
from visto.tools.loop import ToolRound

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
    # the answer after a tool result with text quotes its words (rounds.py, visto.tools.quote):
    # "auto" for the OCR task's question, "always", "never" (--quote-results)
    quote_results: str = "auto"

    def __post_init__(self) -> None:
        from visto.tools.quote import QUOTE_RESULTS

        if self.quote_results not in QUOTE_RESULTS:
            raise UserError(f"quote_results {self.quote_results!r}: give one of "
                            f"{', '.join(QUOTE_RESULTS)}")  # fmt: skip


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


# ----------------------------------------------------------------------------- the server


class Server:
    """Everything one app serves with: the models, the admission line, the batcher and its
    engine, the metrics; the routes (app.py) call its methods."""

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

    def unknown_model(self, name: str, kind: str) -> APIError:
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
            raise self.unknown_model(name, "chat")
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

    # ---- chat rounds (rounds.py); the route calls prepare_chat in a worker thread ----------

    def prepare_chat(self, body: ChatCompletionRequest) -> ChatRound:
        """The request's first round: prompts and sampling params; runs in a worker thread."""
        chat = self.chat_model(body.model)
        return rounds.first_round(chat, body, self.settings, self.models.tools,
                                  self.grammar_factory)  # fmt: skip

    def run_server_tools(self, ready: ChatRound, text: str) -> ToolRound | None:
        """Runs the server's own tools that `text` calls on the latest image (worker thread)."""
        return rounds.server_tools(ready, text, self.models.tools)

    def next_round(self, body: ChatCompletionRequest, ready: ChatRound, done: ToolRound,
                   index: int) -> ChatRound:  # fmt: skip
        """Round `index` of the tool loop: the conversation with the calls and their results."""
        return rounds.next_round(self.chat_model(body.model), body, ready, done, index,
                                 self.settings, self.grammar_factory)  # fmt: skip

    # ---- a job's life: admitted, submitted, waited for or stopped, accounted -------------

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
                raise self.timeout_error() from None
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

    def stop(self, job: Job, reason: str) -> None:
        if not job.cancelled.is_set():
            job.cancelled.set()
            self.metrics.cancelled.labels(reason).inc()

    def timeout_error(self) -> APIError:
        return APIError(504, f"the request took longer than this server's timeout of "
                        f"{self.settings.timeout_s:g} s (--timeout)", None, "timeout")

    @staticmethod
    def engine_error(exc: Exception) -> APIError:
        if isinstance(exc, UserError):
            return APIError(400, str(exc))
        return APIError(500, f"generation failed: {type(exc).__name__}: {exc}")

    def account(self, job: Job, prompt_tokens: int, completions: list[Any], start: float) -> int:
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
                self.stop(job, "timeout")
                raise self.timeout_error()
            try:
                event = await asyncio.wait_for(job.events.get(), min(remaining, 0.25))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.stop(job, "client_disconnected")
                    raise APIError(499, "the client closed the connection") from None
                continue
            if event[0] == "done":
                return event[1]
            if event[0] == "error":
                raise self.engine_error(event[1])

    def boxes(self, text: str) -> list[list[int]]:
        assert self.models.chat is not None
        return self.models.chat.processor.tokenizer.parse_boxes(text)

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


__all__ = ["ChatModel", "ServeSettings", "ServedModels", "Server"]
