"""Prometheus metrics in a per-app registry (tests build many apps; the global one would clash)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Receive, Scope, Send

# Continuations take seconds; the buckets span a fast GPU batch to a slow CPU /extend.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "snac_dit_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "snac_dit_request_seconds",
            "HTTP request latency (until the last byte)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "snac_dit_queue_depth",
            "continuations waiting plus /extend streams in progress",
            registry=r,
        )
        self.batch_size = Histogram(
            "snac_dit_batch_size",
            "requests per engine batch",
            buckets=tuple(range(1, max_batch + 1)),
            registry=r,
        )
        self.engine_seconds = Histogram(
            "snac_dit_engine_seconds",
            "engine time per batch or /extend chunk",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.engine_errors = Counter(
            "snac_dit_engine_errors", "engine calls that raised", ["kind"], registry=r
        )
        self.dropped = Counter(
            "snac_dit_dropped", "queued work dropped because its client disconnected", registry=r
        )
        self.rejected = Counter(
            "snac_dit_rejected", "requests refused because the queue was full", registry=r
        )


class MetricsMiddleware:
    """Counts every response by route template (not raw path: bounded label cardinality)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "other"
            self.metrics.requests.labels(label, str(status[0])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)
