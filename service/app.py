"""create_app(settings): routers, one error handler, and a lifespan that loads the model."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__
from service.api import classify, health, models, v2, web
from service.batching import Batcher
from service.errors import ServiceError
from service.metrics import Metrics, MetricsMiddleware
from service.metrics import router as metrics_router
from service.middleware import MIDDLEWARE_RESPONSES, configure_access_log, install_middleware
from service.model import Model, build_model
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


def create_app(settings: Settings | None = None, model: Model | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = model or build_model(settings)
        app.state.model = loaded
        if not loaded.ready:
            await run_in_threadpool(loaded.load)
        batcher = Batcher(loaded, settings.batch_max_size, settings.batch_max_delay_ms)
        batcher.observers.append(metrics.observe_batch)
        metrics.model_info.labels(loaded.name, loaded.version, ",".join(loaded.providers_in_use)).set(1)
        app.state.batcher = batcher
        await batcher.start()
        try:
            with serving_gc():
                yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="Fashion-MNIST serving",
        version=__version__,
        description="Classify garment images with an ONNX model: friendly REST (`/v1`) and the Open "
        'Inference Protocol (`/v2`). Every error is JSON: `{"error": "..."}`.',
        lifespan=lifespan,
        responses=MIDDLEWARE_RESPONSES,
    )
    app.state.settings = settings
    app.state.model = model
    app.state.metrics = metrics
    app.add_middleware(classify.DirectPath, service=app)  # added first, so innermost
    install_middleware(
        app,
        api_keys=settings.api_key.get_secret_value() if settings.api_key else None,
        max_in_flight=settings.max_in_flight,
        request_timeout_s=settings.request_timeout_s or None,
    )
    # Added last, so outermost: metrics count the 401/431/503/504 answers of the middleware too.
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.include_router(metrics_router)
    app.include_router(health.router)
    app.include_router(classify.router)
    app.include_router(models.router)
    app.include_router(v2.router)
    app.include_router(web.router)
    install_error_handlers(app)
    return app


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
        return JSONResponse(
            {"error": "invalid request: " + "; ".join(problems), "detail": jsonable_errors(exc)},
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)


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
