"""The app's own CPU time per request, in-process: no HTTP server, no sockets, no load generator.

The ASGI app is called directly with the same multipart requests the load generator sends, 32 at a
time (single images) and 2 at a time (256 images each); CPU time (all threads) per request is taken
over a round of requests, and the best of several rounds is kept: on a shared machine the least
disturbed round is the closest to the truth, which makes this the steadiest way to compare two
versions of the code. Settings (`--set NAME=VALUE`, repeatable: Settings(name=value), checked against
service.settings.Settings, see bench/overrides.py) measure one ablation at a time:

    taskset -c 0 python -m bench.inapp --models models [--set inline_decode_max_bytes=0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import data, overrides
from bench.loadgen import loop_factory

if TYPE_CHECKING:
    from service.batching import BatchStats
    from service.settings import Settings

Message = dict[str, Any]


def _scope(path: str, body: bytes) -> dict[str, Any]:
    content_type = f"multipart/form-data; boundary={data.BOUNDARY}".encode()
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
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"user-agent", b"fashion-bench"),
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def _request(app: Callable[..., Awaitable[None]], path: str, body: bytes) -> None:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # a client that stays connected; cancelled with the request
        return {"type": "http.disconnect"}

    statuses: list[int] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(_scope(path, body), receive, send)
    if statuses != [200]:
        raise RuntimeError(f"{path} answered {statuses}")


async def _rounds(
    app: Callable[..., Awaitable[None]], path: str, bodies: list[bytes], concurrency: int, per_round: int, rounds: int
) -> float:
    """Least CPU seconds per request over `rounds` rounds of `per_round` requests."""
    best = float("inf")
    for _ in range(rounds):
        cpu = time.process_time()
        for start in range(0, per_round, concurrency):
            await asyncio.gather(*(_request(app, path, bodies[(start + k) % len(bodies)]) for k in range(concurrency)))
        best = min(best, (time.process_time() - cpu) / per_round)
    return best


async def measure_reference(models: Path, rounds: int) -> dict[str, float]:
    """The plain wrapper (bench/reference.py), single images only: it has no batch route."""
    from bench import reference
    from service.model import locate

    os.environ["BENCH_MODEL"] = str(locate(models, None, None) / "model.onnx")
    singles = data.single_bodies()
    await _rounds(reference.app, "/v1/predict", singles, 32, 64, 1)
    return {"single_cpu_us_per_request": await _rounds(reference.app, "/v1/predict", singles, 32, 640, rounds) * 1e6}


async def measure(models: Path, rounds: int, settings: dict[str, str] | None = None) -> dict[str, float]:
    from service.app import create_app

    _access_log_to_devnull()
    app = create_app(service_settings(models, settings or {}))
    singles = data.single_bodies()
    batches = [request.split(b"\r\n\r\n", 1)[1] for request in data.batch_requests()]
    async with app.router.lifespan_context(app):
        await _rounds(app, "/v1/predict", singles, 32, 64, 1)  # warm-up
        await _rounds(app, "/v1/predict/batch", batches, 2, 2, 1)
        single = await _rounds(app, "/v1/predict", singles, 32, 640, rounds)
        batch = await _rounds(app, "/v1/predict/batch", batches, 2, 8, rounds)
        stats = batch_stats(app)
    return {
        "single_cpu_us_per_request": single * 1e6,
        "batch_cpu_us_per_image": batch / 256 * 1e6,
        "images_per_session_run": stats.images / max(1, stats.batches),
    }


def service_settings(models: Path, changes: dict[str, str]) -> Settings:
    """The service's Settings for an in-process app: the CPU provider, then `changes` (validated)."""
    from service.settings import Settings

    return Settings.model_validate({"models": models, "providers": ["cpu"], **changes})


def batch_stats(app: Any) -> BatchStats:
    """The served model's batch statistics (service.batching.BatchStats, counted in place), from the app's
    data plane once it is open."""
    stats: BatchStats | None = app.state.dataplane.batch_stats
    if stats is None:
        raise RuntimeError("the data plane is not open")
    return stats


def _access_log_to_devnull() -> None:
    """The access log costs what it costs in the server (formatting, logging), written nowhere."""
    from service.api.middleware import configure_access_log

    configure_access_log("INFO", open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inapp", description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a service setting, e.g. inline_decode_max_bytes=0 (repeatable); an unknown name is an error",
    )
    parser.add_argument("--reference", action="store_true", help="measure the plain wrapper instead")
    args = parser.parse_args(argv)
    try:
        settings = overrides.parse(args.set)
    except overrides.SettingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.reference and settings:
        print("error: --set applies to the service, not the plain wrapper (--reference)", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        if args.reference:
            result = runner.run(measure_reference(args.models, args.rounds))
        else:
            result = runner.run(measure(args.models, args.rounds, settings))
    json.dump({"app": "reference" if args.reference else "service", "settings": settings, **result}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
