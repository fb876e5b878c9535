"""Prometheus metrics: requests by route and status, latency, queue and inference time, batch sizes,
requests in flight, a model info series per version served and failed model loads. Served at /metrics
(service/api/health.py). Inference metrics carry the `model` and `version` labels of the version that ran.

Each app gets its own registry (tests build many apps). With several uvicorn workers,
`python -m service` sets PROMETHEUS_MULTIPROC_DIR and /metrics aggregates every worker.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
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
        version = ["model", "version"]
        self.queue_time = Histogram(
            "inference_queue_seconds",
            "Time a request waited for its batch to run",
            version,
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.inference_time = Histogram(
            "inference_seconds", "onnxruntime session.run time per batch", version, buckets=FAST_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "inference_batch_size", "Images per session.run", version, buckets=BATCH_BUCKETS, registry=r
        )
        self.images = Counter("inference_images_total", "Images run through the model", version, registry=r)
        self.model_info = Gauge(
            "model_info",
            "1 for each model version being served (0 once released)",
            ["model", "version", "providers"],
            registry=r,
            multiprocess_mode="max",
        )
        self.load_failures = Counter(
            "model_load_failures", "Model versions that failed to load (each new failure once)", version, registry=r
        )

    # The model repository's observer (service.repository.Observer).

    def batch_observer(self, model: str, version: str) -> Callable[[int, list[float], float], None]:
        """Called after each session run of one version, with its labelled children looked up once."""
        size, images = self.batch_size.labels(model, version), self.images.labels(model, version)
        run, queue = self.inference_time.labels(model, version), self.queue_time.labels(model, version)

        def observe(n: int, queue_seconds: list[float], run_seconds: float) -> None:
            size.observe(n)
            images.inc(n)
            run.observe(run_seconds)
            for seconds in queue_seconds:
                queue.observe(seconds)

        return observe

    def version_served(self, model: str, version: str, providers: list[str]) -> None:
        self.model_info.labels(model, version, ",".join(providers)).set(1)

    def version_released(self, model: str, version: str, providers: list[str]) -> None:
        # Set to 0 rather than removed: with several workers the value lives in a file per process.
        self.model_info.labels(model, version, ",".join(providers)).set(0)

    def load_failed(self, model: str, version: str, reason: str) -> None:
        self.load_failures.labels(model, version).inc()

    def exposition(self) -> bytes:
        if directory := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            forget_dead_processes(directory)
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def forget_dead_processes(directory: str) -> list[int]:
    """Drop the live gauges (`livesum`, `liveall`, ...: requests in flight) of worker processes that have died:
    a worker killed by a signal never says so itself, and its last values stayed in /metrics for good (uvicorn
    replaces the worker, with a new pid). Counters and histograms stay: what a dead worker counted happened.
    Returns the pids forgotten."""
    dead = []
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid_text = path.rsplit("_", 1)[-1].removesuffix(".db")
        if pid_text.isdigit() and not _alive(int(pid_text)) and int(pid_text) not in dead:
            dead.append(int(pid_text))
    for pid in dead:
        mark_process_dead(pid, directory)
    return dead


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not one of ours, so not ours to forget
    try:  # a zombie (dead, not yet reaped by the supervisor) is dead
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return True


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
