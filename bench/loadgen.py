"""A lean closed-loop HTTP/1.1 load generator on raw sockets (asyncio protocols, uvloop when present).

N keep-alive connections each send a prebuilt request, wait for the whole response, and send the
next: a closed loop, so every latency is a real request's own, timed here from the first byte
written to the last byte read. No coordinated-omission "correction" is applied: in a closed loop
the server sets the pace, and the figures are what each caller saw.

    python -m bench.loadgen --url http://127.0.0.1:8000 --kind single --concurrency 32 --seconds 10
prints one JSON object: requests, errors, requests/s, images/s, latency percentiles in ms.

Kinds (bench/data.py builds the requests from the same 200 test images):
    single   POST /v1/predict, one PNG as multipart field `file`
    batch    POST /v1/predict/batch, --batch-size PNGs as multipart field `files`
    v2-fp32  POST /v2/models/<--model>/infer, one image as a binary FP32 tensor [1, 28, 28, 1]
    v2-png   the same route, the PNG file as one binary BYTES element
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from bench import data


@dataclass
class Run:
    requests: list[bytes]
    images_per_request: int
    warmup_until: float
    end_at: float
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: int = 0  # connection errors and unparseable responses
    completed: int = 0  # every response, warm-up included: the server's CPU time is shared among these
    first_bodies: dict[int, bytes] = field(default_factory=dict)  # one body per status, for error reports

    def __post_init__(self) -> None:
        self._cycle = itertools.cycle(self.requests)

    def next_request(self) -> bytes:
        return next(self._cycle)


class Connection(asyncio.Protocol):
    """One keep-alive connection that sends its next request as soon as a response is complete."""

    def __init__(self, run: Run, done: asyncio.Future[None]) -> None:
        self.run = run
        self.done = done
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.buffer = bytearray()
        self.expect = -1  # total response length once the headers are in
        self.status = 0
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.send_next()

    def send_next(self) -> None:
        assert self.transport is not None
        if time.perf_counter() >= self.run.end_at:
            self.transport.close()
            return
        self.buffer.clear()
        self.expect = -1
        request = self.run.next_request()
        self.sent_at = time.perf_counter()
        self.transport.write(request)

    def data_received(self, chunk: bytes) -> None:
        self.buffer += chunk
        if self.expect < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            if at < 0 or not head.startswith(b"http/1.1 "):
                self.fail()
                return
            stop = head.find(b"\r\n", at + 2)
            self.status = int(head[9:12])
            self.expect = end + 4 + int(head[at + 17 : stop if stop > 0 else None])
        if len(self.buffer) < self.expect:
            return
        finished = time.perf_counter()
        run = self.run
        run.completed += 1
        if self.sent_at >= run.warmup_until and finished <= run.end_at:
            run.latencies.append(finished - self.sent_at)
            run.statuses[self.status] += 1
            if self.status != 200 and self.status not in run.first_bodies:
                run.first_bodies[self.status] = bytes(self.buffer[: self.expect])
        self.send_next()

    def fail(self) -> None:
        self.run.failures += 1
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if time.perf_counter() < self.run.end_at and exc is not None:
            self.run.failures += 1
        if not self.done.done():
            self.done.set_result(None)


async def _connection(host: str, port: int, run: Run) -> None:
    loop = asyncio.get_running_loop()
    # A connection the server drops is replaced until the run ends (each replacement counts as a failure).
    while time.perf_counter() < run.end_at:
        done: asyncio.Future[None] = loop.create_future()
        try:
            await loop.create_connection(functools.partial(Connection, run, done), host, port)
        except OSError:
            run.failures += 1
            await asyncio.sleep(0.05)
            continue
        # Bounded: a connection that never finishes is given up shortly after the run's end.
        try:
            await asyncio.wait_for(asyncio.shield(done), max(0.0, run.end_at - time.perf_counter()) + 5.0)
        except TimeoutError:
            run.failures += 1
            return


async def load(
    url: str, requests: list[bytes], images_per_request: int, concurrency: int, seconds: float, warmup: float
) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    start = time.perf_counter()
    run = Run(requests, images_per_request, warmup_until=start + warmup, end_at=start + warmup + seconds)
    await asyncio.gather(*(_connection(host, port, run) for _ in range(concurrency)))
    return summarise(run, seconds, concurrency)


def summarise(run: Run, seconds: float, concurrency: int) -> dict[str, Any]:
    lat = np.array(run.latencies) * 1000
    ok = run.statuses.get(200, 0)
    errors = sum(run.statuses.values()) - ok + run.failures
    percentiles = np.percentile(lat, [50, 90, 99]).tolist() if lat.size else [float("nan")] * 3
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "requests": int(lat.size),
        "completed": run.completed,
        "errors": errors,
        "statuses": {str(k): v for k, v in sorted(run.statuses.items())},
        "rps": lat.size / seconds,
        "images_per_s": ok * run.images_per_request / seconds,
        "p50_ms": percentiles[0],
        "p90_ms": percentiles[1],
        "p99_ms": percentiles[2],
        "max_ms": float(lat.max()) if lat.size else float("nan"),
        "error_sample": {str(k): v[-300:].decode(errors="replace") for k, v in run.first_bodies.items()},
    }


KINDS = ["single", "batch", "v2-fp32", "v2-png"]


def build(kind: str, path: str | None, batch_size: int, model: str = data.MODEL) -> tuple[list[bytes], int]:
    if kind == "single":
        return data.single_requests(path or "/v1/predict"), 1
    if kind == "batch":
        return data.batch_requests(path or "/v1/predict/batch", batch_size), batch_size
    if kind in ("v2-fp32", "v2-png"):
        return data.v2_requests(kind, path or data.v2_path(model)), 1
    raise ValueError(f"unknown kind {kind!r}")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed: the client must stay far cheaper per request than the server it measures."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--kind", choices=KINDS, default="single")
    parser.add_argument("--path", help="route (default /v1/predict, /v1/predict/batch, /v2/models/MODEL/infer)")
    parser.add_argument("--model", default=data.MODEL, help=f"model name in the V2 route (default {data.MODEL})")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args(argv)
    requests, images = build(args.kind, args.path, args.batch_size, args.model)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        result = runner.run(load(args.url, requests, images, args.concurrency, args.seconds, args.warmup))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
