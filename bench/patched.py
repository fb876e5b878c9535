"""`python -m service` with trial changes applied in-process: to measure a change to someone else's file
before anyone edits it, and to take one of ours back out and measure what it was worth.

    BENCH_PATCHES=no_access_log,async_deps python -m bench.patched --port 8000 ...

Proposed changes (files owned by others):
    no_access_log      uvicorn.run(..., access_log=False)
    quiet_access_log   service.middleware's JSON access log off (logger service.access at WARNING)
    async_deps         the settings/model dependencies as `async def` (FastAPI runs sync ones in a thread)
    asyncio_loop       uvicorn.run(..., loop="asyncio", http="h11"): uvicorn without uvloop and httptools
    no_ort_arena       onnxruntime SessionOptions.enable_cpu_mem_arena = False (model.py)
    classify_first     the /v1 classify routes matched before the others (the order of app.include_router)
    no_middleware      none of the app's own middleware (metrics, access log, limits): what they cost together
Ablations (undo one of the performance changes, to measure it):
    fastapi_handler    FastAPI's router and handler instead of classify.DirectPath
    pydantic_response  the response model validates and serialises the body (implies fastapi_handler)
    stdlib_json        json.dumps instead of orjson (response bodies and access log lines)
    thread_decode      every image decoded in the thread pool, small PNGs too
    pillow_png         every PNG opened by Image.open (no plain-PNG fast path in service.imaging)
    starlette_form     Starlette's form parser (SpooledTemporaryFile per upload) instead of ours
    general_parts      every multipart part through the general header parser (no canonical-form fast path)
    anyio_batcher      the batcher's session runs through anyio's shared thread pool, not its own executor
    no_chunking        a batch request's images in one session run, not in runs of batch_max_size
Patches act in this process only: with several workers (spawned afresh) only the uvicorn options apply.
Used by `python -m bench --patches ...`; never by the service itself.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any

# At module level: FastAPI resolves the patched dependencies' (string) annotations in these globals.
from fastapi import Depends, Request

from service.api import deps
from service.model import Model
from service.settings import Settings

PROPOSED = {
    "no_access_log",
    "quiet_access_log",
    "async_deps",
    "asyncio_loop",
    "no_ort_arena",
    "classify_first",
    "no_middleware",
}
ABLATIONS = {
    "fastapi_handler",
    "pydantic_response",
    "stdlib_json",
    "thread_decode",
    "pillow_png",
    "starlette_form",
    "general_parts",
    "anyio_batcher",
    "no_chunking",
}


def apply(names: set[str]) -> None:
    unknown = names - PROPOSED - ABLATIONS
    if unknown:
        raise SystemExit(f"unknown patches {sorted(unknown)}; known: {sorted(PROPOSED | ABLATIONS)}")
    if "async_deps" in names:
        # Before the routers import the aliases.
        sync_settings, sync_model = deps.get_settings, deps.get_model

        async def get_settings(request: Request) -> Settings:
            return sync_settings(request)

        async def get_model(request: Request) -> Model:
            return sync_model(request)

        deps.SettingsDep = Annotated[Settings, Depends(get_settings)]  # type: ignore[misc, assignment]
        deps.ModelDep = Annotated[Model, Depends(get_model)]  # type: ignore[misc, assignment]
    if "no_ort_arena" in names:
        import onnxruntime as ort

        options_class = ort.SessionOptions

        def session_options() -> Any:
            options = options_class()
            options.enable_cpu_mem_arena = False
            return options

        ort.SessionOptions = session_options  # type: ignore[misc, assignment]
    if "quiet_access_log" in names:
        import logging

        from service import app as app_module

        configure = app_module.configure_logging

        def configure_quietly(settings: Settings) -> None:
            configure(settings)
            logging.getLogger("service.access").setLevel(logging.WARNING)

        app_module.configure_logging = configure_quietly
    if "classify_first" in names:
        _wrap_create_app(_classify_first)
    if "no_middleware" in names:
        _wrap_create_app(lambda app: app.user_middleware.clear())
    _ablate(names)
    extra: dict[str, Any] = {}
    if "no_access_log" in names:
        extra["access_log"] = False
    if "asyncio_loop" in names:
        extra |= {"loop": "asyncio", "http": "h11"}
    if extra:
        import uvicorn

        original = uvicorn.run

        def run(*args: Any, **kwargs: Any) -> None:
            original(*args, **(kwargs | extra))

        uvicorn.run = run


def _ablate(names: set[str]) -> None:
    from service.api import classify, uploads

    if names & {"fastapi_handler", "pydantic_response"}:
        # DirectPath hands over to FastAPI's router while the app has any dependency override.
        _wrap_create_app(lambda app: app.dependency_overrides.__setitem__(_unused, _unused))
    if "pydantic_response" in names:
        classify.json_response = lambda body: body  # type: ignore[assignment, return-value]
    if "stdlib_json" in names:
        from service import middleware

        class NoOrjson:
            @staticmethod
            def dumps(value: Any) -> bytes:
                raise TypeError("stdlib_json")  # the access log's fallback: json.dumps

        classify.dumps = lambda body: json.dumps(body, separators=(",", ":")).encode()
        middleware.orjson = NoOrjson  # type: ignore[assignment]
    if "thread_decode" in names:
        classify.decodes_inline = lambda data: False
    if "pillow_png" in names:
        from service import imaging

        imaging._plain_png = lambda data, limits: None
    if "general_parts" in names:
        uploads._part = uploads._general_part
    if "starlette_form" in names:
        uploads.read_files = _starlette_read_files  # type: ignore[assignment]
        classify.read_files = _starlette_read_files  # type: ignore[assignment]
    if "anyio_batcher" in names:
        from starlette.concurrency import run_in_threadpool

        from service.batching import Batcher

        class Loop:  # stands in for the event loop inside Batcher: run_in_executor -> anyio's pool
            def run_in_executor(self, executor: object, call: Callable[..., Any], *args: Any) -> Any:
                return run_in_threadpool(call, *args)

        original = Batcher._run_batch

        async def run_batch(self: Batcher, loop: Any, live: Any) -> None:
            await original(self, Loop(), live)  # type: ignore[arg-type]

        Batcher._run_batch = run_batch  # type: ignore[method-assign]
    if "no_chunking" in names:
        import time

        from service.batching import Batcher

        def run_whole(self: Batcher, batch: Any, names: list[str]) -> tuple[Any, list[tuple[int, float]]]:
            start = time.perf_counter()
            result = self.model.run(batch, names)
            return result, [(len(batch), time.perf_counter() - start)]

        Batcher._run_chunked = run_whole  # type: ignore[method-assign]


def _wrap_create_app(change: Callable[[Any], None]) -> None:
    from service import app as app_module

    create_app = app_module.create_app

    def create_and_change(*args: Any, **kwargs: Any) -> Any:
        app = create_app(*args, **kwargs)
        change(app)
        return app

    app_module.create_app = create_and_change


def _classify_first(app: Any) -> None:
    from service.api import classify

    routes = app.router.routes
    mine = [r for r in routes if getattr(r, "original_router", None) is classify.router]
    app.router.routes[:] = mine + [r for r in routes if r not in mine]


def _unused() -> None:
    """A dependency no route uses: overriding it switches DirectPath off."""


async def _starlette_read_files(
    request: Request, field: str, limit: int, max_files: int, per_file_limit: int
) -> list[Any]:
    """The upload reader as it was before our own multipart parser (Starlette's form parser)."""
    from starlette.datastructures import UploadFile

    from service.api.uploads import Upload, _check_declared_length
    from service.errors import BadInput, TooLarge

    _check_declared_length(request, limit)
    form = await request.form(max_files=max_files + 1, max_fields=max_files + 16)
    found = []
    for item in form.getlist(field):
        if not isinstance(item, UploadFile):
            raise BadInput(f"multipart field {field!r} must be a file, not a text value")
        if item.size is not None and item.size > per_file_limit:
            raise TooLarge(f"{item.filename or field}: {item.size} bytes; the limit is {per_file_limit}")
        found.append(Upload(item.filename, await item.read(), item.content_type))
    if len(found) > max_files:
        raise TooLarge(f"{len(found)} files in one request; the limit is {max_files}")
    if not found:
        raise BadInput(f"multipart field {field!r} is missing")
    return found


def main() -> int:
    apply({n for n in os.environ.get("BENCH_PATCHES", "").split(",") if n})
    from service.__main__ import main as service_main

    return service_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
