"""Pure ASGI middleware in front of every route: request ids and JSON access logs, a bound on header
size, an optional API key, and overload protection (a bound on requests in flight, a time limit).

Pure ASGI rather than Starlette's BaseHTTPMiddleware: that one runs each request in an extra task and
buffers streaming bodies, which costs latency and breaks cancellation. Order, outermost first:

    AccessLogMiddleware   every request gets an id and one log line, including the 4xx/503/504 below
    HeaderLimitMiddleware 431 for oversized headers
    ApiKeyMiddleware      401 before any work, so unauthenticated traffic never holds an in-flight slot
    LoadShedMiddleware    the body read first (408 idle, 413, memory budget), then 503 past `max_in_flight`,
                          504 past `request_timeout_s`; a client that disconnects cancels its handler
    (the FastAPI app)

`install_middleware(app, ...)` adds the four in that order. Everything is per process: each uvicorn worker
counts its own requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO
from urllib.parse import parse_qsl

import orjson
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.schemas import ErrorBody
from service.errors import ServiceError, TooLarge, error_body
from service.memory import MemoryBudget, Reservation

access_log = logging.getLogger("service.access")
log = logging.getLogger("service.middleware")

# Open without a key and never shed: orchestrators and scrapers must always get an answer from these.
HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID = 128
# Access log lines stay short whatever the client sends: long paths, query values and agents are cut.
MAX_LOGGED_PATH = 512
MAX_LOGGED_QUERY = 1024
MAX_LOGGED_VALUE = 64
MAX_LOGGED_AGENT = 200

# For FastAPI(responses=...): what these middlewares may answer on any route, declared in the OpenAPI
# document so that clients (and schema-conformance tests) know these statuses and their {"error"} body.
MIDDLEWARE_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or invalid API key (only when one is configured)"},
    431: {"model": ErrorBody, "description": "Request headers too large"},
    503: {"model": ErrorBody, "description": "Overloaded (with Retry-After), not ready, or shutting down"},
    504: {"model": ErrorBody, "description": "Took longer than the request time limit"},
}

OVERLOADED = "server overloaded, retry later"
SHUTTING_DOWN = "server shutting down: request cancelled, retry later"
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer"


# ------------------------------------------------------------------------------------------ helpers


def _header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header `name` (lower case), as the server received it."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


async def send_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """The service's one error shape, {"error": "..."}, written straight to ASGI."""
    body = error_body(message)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def clean_request_id(value: bytes | None) -> str | None:
    """The client's id if it is safe to echo and log (printable ASCII, at most 128 chars), else None."""
    if not value or len(value) > MAX_REQUEST_ID:
        return None
    text = value.decode("latin-1").strip()
    if not text or not all(" " <= c <= "~" for c in text):
        return None
    return text


@functools.lru_cache(maxsize=4)
def _second(whole: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def _timestamp(seconds: float) -> str:
    """ISO 8601 in UTC to the millisecond, as datetime's isoformat(timespec="milliseconds") writes it;
    the part up to the second is formatted once per second."""
    whole = math.floor(seconds)
    micros = round((seconds - whole) * 1e6)  # rounded to the microsecond first, as datetime does
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    return f"{_second(whole)}.{micros // 1000:03d}+00:00"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _logged_query(raw: bytes) -> str:
    """The query string with each value cut to MAX_LOGGED_VALUE chars, the whole to MAX_LOGGED_QUERY."""
    if not raw:
        return ""
    text = raw.decode("latin-1")
    pairs = parse_qsl(text, keep_blank_values=True)
    if not pairs:  # not key=value pairs at all: log it cut, as it came
        return _shorten(text, MAX_LOGGED_QUERY)
    return _shorten("&".join(f"{k}={_shorten(v, MAX_LOGGED_VALUE)}" for k, v in pairs), MAX_LOGGED_QUERY)


# ---------------------------------------------------------------------------- request id, access log


class AccessLogMiddleware:
    """Gives each request an id (the client's X-Request-ID when sane, else a new uuid4 hex), echoes it in
    the response's X-Request-ID, exposes it as `request.state.request_id`, and logs one JSON line per
    request on logger `service.access`. Sizes are counted, never contents: no body bytes are logged."""

    def __init__(self, app: ASGIApp, logger: logging.Logger = access_log) -> None:
        self.app = app
        self.logger = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # 32 random hex digits, as uuid4().hex gives, for a fifth of its cost.
        request_id = clean_request_id(_header(scope, b"x-request-id")) or os.urandom(16).hex()
        scope.setdefault("state", {})["request_id"] = request_id
        arrived, start = time.time(), time.perf_counter()
        status: int | None = None
        bytes_in = bytes_out = 0

        async def counting_receive() -> Message:
            nonlocal bytes_in
            message = await receive()
            if message["type"] == "http.request":
                bytes_in += len(message.get("body", b""))
            return message

        async def stamping_send(message: Message) -> None:
            nonlocal status, bytes_out
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            elif message["type"] == "http.response.body":
                bytes_out += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, stamping_send)
        except ClientDisconnect:
            # The client went away mid-body (or sent a body the server could not parse, which it answered
            # itself): nobody is left to answer, and it is no server error. 499 as nginx logs it.
            status = CLIENT_CLOSED
        except Exception:
            # Unhandled: the app's 500 handler answers outside this middleware; still one line here.
            if status is None:
                status = 500
            raise
        finally:
            if self.logger.isEnabledFor(logging.INFO):
                line = self._line(scope, request_id, arrived, status, time.perf_counter() - start, bytes_in, bytes_out)
                # makeRecord + handle is logger.info without the walk up the stack for the caller's
                # file and line, which an access log never shows: the dearest part of logging a line.
                self.logger.handle(self.logger.makeRecord(self.logger.name, logging.INFO, "", 0, line, (), None))

    @staticmethod
    def _line(
        scope: Scope, request_id: str, arrived: float, status: int | None, seconds: float, bytes_in: int, bytes_out: int
    ) -> str:
        client = scope.get("client")
        agent = _header(scope, b"user-agent")
        record = {
            "ts": _timestamp(arrived),
            "request_id": request_id,
            "method": scope.get("method"),
            "path": _shorten(scope.get("path", ""), MAX_LOGGED_PATH),
            "query": _logged_query(scope.get("query_string", b"")),
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "client": client[0] if client else None,
            "user_agent": _shorten(agent.decode("latin-1"), MAX_LOGGED_AGENT) if agent else None,
        }
        # orjson: 1 µs a line against json's 9. Lines stay ASCII (non-ASCII escaped as json does) for
        # log pipelines that assume it; json also takes the strings orjson refuses (lone surrogates).
        try:
            line = orjson.dumps(record)
            if line.isascii():
                return line.decode()
        except TypeError:
            pass
        return json.dumps(record, ensure_ascii=True, separators=(",", ":"))


def configure_access_log(level: int | str = logging.INFO, stream: TextIO | None = None) -> None:
    """One bare JSON object per line on stdout, whatever format the root logger uses; called where logging
    is configured (the entry point), never per app. At a level above INFO the access log is off. Only when
    nobody has configured `service.access` yet, so that a deployment's own logging config wins."""
    access_log.setLevel(level)
    if access_log.handlers:
        return
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(handler)
    access_log.propagate = False  # not a second time through the root logger's text format


# ------------------------------------------------------------------------------------- header size


class HeaderLimitMiddleware:
    """431 {"error"} when the request's headers add up to more than `max_bytes`. uvicorn's httptools
    parser accepts headers of any size (5 MB went through in a test), so this is the service's own
    bound: a clear answer, and no multi-megabyte header copied into logs or handlers. The memory was
    already spent by then; a front proxy is what bounds that."""

    def __init__(self, app: ASGIApp, max_bytes: int = 64 * 1024) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(k) + len(v) for k, v in scope.get("headers", ()))
            if size > self.max_bytes:
                await send_error(send, 431, f"request headers are {size} bytes; the limit is {self.max_bytes}")
                return
        await self.app(scope, receive, send)


# ------------------------------------------------------------------------------------------- API key


def parse_api_keys(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """Comma-separated keys ("k1,k2": several, for rotation) or a list -> the keys; None or blank: none."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    return tuple(k.strip() for k in items if k.strip())


class ApiKeyMiddleware:
    """With keys configured, every route except HEALTH_PATHS needs `Authorization: Bearer <key>` or
    `X-API-Key: <key>`, except GET and HEAD of `public_pages`: pages and their files (the web page, /docs,
    /redoc, /openapi.json), which hold no data and ask for the key themselves. Exact paths only, so no
    prefix or dot segment opens anything else. Otherwise 401 {"error"} with `WWW-Authenticate: Bearer`.
    No keys: a no-op."""

    def __init__(
        self,
        app: ASGIApp,
        keys: Iterable[str] = (),
        open_paths: frozenset[str] = HEALTH_PATHS,
        public_pages: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.public_pages = public_pages
        # Keys are compared as SHA-256 digests: equal lengths, so compare_digest leaks neither the
        # key's content nor its length, and every key is tried so timing does not say which matched.
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        self.open_paths = open_paths

    def _accepts(self, presented: bytes) -> bool:
        digest = hashlib.sha256(presented).digest()
        matches = [hmac.compare_digest(digest, known) for known in self.digests]
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.digests or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        if scope["path"] in self.public_pages and scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        presented = []
        authorization = _header(scope, b"authorization")
        if authorization is not None:
            scheme, _, token = authorization.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                presented.append(token.strip())
        api_key = _header(scope, b"x-api-key")
        if api_key is not None and api_key.strip():
            presented.append(api_key.strip())
        if any([self._accepts(p) for p in presented]):  # a list: both are checked, whichever matches
            await self.app(scope, receive, send)
            return
        if presented:
            challenge = 'Bearer error="invalid_token"'
            message = "invalid API key"
        else:
            challenge = "Bearer"
            message = "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        await send_error(send, 401, message, {"WWW-Authenticate": challenge})


# ------------------------------------------------------------------------------ overload protection


class _BodyTimeout(Exception):
    """The client paused its body longer than the idle limit."""


class LoadShedMiddleware:
    """Overload protection, per request (HEALTH_PATHS exempt, untouched):

    1. The body is read in full first, holding no slot: at most `max_body_bytes` (413), never pausing longer
       than `body_idle_timeout_s` (408, Connection: close), its bytes reserved from the memory `budget` as
       they arrive (503 with Retry-After when no room comes in time; slow clients hold only what they sent).
    2. Then one of `max_in_flight` slots, or an immediate 503 with Retry-After: overload costs clients a
       retry instead of an ever-growing queue, and slow uploads never hold the slots complete requests need.
    3. Then the app, the body handed over in one message. If the client disconnects meanwhile, the handler is
       cancelled at its next await (its worker-thread work stops at its next check, service.memory), and
       nothing is answered: there is nobody to answer.

    All of it within `timeout_s` (None: unlimited): past it, the handler is cancelled (a batcher caller only
    cancels its own future) and the client gets 504. A request cancelled from outside (the shutdown grace
    period is over) gets 503."""

    def __init__(
        self,
        app: ASGIApp,
        max_in_flight: int = 256,
        timeout_s: float | None = 30.0,
        exempt_paths: frozenset[str] = HEALTH_PATHS,
        retry_after_s: int = 1,
        body_idle_timeout_s: float | None = None,
        max_body_bytes: int | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.app = app
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s if timeout_s and timeout_s > 0 else None
        self.exempt_paths = exempt_paths
        self.retry_after = str(retry_after_s)
        self.body_idle_timeout_s = body_idle_timeout_s if body_idle_timeout_s and body_idle_timeout_s > 0 else None
        self.max_body_bytes = max_body_bytes
        self.budget = budget
        # One event loop per process runs every request, so a plain int needs no lock.
        self.in_flight = 0
        self.reading = 0  # requests whose body is still arriving (they hold no slot)
        self.shed = 0
        self.timed_out = 0
        self.body_timeouts = 0
        self.disconnects = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        started = completed = slot = gone = False
        task = asyncio.current_task()
        reservation = self.budget.hold() if self.budget is not None else Reservation(None, 0)
        watcher: asyncio.Future[Message] | None = None

        async def tracking_send(message: Message) -> None:
            nonlocal started, completed
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                completed = True
            await send(message)

        def on_disconnect(future: asyncio.Future[Message]) -> None:
            nonlocal gone
            if future.cancelled() or future.exception() is not None or completed:
                return
            if future.result()["type"] == "http.disconnect" and task is not None:
                gone = True
                self.disconnects += 1
                task.cancel()

        deadline = asyncio.timeout(self.timeout_s)  # None: no deadline
        try:
            async with deadline:
                self.reading += 1
                try:
                    body = await self._read_body(scope, receive, reservation)
                finally:
                    self.reading -= 1
                if body is None:
                    raise ClientDisconnect()
                if self.in_flight >= self.max_in_flight:
                    self.shed += 1
                    await send_error(tracking_send, 503, OVERLOADED, {"Retry-After": self.retry_after})
                    return
                self.in_flight += 1
                slot = True
                # From here on nobody else reads the request: a message now means the client went away.
                watcher = asyncio.ensure_future(receive())
                watcher.add_done_callback(on_disconnect)
                handed = False

                async def replay() -> Message:
                    nonlocal handed
                    if not handed:
                        handed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    assert watcher is not None
                    return await asyncio.shield(watcher)

                await self.app(scope, replay, tracking_send)
        except _BodyTimeout:
            self.body_timeouts += 1
            if not started:
                await send_error(
                    tracking_send,
                    408,
                    f"request body paused for more than {self.body_idle_timeout_s:g} s",
                    {"Connection": "close"},
                )
        except ServiceError as exc:  # from reading the body: 413 too large, 503 no memory free
            if not started:
                await send_error(
                    tracking_send, exc.status_code, exc.message, {**(exc.headers or {}), "Connection": "close"}
                )
        except TimeoutError:
            if not deadline.expired():
                raise  # the app's own TimeoutError: its bug, not our limit; the 500 handler answers
            self.timed_out += 1
            log.warning("request %s %s cancelled after %.3g s", scope.get("method"), scope.get("path"), self.timeout_s)
            if not started:
                await send_error(tracking_send, 504, f"request took longer than {self.timeout_s:g} s and was cancelled")
            # Otherwise the status line is already out: returning with the body unfinished makes the
            # server close the connection, which is all that can still be said.
        except asyncio.CancelledError:
            if gone and task is not None and task.cancelling() <= 1:
                # Our own cancel: the client disconnected. Nobody to answer; the access log says 499.
                task.uncancel()
                raise ClientDisconnect() from None
            # Cancelled from outside: uvicorn does this to requests still running when the shutdown grace
            # period ends. A 503 the client can retry elsewhere, rather than uvicorn's plain-text 500.
            if not started:
                with contextlib.suppress(Exception):
                    await send_error(
                        tracking_send, 503, SHUTTING_DOWN, {"Retry-After": self.retry_after, "Connection": "close"}
                    )
            raise
        finally:
            if watcher is not None and not watcher.done():
                watcher.remove_done_callback(on_disconnect)
                watcher.cancel()
            if slot:
                self.in_flight -= 1
            reservation.release()

    async def _read_body(self, scope: Scope, receive: Receive, reservation: Reservation) -> bytes | None:
        """The whole body (None: the client went away first), within the limits above."""
        limit = self.max_body_bytes
        declared = _header(scope, b"content-length")
        if limit is not None and declared is not None and declared.isdigit() and int(declared) > limit:
            raise TooLarge(f"request body is {int(declared)} bytes; the limit is {limit}")
        chunks: list[bytes] = []
        size = 0
        while True:
            if self.body_idle_timeout_s is None:
                message = await receive()
            else:
                idle = asyncio.timeout(self.body_idle_timeout_s)
                try:
                    async with idle:
                        message = await receive()
                except TimeoutError:
                    if idle.expired():
                        raise _BodyTimeout() from None
                    raise
            if message["type"] != "http.request":
                return None  # http.disconnect
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if limit is not None and size > limit:
                    raise TooLarge(f"request body exceeds the limit of {limit} bytes")
                if self.budget is not None and not reservation.try_grow(len(chunk)):
                    await self.budget.grow_async(reservation, len(chunk), "this request's body")
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# ------------------------------------------------------------------------------------------ install


def install_middleware(
    app: Starlette,
    *,
    api_keys: str | Iterable[str] | None = None,
    max_in_flight: int = 256,
    request_timeout_s: float | None = 30.0,
    max_header_bytes: int = 64 * 1024,
    public_pages: frozenset[str] = frozenset(),
    body_idle_timeout_s: float | None = None,
    max_body_bytes: int | None = None,
    budget: MemoryBudget | None = None,
) -> None:
    """Add the four middlewares in their order (add_middleware puts the last one added outermost).
    Idempotent: an app that already has them is left as it is. `public_pages`: see ApiKeyMiddleware;
    `body_idle_timeout_s`, `max_body_bytes`, `budget`: see LoadShedMiddleware."""
    if any(m.cls is AccessLogMiddleware for m in app.user_middleware):
        return
    keys = parse_api_keys(api_keys)
    app.add_middleware(
        LoadShedMiddleware,
        max_in_flight=max_in_flight,
        timeout_s=request_timeout_s,
        body_idle_timeout_s=body_idle_timeout_s,
        max_body_bytes=max_body_bytes,
        budget=budget,
    )
    app.add_middleware(ApiKeyMiddleware, keys=keys, public_pages=public_pages)
    app.add_middleware(HeaderLimitMiddleware, max_bytes=max_header_bytes)
    app.add_middleware(AccessLogMiddleware)
    if keys:
        log.info("API key required on all routes but %s (%d key(s))", ", ".join(sorted(HEALTH_PATHS)), len(keys))
