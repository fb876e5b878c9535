"""create_app(settings): routes, one error handler, and a lifespan that opens the data plane."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service import __version__
from service.api import docs, endpoints, health, protocol, rest, v2, web
from service.api import explain as explain_api
from service.api import repository as repository_api
from service.api.middleware import (
    HEALTH_PATHS,
    MIDDLEWARE_RESPONSES,
    configure_access_log,
    install_middleware,
    parse_api_keys,
)
from service.dataplane import DataPlane
from service.errors import ServiceError, error_body
from service.metrics import Metrics, MetricsMiddleware
from service.model import Model
from service.repository import Repository
from service.settings import LOG_FORMAT, Settings

log = logging.getLogger("service")

# Young-generation collections start when tracked objects allocated minus freed exceed this. Python's
# 700 is below what 32 requests in flight keep alive (~800 objects: coroutines, closures, tasks), so at
# the default the collector ran every ~17 requests just to find the same live requests again.
GC_YOUNG_THRESHOLD = 10_000


@contextmanager
def serving_gc() -> Iterator[None]:
    """While serving: everything built at startup (modules, app, model; ~70,000 objects) is frozen out
    of the collector, which otherwise walked all of it on every full collection, a 50 ms pause about
    every 2,500 requests; and young collections wait for GC_YOUNG_THRESHOLD. Measured on /v1/predict at
    concurrency 32 (bench/RESULTS.md): collector time 43 -> under 1 µs per request, longest pause 52 ->
    0.5 ms. No gc.collect() first: at this point it finds nothing (measured: 0 unreachable of ~68,000)
    and would add 50 ms to the time to ready. Undone on the way out, so that apps started one after
    another in one process (tests) leave their garbage collectable."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(thresholds[0], GC_YOUNG_THRESHOLD), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


# The routes that read a request body: plain endpoints (service/api/endpoints.py).
ENDPOINTS = [*rest.ENDPOINTS, *explain_api.ENDPOINTS, *v2.ENDPOINTS, *web.ENDPOINTS, *repository_api.ENDPOINTS]


def create_app(
    settings: Settings | None = None, model: Model | None = None, repository: Repository | None = None
) -> FastAPI:
    """The app. It serves the model repository the settings name (`repository`: one already preloaded, as
    python -m service hands it over after its fail-fast check); `model` (tests) is served alone instead."""
    settings = settings or Settings()
    metrics = Metrics()
    plane = DataPlane(settings, model, repository)
    plane.observers.append(metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await plane.open()
        try:
            with serving_gc():
                yield
        finally:
            await plane.close()

    app = FastAPI(
        title="Fashion-MNIST serving",
        version=__version__,
        description="Classify garment images with an ONNX model: friendly REST (`/v1`) and the Open "
        'Inference Protocol (`/v2`). Every error is JSON: `{"error": "..."}`.',
        lifespan=lifespan,
        responses=MIDDLEWARE_RESPONSES,
        docs_url=None,  # /docs and /redoc come from service/api/docs.py, with their files served here
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.dataplane = plane
    app.state.metrics = metrics
    install_middleware(
        app,
        api_keys=settings.api_key.get_secret_value() if settings.api_key else None,
        public_pages=web.PUBLIC_PATHS | docs.PUBLIC_PATHS,
        max_in_flight=settings.max_in_flight,
        request_timeout_s=settings.request_timeout_s or None,
        body_idle_timeout_s=settings.body_idle_timeout_s,
        max_body_bytes=settings.max_request_bytes,
        budget=plane.budget,
    )
    protocol.configure(settings.header_timeout_s)  # the HTTP connection's limits, in this worker process
    # Added last, so outermost: metrics count the 401/431/503/504 answers of the middleware too.
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    # First in the table: the router tries routes in order, and these take nearly every request.
    app.router.routes[:0] = [endpoint.route() for endpoint in ENDPOINTS]
    app.include_router(health.router)
    app.include_router(rest.router)
    app.include_router(repository_api.router)  # before v2's: /v2/models/stats is not a model's metadata
    app.include_router(v2.router)
    app.include_router(web.router)
    app.include_router(docs.router)
    install_error_handlers(app)
    secured = settings.api_key is not None and bool(parse_api_keys(settings.api_key.get_secret_value()))
    document_endpoints(app, secured=secured)
    return app


def document_endpoints(app: FastAPI, secured: bool = False) -> None:
    """FastAPI documents its own routes; the plain endpoints are added to the same document, and with
    `secured` (an API key configured) the key's security schemes."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            endpoints.document(generate(), ENDPOINTS, MIDDLEWARE_RESPONSES)
            if secured and app.openapi_schema is not None:
                docs.document_security(app.openapi_schema, HEALTH_PATHS)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


def json_error(status: int, message: str, headers: Mapping[str, str] | None = None, **extra: Any) -> Response:
    return Response(error_body(message, **extra), status, headers, media_type="application/json")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> Response:
        return json_error(exc.status_code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
        return json_error(422, "invalid request: " + "; ".join(problems), detail=jsonable_errors(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route"
        return json_error(exc.status_code, message, exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return json_error(500, f"internal error ({type(exc).__name__})")


def jsonable_errors(exc: RequestValidationError) -> list[dict[str, object]]:
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]


def app_from_env() -> FastAPI:
    """uvicorn's factory for `python -m service` (each worker builds its own app)."""
    settings = Settings()
    configure_logging(settings)
    return create_app(settings)


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    configure_access_log(settings.log_level.upper())
