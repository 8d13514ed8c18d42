"""Admission: at most `max_running` chat requests in flight, up to `max_queued` more waiting
for a slot in arrival order, and a refusal (HTTP 429) beyond that.

Why a queue and not only a 429: under overload a client that is refused comes back, and every
refused attempt costs the server a parsed body and an answer while the model is busy. Queued
requests cost nothing while they wait (an open connection and its body), they are served in
the order they came (a retrying client cannot overtake one that has waited longer), and the
model's batch stays full. The bound keeps the memory of queued bodies and the wait finite;
beyond it the client is told to come back (`Retry-After`).

Everything here runs on the event loop's thread, so the counters need no lock. A slot that a
finished request gives back passes straight to the first live waiter.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable


class QueueFull(Exception):
    """Every slot is taken and `max_queued` requests are already waiting."""


class LeftQueue(Exception):
    """A waiting request gave up its place: the client went away or its deadline passed."""

    def __init__(self, reason: str) -> None:  # "client_disconnected" or "timeout"
        super().__init__(reason)
        self.reason = reason


class Admission:
    def __init__(self, max_running: int, max_queued: int, poll_s: float = 0.25) -> None:
        assert max_running >= 1 and max_queued >= 0
        self.max_running, self.max_queued = max_running, max_queued
        self.poll_s = poll_s  # how often a waiter checks its client is still there
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, disconnected: Callable[[], Awaitable[bool]], deadline: float) -> None:
        """Take a slot, waiting in line for one if need be. Raises QueueFull when the line is
        at its bound, LeftQueue when the client leaves (`disconnected()`) or `deadline`
        (time.monotonic()) passes while it waits; either way it holds no slot then."""
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            return
        if self.waiting >= self.max_queued:
            raise QueueFull
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LeftQueue("timeout")
                done, _ = await asyncio.wait({turn}, timeout=min(self.poll_s, remaining))
                if done:
                    return  # release() handed its slot over: self.running already counts it
                if await disconnected():
                    raise LeftQueue("client_disconnected")
        except BaseException:  # LeftQueue, or the handler's task cancelled
            if turn.done() and not turn.cancelled():
                self.release()  # the slot arrived as we left: pass it on
            else:
                turn.cancel()
                self._waiters.remove(turn)
            raise

    def release(self) -> None:
        """Give a slot back: to the longest-waiting request, or free it."""
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        assert self.running > 0, "release() without a matching acquire()"
        self.running -= 1
