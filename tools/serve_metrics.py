"""Prometheus metrics of `decodekit serve` (one registry per app, so tests can run several servers)."""

from __future__ import annotations

from typing import Any

from ..runtime.request import Delta, Stream
from ..runtime.scheduler import Scheduler

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    """requests by endpoint and HTTP status, disconnects, generated tokens, queue / slots / tokens-per-second
    gauges read from the scheduler, time to first token and inter-token latency histograms."""

    def __init__(self, scheduler: Scheduler) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("decodekit_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "code"], registry=r)
        self.disconnects = Counter("decodekit_client_disconnects", "requests whose client left before the end "
                                   "(their slot was freed)", registry=r)
        self.tokens = Counter("decodekit_generated_tokens", "tokens sent to clients", registry=r)
        Gauge("decodekit_queue_length", "requests waiting for a slot", registry=r).set_function(
            lambda: scheduler.queue_length)
        Gauge("decodekit_active_slots", "cache rows serving a request", registry=r).set_function(
            lambda: scheduler.active)
        Gauge("decodekit_slots", "cache rows of the engine", registry=r).set(len(scheduler.slots))
        Gauge("decodekit_tokens_per_second", "generated tokens per second over the last 10 s",
              registry=r).set_function(scheduler.tokens_per_second)
        self.ttft = Histogram("decodekit_time_to_first_token_seconds", "from submission to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("decodekit_inter_token_latency_seconds", "between successive tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)

    def observe(self, stream: Stream, delta: Delta, last: dict[str, Any]) -> None:
        """Account one delta of ``stream`` (its tokens may span several steps); ``last`` keeps the request's
        previous token time."""
        n = len(delta.token_ids)
        if not n:
            return
        self.tokens.inc(n)
        prev = last.get("t")
        if prev is None:
            first = delta.first_time if delta.first_time is not None else delta.time
            self.ttft.observe(first - stream.submitted)
            prev, n = first, n - 1
        for _ in range(n):
            self.itl.observe((delta.time - prev) / n)
        last["t"] = delta.time

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
