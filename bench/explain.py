"""Latency of explanations, in-process: POST /v1/explain with each method, beside /v1/predict.

The ASGI app is called directly (no server, no sockets), one request at a time, each uploading one real
test PNG: wall-clock latency per request (median and p90 over the images) and CPU time per request. Grad-CAM
is one run of the full graph (probabilities, conv3, embedding) and a few small numpy products; occlusion
scores the image and its 144 occluded copies (patch 6, stride 2) in one batch.

    python -m bench.explain [--models models] [--images 50] [--json out.json]

With `--compare OTHER_MODELS` it measures instead what /v1/predict costs with each of two model repositories
(e.g. a copy of a version from before its re-export with an OOD score, against the re-exported one): both apps
in this one process, `--rounds` rounds of 128 requests at concurrency 32 alternating between them, CPU time
per request (all threads); on a shared machine the alternation gives both the same minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import data
from bench.inapp import _access_log_to_devnull, _request, _scope, service_settings

ROUTES = {
    "/v1/predict": "/v1/predict",
    "layercam": "/v1/explain?method=layercam",
    "gradcam": "/v1/explain?method=gradcam",
    "gradcam, png": "/v1/explain?method=gradcam&format=png",
    "occlusion": "/v1/explain?method=occlusion",
}


async def _call(app: Any, target: str, body: bytes) -> None:
    path, _, query = target.partition("?")
    scope = _scope(path, body) | {"query_string": query.encode()}
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    if statuses != [200]:
        raise RuntimeError(f"{target} answered {statuses}")


async def measure(models: Path, images: int, model: str | None = None) -> dict[str, Any]:
    from service.app import create_app

    _access_log_to_devnull()
    changes = {"model": model} if model else {}
    app = create_app(service_settings(models, changes))
    bodies = [data.multipart("file", [("image.png", png)]) for png in data.pngs(images)]
    results: dict[str, Any] = {}
    async with app.router.lifespan_context(app):
        for name, target in ROUTES.items():
            for body in bodies[:5]:  # warm-up
                await _call(app, target, body)
            walls = []
            cpu = time.process_time()
            for body in bodies:
                start = time.perf_counter()
                await _call(app, target, body)
                walls.append(time.perf_counter() - start)
            results[name] = {
                "median_ms": statistics.median(walls) * 1e3,
                "p90_ms": statistics.quantiles(walls, n=10)[-1] * 1e3,
                "cpu_ms_per_request": (time.process_time() - cpu) / len(bodies) * 1e3,
            }
    return results


async def compare(repositories: dict[str, Path], rounds: int) -> dict[str, Any]:
    """CPU µs per /v1/predict of each repository's app, rounds alternating (see the module doc)."""
    from contextlib import AsyncExitStack

    from service.app import create_app

    _access_log_to_devnull()
    apps = {name: create_app(service_settings(folder, {})) for name, folder in repositories.items()}
    singles = data.single_bodies()
    samples: dict[str, list[float]] = {name: [] for name in apps}

    async def one_round(app: Any, requests: int = 128) -> float:
        cpu = time.process_time()
        for start in range(0, requests, 32):
            await asyncio.gather(
                *(_request(app, "/v1/predict", singles[(start + k) % len(singles)]) for k in range(32))
            )
        return (time.process_time() - cpu) / requests * 1e6

    async with AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app.router.lifespan_context(app))
            await one_round(app)  # warm-up
        names = list(apps)
        for i in range(rounds):
            for name in names if i % 2 == 0 else names[::-1]:
                samples[name].append(await one_round(apps[name]))
    return {
        name: {
            "min_us": min(values),
            "median_us": statistics.median(values),
            "p25_us": statistics.quantiles(values, n=4)[0],
        }
        for name, values in samples.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.explain", description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--model", help="model name (default: the only one)")
    parser.add_argument("--images", type=int, default=50, help="requests per route, one test image each")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--compare", type=Path, metavar="OTHER_MODELS", help="/v1/predict's cost against these")
    parser.add_argument("--rounds", type=int, default=100, help="--compare: alternating rounds per repository")
    args = parser.parse_args(argv)
    if args.compare:
        costs = asyncio.run(compare({str(args.compare): args.compare, str(args.models): args.models}, args.rounds))
        for name, c in costs.items():
            print(f"{name}: /v1/predict CPU µs per request: min {c['min_us']:.0f}, p25 {c['p25_us']:.0f}, "
                  f"median {c['median_us']:.0f}")  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps(costs, indent=2) + "\n")
        return 0
    results = asyncio.run(measure(args.models, args.images, args.model))
    width = max(map(len, results))
    print(f"{'route':<{width}}  median ms  p90 ms  CPU ms/request")
    for name, r in results.items():
        print(f"{name:<{width}}  {r['median_ms']:9.2f}  {r['p90_ms']:6.2f}  {r['cpu_ms_per_request']:14.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
