"""Dynamic batching: requests that arrive together are generated together, in one thread.

    handler (event loop) --Job--> queue --> worker thread: collect jobs for up to `wait_s`
                                                  (or until `max_batch` rows), left-pad them
                                                  into one batch, run one streaming generation
    handler <--("piece", choice, text) / ("done", completions) / ("error", exc)-- worker

The engine cannot add rows to a generation already running (that would be continuous
batching, Yu et al. 2022, "Orca"), so a request arriving mid-generation waits for the next
batch; rows that finish early leave the batch (the engine drops them), so a short answer
never waits on a long one to be *computed*, only to be *started*.

A request can be stopped while its batch runs: client gone, or past its deadline. Each row's
logits processor checks its job, and a stopped job's rows are forced to the stop token at
their next step, so they leave the batch and cost nothing more. If every job in a batch is
stopped the generation is abandoned at once.
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


def _stoppable(job: Job, params: SamplingParams, stop_id: int) -> SamplingParams:
    """`params` with a logits processor that ends the row as soon as its job is stopped."""
    inner = params.logits_processor

    def processor(generated: list[int], logits: Tensor) -> Tensor:
        if job.stopped:
            forced = torch.full_like(logits, float("-inf"), dtype=torch.float32)
            forced[stop_id] = 0.0
            return forced
        return inner(generated, logits) if inner is not None else logits

    return replace(params, logits_processor=processor)


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
