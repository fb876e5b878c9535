"""Instructions per request, for valgrind's callgrind: deterministic where timing on this machine is not.

N single-image /v1/predict requests at concurrency 32, in-process (as bench.inapp), after a warm-up;
os.getppid() and os.getpgrp() mark where counting starts and stops, so that imports, model loading
and shutdown stay out of the count:

    PYTHONHASHSEED=0 valgrind --tool=callgrind --separate-threads=yes \\
        --zero-before=getppid --dump-before=getpgrp --callgrind-out-file=cg.out \\
        python -m bench.instructions 320
    grep summary: cg.out.1-01    # the event loop's thread: divide by 320

The event loop's thread is the figure to compare: valgrind hides AVX-512 from onnxruntime, so the
inference thread's kernels are not the ones that run. Compare two versions only when they printed the same
images per session run: how requests batch depends on how the threads interleave, and the event loop's
share of the work per batch moves with it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from bench import data
from bench.inapp import _access_log_to_devnull, _request, batch_stats, service_settings
from bench.loadgen import loop_factory


async def run(models: Path, requests: int, concurrency: int) -> None:
    from service.app import create_app

    _access_log_to_devnull()
    app = create_app(service_settings(models, {}))
    singles = data.single_bodies()

    async def round_of(start: int) -> None:
        bodies = [singles[(start + k) % len(singles)] for k in range(concurrency)]
        await asyncio.gather(*(_request(app, "/v1/predict", body) for body in bodies))

    async with app.router.lifespan_context(app):
        for start in range(0, 2 * concurrency, concurrency):
            await round_of(start)  # warm-up: first calls, caches, the batcher's threads
        stats = batch_stats(app)
        runs, images = stats.batches, stats.images
        os.getppid()  # callgrind --zero-before=getppid
        for start in range(0, requests, concurrency):
            await round_of(start)
        os.getpgrp()  # callgrind --dump-before=getpgrp
        runs, images = stats.batches - runs, stats.images - images
    print(f"{requests} requests, {runs} session runs, {images / max(1, runs):.1f} images per run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("requests", type=int, help="a multiple of --concurrency")
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(run(args.models, args.requests, args.concurrency))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
