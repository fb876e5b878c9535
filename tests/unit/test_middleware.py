"""service/api/middleware.py on a tiny ASGI app: the in-flight bound, the timeout, header limits, request ids,
API keys and the JSON access log line."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from service.api import middleware

RELEASE: asyncio.Event | None = None


def tiny_app() -> Starlette:
    async def fast(_: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def held(_: Request) -> PlainTextResponse:
        assert RELEASE is not None
        await RELEASE.wait()
        return PlainTextResponse("released")

    async def sleepy(request: Request) -> PlainTextResponse:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            request.app.state.cancelled = True
            raise
        return PlainTextResponse("too late")

    async def boom(_: Request) -> PlainTextResponse:
        raise TimeoutError("the app's own timeout")

    async def state(request: Request) -> JSONResponse:
        return JSONResponse({"request_id": request.state.request_id})

    routes = [Route(p, f) for p, f in (("/fast", fast), ("/held", held), ("/sleepy", sleepy), ("/boom", boom))]
    routes += [Route("/healthz", fast), Route("/state", state)]
    app = Starlette(routes=routes)
    app.state.cancelled = False
    return app


def test_in_flight_bound_is_exact_and_health_is_exempt() -> None:
    async def main() -> list[int]:
        global RELEASE
        RELEASE = asyncio.Event()
        app = tiny_app()
        middleware.install_middleware(app, max_in_flight=3, request_timeout_s=5)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            held = [asyncio.create_task(client.get("/held")) for _ in range(3)]
            await asyncio.sleep(0.1)
            extra = [await client.get("/fast") for _ in range(4)]
            health = await client.get("/healthz")
            RELEASE.set()
            done = await asyncio.gather(*held)
            after = await client.get("/fast")
        assert all(r.status_code == 503 and r.headers["retry-after"] == "1" for r in extra)
        assert extra[0].json() == {"error": "server overloaded, retry later"}
        assert health.status_code == 200 and after.status_code == 200
        return [r.status_code for r in done]

    assert asyncio.run(main()) == [200, 200, 200]


def test_timeout_cancels_the_handler() -> None:
    app = tiny_app()
    middleware.install_middleware(app, request_timeout_s=0.2)
    with TestClient(app, raise_server_exceptions=False) as client:
        start = time.perf_counter()
        response = client.get("/sleepy")
        assert response.status_code == 504 and time.perf_counter() - start < 2
        assert response.json()["error"].startswith("request took longer than 0.2 s")
        assert app.state.cancelled
        # The app's own TimeoutError is its bug, not the limit: a 500, not a 504.
        assert client.get("/boom").status_code == 500


def test_header_limit_and_request_id_rules() -> None:
    app = tiny_app()
    middleware.install_middleware(app, max_header_bytes=1000)
    with TestClient(app) as client:
        big = client.get("/fast", headers={"X-Pad": "p" * 2000})
        assert big.status_code == 431 and "error" in big.json() and big.headers["x-request-id"]
        assert client.get("/state", headers={"X-Request-ID": "  abc  "}).json() == {"request_id": "abc"}
    assert middleware.clean_request_id(b"ok-123") == "ok-123"
    assert middleware.clean_request_id("é".encode()) is None
    assert middleware.clean_request_id(b"a" * 129) is None
    assert middleware.clean_request_id(b"") is None
    assert middleware.parse_api_keys(" a, ,b ") == ("a", "b")


def test_access_log_line_fields() -> None:
    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    keep = Keep()
    logger = logging.getLogger("service.access")
    level = logger.level
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    try:
        app = tiny_app()
        middleware.install_middleware(app)
        with TestClient(app) as client:
            client.get("/fast?token=" + "t" * 500 + "&n=1", headers={"X-Request-ID": "unit-1"})
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
    assert len(keep.lines) == 1
    line = json.loads(keep.lines[0])
    assert set(line) == {
        "ts",
        "request_id",
        "method",
        "path",
        "query",
        "status",
        "duration_ms",
        "bytes_in",
        "bytes_out",
        "client",
        "user_agent",
    }
    assert line["request_id"] == "unit-1" and line["status"] == 200 and line["bytes_out"] == 2
    assert line["query"] == "token=" + "t" * 64 + "…&n=1"


@pytest.mark.parametrize("path", ["/v1/predict", "/v1/prédire/日本", "/bad/\udcff", "/ctl/\x00\x1b\n"])
def test_access_log_lines_are_ascii_json_whatever_the_path(path: str) -> None:
    """orjson writes the usual line; non-ASCII and strings orjson refuses (lone surrogates, which a
    server may hand over for undecodable bytes) go through json, escaped: every line one ASCII JSON object."""
    scope = {"method": "POST", "path": path, "query_string": b"k=v", "client": ("10.0.0.1", 5), "headers": []}
    line = middleware.AccessLogMiddleware._line(scope, "id-1", 1_700_000_000.5, 200, 0.0123, 10, 20)
    assert line.isascii() and "\n" not in line  # one line, however the path is made
    record = json.loads(line)
    assert record["path"] == path and record["status"] == 200 and record["duration_ms"] == 12.3
    assert record["query"] == "k=v" and record["client"] == "10.0.0.1" and record["user_agent"] is None


def test_access_log_timestamp_is_datetimes_isoformat() -> None:
    """The access log formats its timestamps itself (cheaper); they must read as datetime writes them,
    rounding and carries into the next second included."""
    from datetime import UTC, datetime

    rng = random.Random(5)
    moments = [0.0, 0.9995, 0.9999996, 59.9999999, 1_700_000_000.4555, 4_102_444_799.9999997]
    moments += [rng.uniform(0, 4e9) for _ in range(20_000)] + [round(rng.uniform(0, 4e9), 3) for _ in range(20_000)]
    for moment in moments:
        assert middleware._timestamp(moment) == datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------------------- API keys


def test_api_key_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    app = tiny_app()
    middleware.install_middleware(app, api_keys="k-one, k-two")
    with TestClient(app) as client:
        assert client.get("/fast", headers={"X-API-Key": "k-two"}).status_code == 200
        # Every key is tried, on digests of equal length, whichever matches.
        assert len(calls) == 2 and all(len(a) == len(b) == 32 for a, b in calls)
        assert client.get("/fast", headers={"X-API-Key": "k-three"}).status_code == 401


def test_no_key_configured_means_open() -> None:
    for value in (None, "", " , "):
        app = tiny_app()
        middleware.install_middleware(app, api_keys=value)
        with TestClient(app) as client:
            assert client.get("/fast").status_code == 200
