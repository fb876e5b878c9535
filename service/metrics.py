"""Prometheus metrics: requests by route and status, latency, queue and inference time, batch sizes,
requests in flight, and a model info series. Served at /metrics (service/api/health.py).

Each app gets its own registry (tests build many apps). With several uvicorn workers,
`python -m service` sets PROMETHEUS_MULTIPROC_DIR and /metrics aggregates every worker.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
FAST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("http_requests_total", "HTTP requests", ["method", "route", "status"], registry=r)
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time from request to response",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "http_requests_in_flight", "Requests being handled", registry=r, multiprocess_mode="livesum"
        )
        self.queue_time = Histogram(
            "inference_queue_seconds", "Time a request waited for its batch to run", buckets=FAST_BUCKETS, registry=r
        )
        self.inference_time = Histogram(
            "inference_seconds", "onnxruntime session.run time per batch", buckets=FAST_BUCKETS, registry=r
        )
        self.batch_size = Histogram("inference_batch_size", "Images per session.run", buckets=BATCH_BUCKETS, registry=r)
        self.images = Counter("inference_images_total", "Images run through the model", registry=r)
        self.model_info = Gauge(
            "model_info",
            "The model being served",
            ["name", "version", "providers"],
            registry=r,
            multiprocess_mode="max",
        )

    def observe_batch(self, size: int, queue_seconds: list[float], run_seconds: float) -> None:
        self.batch_size.observe(size)
        self.images.inc(size)
        self.inference_time.observe(run_seconds)
        for seconds in queue_seconds:
            self.queue_time.observe(seconds)

    def exposition(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI: counts and times every HTTP request by its route template (bounded label values)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # The labelled children, looked up once per (method, route, status): labels() takes a lock
        # and validates its arguments on every call. Routes are templates, so this stays small.
        self.counters: dict[tuple[str, str, int], Any] = {}
        self.timers: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 499  # no response started: the client went away (nginx's "client closed request")
        self.metrics.in_flight.inc()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - start
            route, method = _route(scope), scope["method"]
            counter = self.counters.get((method, route, status))
            if counter is None:
                counter = self.metrics.requests.labels(method, route, str(status))
                self.counters[method, route, status] = counter
            timer = self.timers.get((method, route))
            if timer is None:
                timer = self.timers[method, route] = self.metrics.latency.labels(method, route)
            counter.inc()
            timer.observe(seconds)


def _route(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
