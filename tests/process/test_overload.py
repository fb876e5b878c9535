"""Overload and timeouts on a REAL server process: load shedding (503 + Retry-After) with /healthz still
answered, and a request timeout (504) after which the server still serves."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support import BATCH, PREDICT, Server, encoded, good_png, raw_request, running_server


def photo_batch(count: int, size: int = 160) -> list[tuple[str, Any]]:
    """Large RGB photos (light background): each needs real decoding and resizing work."""
    rng = np.random.default_rng(1)
    files = []
    for i in range(count):
        pixels = np.full((size, size, 3), 235, np.uint8)
        pixels[20:140, 40:120] = rng.integers(0, 120, (120, 80, 3), np.uint8)
        files.append(("files", (f"{i}.jpg", encoded(Image.fromarray(pixels), "JPEG", quality=95), "image/jpeg")))
    return files


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two requests in flight at most, and a four-second time limit."""
    with running_server(tmp_path_factory.mktemp("tight"), max_in_flight=2, request_timeout_s=4) as server:
        yield server


def test_overload_sheds_with_503_and_retry_after(tight: Server) -> None:
    files = photo_batch(16)
    clients, statuses, latencies = 16, [], []

    async def one(client: httpx.AsyncClient) -> None:
        start = time.perf_counter()
        response = await client.post(BATCH, files=files)
        latencies.append(time.perf_counter() - start)
        statuses.append(response.status_code)
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert response.json() == {"error": "server overloaded, retry later"}
        else:
            assert response.status_code == 200, response.text[:300]

    async def main() -> float:
        limits = httpx.Limits(max_connections=clients + 4)
        async with httpx.AsyncClient(base_url=tight.url, timeout=60, limits=limits) as client:
            load = [asyncio.create_task(one(client)) for _ in range(clients)]
            await asyncio.sleep(0.05)
            start = time.perf_counter()
            health = await client.get("/healthz")  # exempt: answered even while shedding
            health_seconds = time.perf_counter() - start
            assert health.status_code == 200
            await asyncio.gather(*load)
            return health_seconds

    health_seconds = asyncio.run(main())
    shed, served = statuses.count(503), statuses.count(200)
    print(
        f"overload: {clients} concurrent batches of 16 photos, max_in_flight=2: {served} served, {shed} shed (503); "
        f"latency max {max(latencies):.2f} s; /healthz during the load {health_seconds * 1000:.0f} ms"
    )
    assert shed >= 1 and served >= 2 and shed + served == clients
    assert max(latencies) < 30  # bounded: shed requests are answered at once, not queued
    assert httpx.post(tight.url + BATCH, files=files[:2], timeout=30).status_code == 200


def test_request_timeout_gives_504_and_server_recovers(tight: Server) -> None:
    # A client that stops sending its body: the handler waits on it, and the limit cancels the wait.
    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n"
        b"X-Request-ID: slow-1\r\n\r\n"
    )
    start = time.perf_counter()
    status, _, body = raw_request(tight.url, head + good_png()[:50], timeout=15)
    seconds = time.perf_counter() - start
    print(f"timeout: 504 after {seconds:.2f} s (limit 4 s)")
    assert status == 504 and "longer than 4 s" in json.loads(body)["error"]
    assert 3.9 <= seconds < 12
    assert tight.wait_for_log({"slow-1"})["slow-1"]["status"] == 504
    response = httpx.post(tight.url + PREDICT, content=good_png(), headers={"Content-Type": "image/png"}, timeout=10)
    assert response.status_code == 200
