"""Continuous batching (Yu et al. 2022, "Orca", iteration-level scheduling): requests join a
running generation between decode steps and leave it as soon as they finish.

    batch = ContinuousBatch(engine)
    [a] = batch.add(prompt_batch_a, [SamplingParams(max_new_tokens=20)])
    while batch.busy:
        pieces, done = batch.step()      # [(request, text piece)], [finished requests]
        if time_for_b:
            [b] = batch.add(prompt_batch_b, [SamplingParams()])   # joins at the next step
        if client_a_gone:
            a.cancel()                     # leaves at the next step, costs nothing till then
    a.completion.text

One `step()`: rows cancelled since the last step leave; one decode step runs for every running
row; requests added since the last step are prefilled together (one left-padded batch), draw
their first token, and their caches are merged into the running batch (`RunnerState.merge`:
right-aligned, per-row positions, so a row computes what it would alone); finished rows leave
(`RunnerState.select`). Cancelling is a flag read between steps, so rows that are never
cancelled keep the batched greedy argmax.

Needs the engine's fast path (`engine.can_join`: a DecoderLM-based model; a conditioned
decoder's per-row context, e.g. Flamingo's images, joins and leaves with its rows). Not thread-safe:
one thread drives a batch (the server's worker thread).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from visto.errors import UserError
from visto.infer.engine import Completion, Engine, Timing, _Row, choose_tokens, new_rows
from visto.infer.runner import RunnerState
from visto.infer.sampling import SamplingParams


@dataclass(eq=False)
class Request:
    """One prompt's progress in a `ContinuousBatch`; `completion` once it has finished."""

    row: _Row
    added: float  # time.perf_counter() when added
    first_token: float = 0.0
    cancelled: bool = False
    completion: Completion | None = None
    next_token: int = -1  # the token to feed at the next decode step
    tag: Any = field(default=None)  # the caller's (e.g. which job and choice)

    def cancel(self) -> None:
        """Leave the batch at the next step (finish reason "cancelled")."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.completion is not None


class ContinuousBatch:
    def __init__(self, engine: Engine, stream: bool = True) -> None:
        if not engine.can_join:
            raise UserError(
                "continuous batching needs a DecoderLM-based model (the engine's fast path)"
            )
        assert engine.runner is not None
        self.engine, self.runner, self.stream = engine, engine.runner, stream
        self.running: list[Request] = []  # one per row of `state`, in order
        self.state: RunnerState | None = None
        self._pending: list[tuple[Any, list[Request]]] = []

    @property
    def busy(self) -> bool:
        return bool(self.running or self._pending)

    @property
    def rows(self) -> int:
        """Rows running now plus rows waiting to join."""
        return len(self.running) + sum(len(reqs) for _, reqs in self._pending)

    def add(self, batch: Any, params: Sequence[SamplingParams], tags: Sequence[Any] | None = None
            ) -> list[Request]:  # fmt: skip
        """Queue a left-padded batch of prompts (one Request each); they join at the next step."""
        B = batch.input_ids.shape[0]
        assert len(params) == B, f"{len(params)} sampling params for a batch of {B}"
        tags = list(tags) if tags is not None else [None] * B
        now = time.perf_counter()
        rows = new_rows(params, self.engine.eos_token_ids, batch)
        requests = [Request(row, now, tag=tag) for row, tag in zip(rows, tags, strict=True)]
        self._pending.append((batch, requests))
        return requests

    def _finish(self, request: Request, now: float) -> None:
        row = request.row
        request.completion = Completion(
            text=row.text,
            token_ids=row.generated,
            finish_reason=row.finish_reason or "length",
            prompt_tokens=row.prompt_tokens,
            timing=Timing(
                ttft_s=request.first_token - request.added,
                decode_s=now - request.first_token,
                decode_tokens=max(len(row.generated) - 1, 0),
            ),
        )

    def _push(self, requests: list[Request], tokens: list[int], pieces: list, now: float) -> None:
        tokenizer = self.engine.tokenizer
        for request, token in zip(requests, tokens, strict=True):
            piece = request.row.push(token, tokenizer, self.stream)
            request.next_token = token
            if piece:
                pieces.append((request, piece))

    def step(self) -> tuple[list[tuple[Request, str]], list[Request]]:
        """One iteration; returns the streamed pieces and the requests that finished."""
        pieces: list[tuple[Request, str]] = []
        done: list[Request] = []
        now = time.perf_counter()
        # Cancelled requests leave before any compute is spent on them.
        for _, reqs in self._pending:
            for r in reqs:
                if r.cancelled:
                    r.row.finish_reason = "cancelled"
        for r in self.running:
            if r.cancelled and r.row.finish_reason is None:
                r.row.finish_reason = "cancelled"
        self._drop_finished(done, now)

        if self.running:
            assert self.state is not None
            next_ids = torch.tensor([r.next_token for r in self.running], device=self.engine.device)
            logits, self.state = self.runner.decode_step(next_ids, self.state)
            tokens = choose_tokens(logits, [r.row for r in self.running], self.engine.eos_token_ids)
            self._push(self.running, tokens, pieces, time.perf_counter())

        pending, self._pending = self._pending, []
        for batch, requests in pending:
            if all(r.cancelled for r in requests):
                for r in requests:
                    self._finish(r, now)
                    done.append(r)
                continue
            room = max(r.row.params.max_new_tokens for r in requests)
            logits, state = self.runner.prefill(batch, room=0 if self.state is not None else room)
            tokens = choose_tokens(logits, [r.row for r in requests], self.engine.eos_token_ids)
            first = time.perf_counter()
            for r in requests:
                r.first_token = first
            live = [i for i, r in enumerate(requests) if not r.cancelled]
            self._push([requests[i] for i in live], [tokens[i] for i in live], pieces, first)
            if self.state is None:
                self.state = state
            else:
                self.state = RunnerState.merge([self.state, state], room=self._room(requests))
            self.running.extend(requests)

        self._drop_finished(done, time.perf_counter())
        return pieces, done

    def _room(self, extra: list[Request]) -> int:
        """Columns still needed: the most tokens any running row may yet add."""
        rows = self.running + extra
        return max(r.row.params.max_new_tokens - len(r.row.generated) for r in rows) + 1

    def _drop_finished(self, done: list[Request], now: float) -> None:
        keep = [i for i, r in enumerate(self.running) if r.row.finish_reason is None]
        if len(keep) == len(self.running):
            return
        for r in self.running:
            if r.row.finish_reason is not None:
                r.row.end_time = now
                self._finish(r, now)
                done.append(r)
        self.running = [self.running[i] for i in keep]
        if not keep:
            self.state = None
        else:
            assert self.state is not None
            self.state = self.state.select(torch.tensor(keep, device=self.state.real.device))

