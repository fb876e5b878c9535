"""The memory attacks of issue 21 against the app in-process: huge canvases of every mode under a memory budget
(413 when one can never fit, 503 with Retry-After when there is no room in time), inflation bombs in .npz and
gzip bodies, malformed containers; work that stops when its request is cancelled (its time limit, its client
gone); bodies read before a slot is taken (slow uploads hold none; a pause is a 408).

The same payloads go to the real container with a 1 GiB limit in tests/container/test_hostile_memory.py; the
decoders are fuzzed in tests/unit/test_decoder_fuzz.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service import imaging
from service.app import create_app
from tests.support import (
    BATCH,
    CANVAS_KINDS,
    INFER,
    PREDICT,
    canvas,
    good_png,
    gzip_json_bomb,
    make_settings,
    npy_of,
    npz_corrupt_deflate,
    npz_encrypted,
    npz_inflation_bomb,
    npz_unknown_method,
    png_strip,
)

SIDE = 3000  # 9-megapixel canvases: the budget below serves some and refuses others, in seconds
BUDGET_MB = 64


def error_of(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.headers
    message = response.json()["error"]
    assert isinstance(message, str) and message
    return message


@pytest.fixture(scope="module")
def budgeted() -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(memory_budget_mb=BUDGET_MB)), raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize("kind", [kind for kind, *_ in CANVAS_KINDS])
def test_huge_canvases_are_served_or_refused_by_their_size(budgeted: TestClient, kind: str) -> None:
    """Each decode reserves its working memory from the header: within the budget it is served (reduced
    early), past it a 413 that says how much it needs; nothing is left reserved afterwards."""
    data = canvas(kind, SIDE)
    response = budgeted.post(PREDICT, content=data, headers={"Content-Type": "application/octet-stream"})
    plane = budgeted.app.state.dataplane  # type: ignore[attr-defined]
    image = imaging._open(data, imaging.ImageLimits())
    cost = imaging.decode_cost(*image.size, image.mode, image.format)
    if cost <= BUDGET_MB << 20:
        assert response.status_code == 200, response.text
        assert np.isclose(sum(response.json()["probabilities"]), 1, atol=1e-4)
    else:
        assert response.status_code == 413, response.text
        assert "MiB of memory" in error_of(response) and f"budget of {BUDGET_MB} MiB" in error_of(response)
    assert plane.budget.used == 0


def test_no_room_in_time_is_503_with_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two decodes that fit only one at a time, with no patience: one waits in vain and gets 503."""
    app = create_app(make_settings(memory_budget_mb=64, memory_wait_s=0.05))
    real = imaging._reduced

    def slow_reduced(image: Any) -> Any:
        time.sleep(0.5)  # the first decode holds its reservation a while
        return real(image)

    monkeypatch.setattr(imaging, "_reduced", slow_reduced)
    data = canvas("png-rgb", 2000)
    cost = imaging.decode_cost(2000, 2000, "RGB", "PNG")
    assert 32 << 20 < cost <= 60 << 20, cost  # one fits, two do not

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            posts = [c.post(PREDICT, content=data, headers={"Content-Type": "image/png"}) for _ in range(2)]
            return list(await asyncio.gather(*posts))

    responses = asyncio.run(main())
    assert sorted(r.status_code for r in responses) == [200, 503], [r.text for r in responses]
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "no room" in error_of(busy)


BOMBS = {
    "npz bzip2 member inflating to 256 MiB": (BATCH, "application/x-npz", lambda: npz_inflation_bomb(method=12), 400),
    "npz encrypted member": (BATCH, "application/x-npz", npz_encrypted, 400),
    "npz unknown compression method": (BATCH, "application/x-npz", npz_unknown_method, 400),
    "npz corrupt deflate stream": (BATCH, "application/x-npz", npz_corrupt_deflate, 400),
    "npy header cut short": (BATCH, "application/x-npy", lambda: npy_of(np.zeros((2, 28, 28), np.uint8))[:50], 400),
    "npy header cut at its length": (
        BATCH,
        "application/x-npy",
        lambda: npy_of(np.zeros((2, 28, 28), np.uint8))[:9],
        400,
    ),  # noqa: E501
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_bombs_and_malformed_containers_are_400(client: TestClient, name: str) -> None:
    path, content_type, make, status = BOMBS[name]
    response = client.post(path, content=make(), headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    error_of(response)


def test_npz_member_lying_about_its_size_is_never_inflated_past_it(client: TestClient) -> None:
    """A deflate member declaring two images whose stream goes on for 256 MiB: only the declared bytes are read
    (the rest is never inflated), and those bytes are a valid array."""
    response = client.post(BATCH, content=npz_inflation_bomb(), headers={"Content-Type": "application/x-npz"})  # noqa: E501
    assert response.status_code == 200 and response.json()["count"] == 2


@pytest.mark.parametrize("pattern", [b"[],", b"{},", b"0,"])
def test_gzip_json_bombs_stop_at_the_json_limit(client: TestClient, pattern: bytes) -> None:
    """64 KiB of gzip inflating to 64 MiB: stopped at the V2 JSON limit (16 MiB) while inflating."""
    start = time.perf_counter()
    response = client.post(
        INFER, content=gzip_json_bomb(pattern), headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )
    assert response.status_code == 413 and "exceeds the limit of 16,777,216" in error_of(response)
    assert time.perf_counter() - start < 5


def test_json_of_a_shape_no_request_has_is_refused_before_it_is_parsed(client: TestClient) -> None:
    """Within the JSON limit but with more values and arrays than the largest batch can hold: 413 from counting,
    no millions of Python lists made (and no parse holding the interpreter)."""
    body = gzip_json_bomb(b"[],", inflated=12 << 20)
    start = time.perf_counter()
    response = client.post(
        INFER, content=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )
    assert response.status_code == 413 and "values and arrays" in error_of(response)
    assert time.perf_counter() - start < 2


def test_a_maximal_valid_json_batch_is_served(client: TestClient) -> None:
    """The limits leave room for what the protocol allows: 256 images of FP32 as nested JSON numbers, gzipped,
    their probabilities asked for. Every output of 256 images as JSON numbers (~500 MB to write) is a 413 that
    says what to ask for instead."""
    import gzip
    import json

    values = np.random.default_rng(0).random((256, 28, 28, 1), dtype=np.float32)
    tensor = {"name": "image", "datatype": "FP32", "shape": [256, 28, 28, 1], "data": values.tolist()}
    body = json.dumps({"inputs": [tensor], "outputs": [{"name": "probabilities"}]}).encode()
    assert len(body) < 16 << 20
    gz = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    response = client.post(INFER, content=gzip.compress(body), headers=gz)
    assert response.status_code == 200, response.text[:300]
    assert response.json()["outputs"][0]["shape"] == [256, 10]
    everything = client.post(INFER, content=gzip.compress(json.dumps({"inputs": [tensor]}).encode()), headers=gz)
    assert everything.status_code == 413 and "fewer outputs" in error_of(everything)


def test_a_12500000_by_2_png_is_a_tensor(client: TestClient) -> None:
    response = client.post(PREDICT, content=png_strip(), headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------------------- work stops with its request


def counting_decodes(monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[float]:
    """Make each image decode take `seconds`; returns the list of times decodes finished."""
    done: list[float] = []
    real = imaging.preprocess

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        result = real(*args, **kwargs)
        done.append(time.monotonic())
        return result

    monkeypatch.setattr(imaging, "preprocess", slow)
    return done


def photo_batch(count: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    from tests.support import encoded, garment

    return [("files", (f"{i}.jpg", encoded(garment((120, 90), "RGB"), "JPEG"), "image/jpeg")) for i in range(count)]


def test_a_timed_out_batch_stops_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past its time limit the request gets 504 and its remaining images are not decoded: at most the one in
    progress finishes, not the other 30."""
    app = create_app(make_settings(request_timeout_s=0.5))
    with TestClient(app, raise_server_exceptions=False) as client:
        done = counting_decodes(monkeypatch, 0.1)
        response = client.post(BATCH, files=photo_batch(40))
        stopped = time.monotonic()
        assert response.status_code == 504
        time.sleep(0.6)
        after = [t for t in done if t > stopped + 0.15]
        assert len(done) <= 8 and not after, (len(done), len(after))


def test_a_client_that_disconnects_stops_its_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client goes away mid-batch: the handler is cancelled, and its decoding stops within an image; the
    batch-mates of other requests are untouched (the next request is served)."""
    app = create_app(make_settings())
    body, content_type = multipart(photo_batch(40))

    async def main() -> tuple[list[dict[str, Any]], int]:
        async with app.router.lifespan_context(app):
            done = counting_decodes(monkeypatch, 0.05)
            sent: list[dict[str, Any]] = []
            gone = asyncio.Event()
            delivered = False

            async def receive() -> dict[str, Any]:
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = http_scope(BATCH, content_type, len(body))
            task = asyncio.create_task(app(scope, receive, send))
            await asyncio.sleep(0.4)
            gone.set()
            await asyncio.wait_for(task, 5)
            count = len(done)
            await asyncio.sleep(0.5)
            assert len(done) <= count + 1, (count, len(done))
            return sent, len(done)

    sent, decoded = asyncio.run(main())
    assert decoded < 20 and not any(m["type"] == "http.response.start" for m in sent), (decoded, sent[:1])
    with TestClient(app) as client:
        assert client.post(PREDICT, content=good_png(), headers={"Content-Type": "image/png"}).status_code == 200


# ------------------------------------------------------------------------------------- slow clients


def multipart(files: list[tuple[str, tuple[str, bytes, str]]]) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://t/", files=files)
    return request.read(), request.headers["content-type"]


def http_scope(path: str, content_type: str, length: int) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", content_type.encode()), (b"content-length", str(length).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("t", 80),
    }


async def call(app: FastAPI, path: str, content_type: str, chunks: list[tuple[float, bytes]]) -> tuple[int, bytes]:
    """The app called directly, its body arriving as (delay, bytes) chunks; (status, body) of its answer."""
    length = sum(len(c) for _, c in chunks)
    queue = list(chunks)
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if queue:
            delay, chunk = queue.pop(0)
            await asyncio.sleep(delay)
            return {"type": "http.request", "body": chunk, "more_body": bool(queue)}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(http_scope(path, content_type, length), receive, send)
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


def test_slow_uploads_hold_no_slot_and_a_pause_is_408() -> None:
    """One slot (max_in_flight=1): a body trickling in does not take it, so a complete request is served
    meanwhile; a body that pauses past body_idle_timeout_s is answered 408."""
    app = create_app(make_settings(max_in_flight=1, body_idle_timeout_s=0.5))
    png = good_png()

    async def main() -> tuple[tuple[int, bytes], tuple[int, bytes], tuple[int, bytes], float]:
        async with app.router.lifespan_context(app):
            trickle = asyncio.create_task(
                call(app, PREDICT, "image/png", [(0.3, png[i : i + 20]) for i in range(0, len(png), 20)])
            )  # noqa: E501
            paused = asyncio.create_task(call(app, PREDICT, "image/png", [(0, png[:10]), (5, png[10:])]))
            await asyncio.sleep(0.2)
            start = time.monotonic()
            fast = await call(app, PREDICT, "image/png", [(0, png)])
            fast_seconds = time.monotonic() - start
            return fast, await paused, await trickle, fast_seconds

    fast, paused, trickle, fast_seconds = asyncio.run(main())
    assert fast[0] == 200 and fast_seconds < 2, (fast, fast_seconds)
    assert paused[0] == 408 and b"paused" in paused[1], paused
    assert trickle[0] == 200, trickle  # slow but never idle for 0.5 s: served


def test_body_memory_is_reserved_as_it_arrives_and_released() -> None:
    """Body bytes count against the budget as they come: a second body finds no room (503), one larger than
    the whole budget is 413, and everything is released afterwards."""
    app = create_app(make_settings(memory_budget_mb=1, memory_wait_s=0.1))
    blob, npy = bytes(600_000), "application/x-npy"

    async def main() -> list[tuple[int, bytes]]:
        async with app.router.lifespan_context(app):
            held = asyncio.create_task(call(app, BATCH, npy, [(0, blob[:500_000]), (0.4, blob[500_000:])]))
            await asyncio.sleep(0.1)
            second = await call(app, BATCH, npy, [(0, blob)])  # 600 KB beside 500 KB: not within 1 MiB
            first = await held
            too_big = await call(app, BATCH, npy, [(0, bytes(2 << 20))])
            return [first, second, too_big]

    first, second, too_big = asyncio.run(main())
    assert first[0] == 200 and b'"failed":1' in first[1]  # read whole, then served (its one item: no image)
    assert second[0] == 503 and b"no room" in second[1]
    assert too_big[0] == 413 and b"budget" in too_big[1]
    assert app.state.dataplane.budget.used == 0


def test_waiting_threads_and_the_loop_are_not_blocked_by_a_budget_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a decode waits for room in a worker thread, the event loop serves other requests."""
    app = create_app(make_settings(memory_budget_mb=64, memory_wait_s=3))
    with TestClient(app) as client:
        plane = app.state.dataplane
        hog = plane.budget.reserve(60 << 20, "a test's hog")
        result: list[int] = []
        thread = threading.Thread(
            target=lambda: result.append(
                client.post(PREDICT, content=canvas("png-rgb", 2000), headers={"Content-Type": "image/png"}).status_code
            )
        )
        thread.start()
        time.sleep(0.3)
        start = time.monotonic()
        assert client.get("/healthz").status_code == 200
        assert client.post(PREDICT, content=good_png(), headers={"Content-Type": "image/png"}).status_code == 200
        assert time.monotonic() - start < 1
        hog.release()
        thread.join(10)
        assert result == [200]
