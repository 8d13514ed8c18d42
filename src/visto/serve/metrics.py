"""Prometheus metrics of one server (its own registry, so several apps can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "visto_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "visto_request_latency_seconds",
            "time to the response's first byte (streams: to the headers)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generation_seconds = Histogram(
            "visto_generation_seconds", "time from submit to the last token of a chat request",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("visto_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter(
            "visto_completion_tokens", "tokens generated", registry=r
        )
        self.cancelled = Counter(
            "visto_requests_cancelled", "chat requests stopped early", ["reason"], registry=r
        )
        self.rejected = Counter(
            "visto_requests_rejected", "requests refused with 429 (slots and line full)", registry=r
        )
        self.batch_rows = Histogram(
            "visto_batch_rows", "rows per batched generation", buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.queue_depth = Gauge("visto_queue_depth", "requests waiting for a batch", registry=r)
        self.in_flight = Gauge(
            "visto_requests_in_flight", "chat requests admitted and not yet answered", registry=r
        )
        self.waiting = Gauge(
            "visto_requests_waiting", "chat requests waiting in line for a slot", registry=r
        )
        self.queue_wait_seconds = Histogram(
            "visto_queue_wait_seconds", "time a chat request waited for a slot",
            buckets=LATENCY_BUCKETS, registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
