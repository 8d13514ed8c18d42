"""The generation engine: prefill once, then decode token by token with the model's KV cache.

    engine = Engine(model, tokenizer)
    [out] = engine.generate(["a red square is"], SamplingParams(max_new_tokens=20))
    out.text, out.token_ids, out.finish_reason, out.timing.decode_tokens_per_s
    for piece in engine.stream("a red square is", SamplingParams(temperature=0.8, seed=1)):
        print(piece, end="")

The engine knows tensors and text, never a model family. A model plugs in by two methods:

    prefill(batch) -> (last_logits (B, V), state)
        `batch` holds left-padded `input_ids` and `attention_mask`, both (B, T), plus whatever
        else the model reads (pixel_values, ...: a VLM gets the processor's left-padded Batch).
    decode_step(next_ids (B,), state) -> (logits (B, V), state)

and the `state` it returns must have `select(rows: LongTensor) -> state` keeping those batch
rows, so that finished requests stop costing compute. `DecoderLM` implements all three; a VLM
computes its input embeddings and hands them to `DecoderLM.prefill_embeds`.

A model built on a `DecoderLM` (the LM itself, or one exposing `language_model` and
`prefill_inputs(batch)`, like LLaVA) runs on the engine's fast path instead (`runner.py`:
preallocated KV cache written in place, fused projections; `Engine(..., fast=False)` opts
out), which also lets requests join a running generation (`continuous.py`). A conditioned
decoder runs there too: its `prefill_inputs` returns `DecoderInputs` (what its layers read
besides the tokens, e.g. Flamingo's images, CogVLM's expert mask) and its
`decode_conditioning(context)` what each decode step's layers read.

Batches of prompts of different lengths are left-padded; the model derives position ids from
the attention mask, so every row sees the same positions it would see alone. Each request has
its own `SamplingParams` and its own seeded `torch.Generator`, and draws from it only for its
own tokens, so a seeded request samples the same tokens alone or in any batch, as long as the
batched logits equal the single ones bit for bit. They do in our tests; on other hardware a
different matmul blocking for a different batch shape can move a logit in the last bit, and a
draw sitting exactly on a boundary could then differ (the same caveat as vLLM's seeds).

Streaming yields the new stable suffix of the decoded text after each token: the full sequence
is decoded, trailing U+FFFD (an unfinished multi-byte character of a byte-level BPE) is held
back, and so is any tail that could be the start of a stop string, so a piece is never
retracted and never splits a character.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from visto.errors import UserError
from visto.infer.runner import DecoderRunner
from visto.infer.sampling import SamplingParams, sample_token

REPLACEMENT_CHAR = "\ufffd"  # what a byte-level decoder makes of an unfinished UTF-8 sequence


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class GenerativeModel(Protocol):
    def prefill(self, batch: Any) -> tuple[Tensor, Any]: ...
    def decode_step(self, next_ids: Tensor, state: Any) -> tuple[Tensor, Any]: ...


@dataclass
class PromptBatch:
    """Left-padded prompts: what `prefill` gets for a text-only model."""

    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T) 1 = real token, 0 = padding

    @classmethod
    def left_padded(
        cls, prompts: Sequence[Sequence[int]], pad_id: int = 0, device: torch.device | str = "cpu"
    ) -> PromptBatch:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            if len(ids):
                input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
        return cls(input_ids.to(device), attention_mask.to(device))


@dataclass
class Timing:
    ttft_s: float  # request start to first token (prefill + first draw)
    decode_s: float  # first token to the last
    decode_tokens: int  # tokens generated after the first

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


@dataclass
class Completion:
    text: str  # stop string (and anything after it) and stop token removed
    token_ids: list[int]  # every generated id, including a final stop token if one ended it
    finish_reason: str  # "stop" (stop token or stop string) or "length" (max_new_tokens)
    prompt_tokens: int
    timing: Timing


@dataclass
class _Row:
    """One request's progress."""

    params: SamplingParams
    stop_ids: frozenset[int]
    prompt: Tensor  # (T,) the prompt's row as batched (padding included)
    prompt_mask: Tensor | None  # (T,) bool, True at real tokens; None: all real
    prompt_tokens: int  # real tokens in the prompt
    # A sampling request's own seeded generator; None for a greedy one, which never draws.
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    text: str = ""  # decoded content so far (after a stop: the final, trimmed text)
    emitted: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None
    end_time: float = 0.0

    @functools.cached_property
    def prompt_ids(self) -> Tensor:
        """(T_prompt,) the real tokens only, for the repetition penalty (made when first
        asked: a boolean gather per row costs more than a greedy request's first step)."""
        return self.prompt if self.prompt_mask is None else self.prompt[self.prompt_mask]

    def seen_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, torch.tensor(self.generated, dtype=torch.long)])

    def push(self, token: int, tokenizer: TextTokenizer, stream: bool) -> str:
        """Record one token, decide whether the request is done; return the text to stream."""
        self.generated.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            if not (stream or self.params.stop):  # otherwise `text` is already up to date
                self.text = tokenizer.decode(self.generated[:-1])
            return self.text[self.emitted :] if stream else ""
        if stream or self.params.stop:
            self.text = tokenizer.decode(self.generated)
            cut = _first_stop(self.text, self.params.stop)
            if cut is not None:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
        if self.finish_reason is None and len(self.generated) >= self.params.max_new_tokens:
            self.finish_reason = "length"
            if not (stream or self.params.stop):
                self.text = tokenizer.decode(self.generated)
        if not stream:
            return ""
        stable = self.text if self.finish_reason else _stable_prefix(self.text, self.params.stop)
        piece = stable[self.emitted :]
        self.emitted = max(self.emitted, len(stable))
        return piece


def choose_tokens(logits: Tensor, rows: Sequence[_Row], eos_ids: Sequence[int]) -> list[int]:
    """The next token of every row; logits (B, V). A batch of plain greedy rows is one argmax
    (one sync); rows with settings of their own are sampled one by one."""
    suppress = [pos for pos, r in enumerate(rows) if r.params.ignore_eos] if eos_ids else []
    if suppress:  # ignore_eos: the engine's eos ids are never chosen (batched, no sync)
        logits = logits.clone()
        logits[torch.tensor(suppress)[:, None], torch.tensor(list(eos_ids))] = float("-inf")
    if all(r.params.plain_greedy for r in rows):
        return logits.argmax(dim=-1).tolist()
    logits = logits.float().cpu()
    chosen = []
    for pos, row in enumerate(rows):
        seen = row.seen_ids() if row.params.repetition_penalty != 1.0 else row.prompt[:0]
        chosen.append(sample_token(logits[pos], row.params, row.generator, seen, row.generated))
    return chosen


def new_row(
    params: SamplingParams, eos_ids: Sequence[int], prompt: Tensor, mask: Tensor | None, n: int
) -> _Row:
    """A request's progress: `prompt` (T,) its ids as batched, `mask` (T,) bool which of them
    are real (None: all) and `n` how many; a sampling request gets its own seeded generator
    (a greedy one never draws: none is made, and the global RNG is not drawn from)."""
    g = None
    if not params.greedy:
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()).item())
        g = torch.Generator()
        g.manual_seed(seed)
    stop_ids = frozenset(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids |= frozenset(eos_ids)
    return _Row(params, stop_ids, prompt, mask, n, g)


def new_rows(params: Sequence[SamplingParams], eos_ids: Sequence[int], batch: Any) -> list[_Row]:
    """One row per prompt of a left-padded batch (its `input_ids` and `attention_mask`)."""
    mask = batch.attention_mask.bool().cpu()
    ids = batch.input_ids.cpu()
    T = ids.shape[1]
    counts = mask.sum(dim=1).tolist()
    return [
        new_row(p, eos_ids, ids[i], None if n == T else mask[i], n)
        for i, (p, n) in enumerate(zip(params, counts, strict=True))
    ]


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _stable_prefix(text: str, stops: Sequence[str]) -> str:
    """`text` without what may still change: an unfinished character, a possible stop start."""
    text = text.rstrip(REPLACEMENT_CHAR)
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return text[: len(text) - hold]


class Generation:
    """One batched generation in progress: iterate for (row, text piece) events when streaming;
    `completions` is filled once the iteration ends."""

    def __init__(
        self,
        engine: Engine,
        batch: Any,
        params: Sequence[SamplingParams],
        stream: bool,
    ) -> None:
        B = batch.input_ids.shape[0]
        assert batch.attention_mask.shape == batch.input_ids.shape, (
            f"attention_mask {tuple(batch.attention_mask.shape)} must match input_ids "
            f"{tuple(batch.input_ids.shape)}"
        )
        assert len(params) == B, f"{len(params)} sampling params for a batch of {B}"
        self.engine, self.batch, self.stream = engine, batch, stream
        self.rows = new_rows(params, engine.eos_token_ids, batch)
        self.completions: list[Completion] = []
        # Every row plain greedy, no eos to suppress: each step's tokens are one argmax (what
        # choose_tokens does for such rows, without asking every row at every step).
        self._argmax_only = all(r.params.plain_greedy for r in self.rows) and not (
            engine.eos_token_ids and any(r.params.ignore_eos for r in self.rows)
        )

    def _choose(self, logits: Tensor, active: list[int]) -> list[int]:
        if self._argmax_only:
            return logits.argmax(dim=-1).tolist()
        return choose_tokens(logits, [self.rows[r] for r in active], self.engine.eos_token_ids)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        engine = self.engine
        start = time.perf_counter()
        logits, state = engine.prefill(self.batch, max(r.params.max_new_tokens for r in self.rows))
        B = self.batch.input_ids.shape[0]
        assert logits.ndim == 2 and logits.shape[0] == B, (
            f"prefill must return last logits (B, V) with B = {B}, got {tuple(logits.shape)}"
        )
        active = list(range(B))  # the request behind each row of the model's state
        first_token_time = None
        while True:
            chosen = self._choose(logits, active)
            now = time.perf_counter()
            first_token_time = first_token_time or now
            for token, r in zip(chosen, active, strict=True):
                row = self.rows[r]
                piece = row.push(token, engine.tokenizer, self.stream)
                if piece:
                    yield r, piece
                if row.finish_reason:
                    row.end_time = now
            keep = [pos for pos, r in enumerate(active) if self.rows[r].finish_reason is None]
            if not keep:
                break
            next_ids = torch.tensor([chosen[pos] for pos in keep], device=engine.device)
            if len(keep) < len(active):
                assert hasattr(state, "select"), "the model's decode state needs select(rows)"
                state = state.select(torch.tensor(keep, device=engine.device))
                active = [active[pos] for pos in keep]
            logits, state = engine.decode_step(next_ids, state)
        self.completions = [
            Completion(
                text=row.text,
                token_ids=row.generated,
                finish_reason=row.finish_reason or "length",
                prompt_tokens=row.prompt_tokens,
                timing=Timing(
                    ttft_s=first_token_time - start,
                    decode_s=row.end_time - first_token_time,
                    decode_tokens=len(row.generated) - 1,
                ),
            )
            for row in self.rows
        ]


class TextStream:
    """The text pieces of one request as they become stable; `.completion` once exhausted."""

    def __init__(self, generation: Generation) -> None:
        self._generation = generation
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        for _, piece in self._generation:
            yield piece
        self.completion = self._generation.completions[0]


class Engine:
    """Generates text from a model that speaks the prefill/decode_step protocol (see module doc).

    eos_token_ids: ids that end every request (a request's `stop_token_ids` add to them); by
        default the tokenizer's `end_id` (visto's end-of-turn) and `eos_id` when it has them.
    pad_id: the id put in left padding (never attended to; any valid id works).
    """

    def __init__(
        self,
        model: GenerativeModel,
        tokenizer: TextTokenizer,
        eos_token_ids: Sequence[int] | None = None,
        pad_id: int | None = None,
        device: torch.device | str | None = None,
        fast: bool = True,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        # The fast path (runner.py) for models built on a DecoderLM; others (and fast=False)
        # run through the model's own prefill/decode_step.
        self.runner = DecoderRunner.for_model(model) if fast else None
        if isinstance(model, torch.nn.Module):
            model.eval()  # dropout off: the engine only ever runs inference
        if eos_token_ids is None:
            eos_token_ids = [
                i
                for i in (getattr(tokenizer, "end_id", None), getattr(tokenizer, "eos_id", None))
                if i is not None
            ]
        self.eos_token_ids = tuple(eos_token_ids)
        self.pad_id = pad_id if pad_id is not None else getattr(tokenizer, "pad_id", 0)
        if device is None:
            first = (
                next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
            )
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)

    @property
    def can_join(self) -> bool:
        """Whether requests can join a running generation (`ContinuousBatch`)."""
        return self.runner is not None

    def prefill(self, batch: Any, room: int) -> tuple[Tensor, Any]:
        """Last logits (B, V) and the decode state; `room`: tokens the rows may still add."""
        if self.runner is not None:
            return self.runner.prefill(batch, room=room)
        return self.model.prefill(batch)

    def decode_step(self, next_ids: Tensor, state: Any) -> tuple[Tensor, Any]:
        if self.runner is not None:
            return self.runner.decode_step(next_ids, state)
        return self.model.decode_step(next_ids, state)

    def _encode(self, prompts: Sequence[str | Sequence[int]]) -> PromptBatch:
        encoded = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        if not encoded:
            raise UserError("no prompts given")
        for i, ids in enumerate(encoded):
            if not ids:
                raise UserError(f"prompt {i} is empty: generation needs at least one token")
        return PromptBatch.left_padded(encoded, self.pad_id, self.device)

    @staticmethod
    def _params_for(
        n: int, params: SamplingParams | Sequence[SamplingParams] | None
    ) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise UserError(f"{len(params)} sampling settings given for {n} prompts")
        return list(params)

    def start(
        self,
        batch: Any,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        stream: bool = False,
    ) -> Generation:
        """A generation over a prepared left-padded batch (e.g. the processor's for a VLM)."""
        return Generation(self, batch, self._params_for(batch.input_ids.shape[0], params), stream)

    def generate_batch(
        self, batch: Any, params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[Completion]:
        generation = self.start(batch, params)
        for _ in generation:
            pass
        return generation.completions

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """One completion per prompt (text, or token ids), generated as one batch."""
        return self.generate_batch(self._encode(prompts), params)

    def stream(
        self, prompt: str | Sequence[int] | Any, params: SamplingParams | None = None
    ) -> TextStream:
        """Text pieces of one request (a prompt, its ids, or a prepared batch of one)."""
        batch = self._encode([prompt]) if isinstance(prompt, (str, list, tuple)) else prompt
        if batch.input_ids.shape[0] != 1:
            raise UserError("stream() takes one request; use start(..., stream=True) for a batch")
        return TextStream(self.start(batch, params, stream=True))
