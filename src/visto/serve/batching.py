"""Batching: concurrent requests share the model's steps, in one worker thread.

    handler (event loop) --Job--> queue --> worker thread --("piece", choice, text) /
    handler <-- ("done", completions) / ("error", exc) --/

Continuous batching (Yu et al. 2022, "Orca"), when the engine can add rows to a running
generation (`engine.can_join`, any DecoderLM-based model): between two decode steps the worker
takes every job waiting in the queue (up to `max_batch` rows in all), prefills them together
and merges them into the running batch (`visto.infer.continuous.ContinuousBatch`); rows leave
the moment they finish. A request arriving mid-generation waits one step, not a whole batch.

Dynamic batching otherwise: collect jobs for up to `wait_s` (or `max_batch` rows), run them as
one generation; later arrivals wait for the next one.

A request can be stopped while it runs: client gone, or past its deadline. Continuous: its rows
are cancelled between steps (a flag; the other rows keep the batched greedy argmax). Dynamic:
each row's logits processor checks its job and forces the stop token. Either way a stopped job
stops costing compute at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from visto.infer import Engine, SamplingParams
from visto.infer.continuous import ContinuousBatch, Request
from visto.infer.sampling import Settles

log = logging.getLogger("visto.serve")


@dataclass
class Job:
    """One HTTP request: `n` prompts (its choices) and where to send what happens to them."""

    prompts: list[Any]  # processor `Encoded`, one per choice
    params: list[SamplingParams]
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() after which the job is abandoned
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    batch_size: int = 0  # rows in the batch it ran in (for metrics)

    @property
    def stopped(self) -> bool:
        return self.cancelled.is_set() or time.monotonic() > self.deadline

    def send(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class _Stoppable:
    """A row's logits processor that ends the row as soon as its job is stopped, around the
    request's own (a grammar's settle included: visto.infer.sampling.Settles)."""

    def __init__(self, job: Job, inner: Any, stop_id: int) -> None:
        self.job, self.inner, self.stop_id = job, inner, stop_id

    def __call__(self, generated: list[int], logits: Tensor) -> Tensor:
        if self.job.stopped:
            forced = torch.full_like(logits, float("-inf"), dtype=torch.float32)
            forced[self.stop_id] = 0.0
            return forced
        return self.inner(generated, logits) if self.inner is not None else logits

    def settle(self, generated: list[int], token: int, left: int) -> int:
        if self.job.stopped or not isinstance(self.inner, Settles):
            return token
        return self.inner.settle(generated, token, left)


def _stoppable(job: Job, params: SamplingParams, stop_id: int) -> SamplingParams:
    """`params` with a logits processor that ends the row as soon as its job is stopped."""
    return replace(params, logits_processor=_Stoppable(job, params.logits_processor, stop_id))


class Batcher:
    """Owns the engine; one worker thread runs every generation."""

    def __init__(
        self,
        engine: Engine,
        collate: Callable[[Sequence[Any]], Any],
        max_batch: int = 8,
        wait_s: float = 0.005,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        assert max_batch >= 1 and engine.eos_token_ids, "the engine needs a stop token id"
        self.engine, self.collate = engine, collate
        self.max_batch, self.wait_s = max_batch, wait_s
        self.on_batch = on_batch
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._carry: Job | None = None  # a job that did not fit the last batch
        self._thread: threading.Thread | None = None
        self.busy_rows = 0  # rows in the generation running now

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="visto-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        assert len(job.prompts) == len(job.params) >= 1
        self._queue.put(job)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() + (self._carry is not None)

    # ---- worker thread -------------------------------------------------------------

    def _collect(self) -> list[Job] | None:
        """The next batch of live jobs, or None when told to stop."""
        first = self._carry or self._queue.get()
        self._carry = None
        if first is None:
            return None
        jobs, rows = [first], len(first.prompts)
        until = time.monotonic() + self.wait_s
        while rows < self.max_batch:
            remaining = until - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop after this batch
                break
            if rows + len(job.prompts) > self.max_batch:
                self._carry = job
                break
            jobs.append(job)
            rows += len(job.prompts)
        return [j for j in jobs if not j.stopped]

    def _run(self) -> None:
        if self.engine.can_join:
            self._run_continuous()
            return
        while True:
            jobs = self._collect()
            if jobs is None:
                return
            if jobs:
                self._generate(jobs)

    def _generate(self, jobs: list[Job]) -> None:
        stop_id = self.engine.eos_token_ids[0]
        owners = [(job, c) for job in jobs for c in range(len(job.prompts))]
        params = [_stoppable(job, job.params[c], stop_id) for job, c in owners]
        self.busy_rows = len(owners)
        for job in jobs:
            job.batch_size = len(owners)
        if self.on_batch is not None:
            self.on_batch(len(owners))
        try:
            batch = self.collate([job.prompts[c] for job, c in owners])
            generation = self.engine.start(batch, params, stream=True)
            for row, piece in generation:
                job, choice = owners[row]
                if not job.stopped:
                    job.send(("piece", choice, piece))
                if all(j.stopped for j in jobs):
                    return  # nobody is listening any more: abandon the generation
            done = generation.completions
            start = 0
            for job in jobs:
                job.send(("done", done[start : start + len(job.prompts)]))
                start += len(job.prompts)
        except Exception as e:  # a failed batch answers its requests; the worker lives on
            log.exception("generation failed")
            for job in jobs:
                job.send(("error", e))
        finally:
            self.busy_rows = 0

    # ---- continuous batching -----------------------------------------------------------

    def _take(self, room: int, block: bool) -> list[Job] | None:
        """Jobs waiting in the queue that fit in `room` rows (blocking for the first when
        idle); None when told to stop. No waiting for company: a request arriving a moment
        later joins at the next step anyway, and waiting would add to every idle TTFT."""
        jobs: list[Job] = []
        until = 0.0
        while room > 0:
            if self._carry is not None:
                job: Job | None = self._carry
                self._carry = None
            else:
                try:
                    if block and not jobs:
                        job = self._queue.get()
                    else:
                        remaining = until - time.monotonic()
                        job = (self._queue.get(timeout=remaining) if remaining > 0
                               else self._queue.get_nowait())  # fmt: skip
                except queue.Empty:
                    break
            if job is None:
                if jobs:
                    self._queue.put(None)  # stop after these
                    break
                return None
            if len(job.prompts) > room and (jobs or not block):  # an idle worker takes any
                self._carry = job
                break
            if not job.stopped:
                jobs.append(job)
                room -= len(job.prompts)
        return jobs

    def _run_continuous(self) -> None:
        batch = ContinuousBatch(self.engine, stream=True)
        running: dict[int, tuple[Job, list[Request]]] = {}  # id(job) -> its requests
        while True:
            jobs = self._take(self.max_batch - batch.rows, block=not batch.busy)
            if jobs is None:
                return
            try:
                if jobs:  # newcomers are prefilled together, as one left-padded batch
                    owners = [(job, c) for job in jobs for c in range(len(job.prompts))]
                    requests = batch.add(
                        self.collate([job.prompts[c] for job, c in owners]),
                        [job.params[c] for job, c in owners],
                        owners,
                    )
                    for job in jobs:
                        running[id(job)] = (job, [r for r in requests if r.tag[0] is job])
                    rows = batch.rows
                    for job in jobs:
                        job.batch_size = rows
                    if self.on_batch is not None:
                        self.on_batch(rows)
                for job, requests in running.values():
                    if job.stopped:
                        for r in requests:
                            r.cancel()
                self.busy_rows = batch.rows
                pieces, finished = batch.step()
            except Exception as e:  # a failed step answers its requests; the worker lives on
                log.exception("generation failed")
                for job, _ in running.values():
                    job.send(("error", e))
                running.clear()
                batch = ContinuousBatch(self.engine, stream=True)
                self.busy_rows = 0
                continue
            for request, piece in pieces:
                job, choice = request.tag
                if not job.stopped:
                    job.send(("piece", choice, piece))
            for request in finished:
                job, _ = request.tag
                entry = running.get(id(job))
                if entry is not None and all(r.done for r in entry[1]):
                    del running[id(job)]
                    if not job.stopped:
                        job.send(("done", [r.completion for r in entry[1]]))
            self.busy_rows = batch.rows
