"""The in-process limit: PIL decoding plus onnxruntime, no HTTP, on whatever cores it is pinned to.

One image at a time (decode, /255, session.run), and 256 at a time (decode 256, stack, one run).
    taskset -c 0 python -m bench.inprocess --model models/fashion-mnist-cnn/1/model.onnx
prints one JSON object with images/s for each.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time

import numpy as np
import onnxruntime as ort
from PIL import Image

from bench import data


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32) / np.float32(255.0)


def one_at_a_time(session: ort.InferenceSession, pngs: tuple[bytes, ...], seconds: float) -> tuple[float, float]:
    """Images per wall-clock second and per CPU second (the latter barely moves when others share the core)."""
    images, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        for png in pngs:
            session.run(["probabilities"], {"image": decode(png)[None, :, :, None]})
        images += len(pngs)
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu)


def batched(session: ort.InferenceSession, pngs: tuple[bytes, ...], size: int, seconds: float) -> tuple[float, float]:
    chosen = [pngs[k % len(pngs)] for k in range(size)]
    images, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        batch = np.stack([decode(png) for png in chosen])[..., None]
        session.run(["probabilities"], {"image": batch})
        images += size
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu)


def measure(model: str, seconds: float = 3.0, batch_size: int = 256, threads: int = 1) -> dict[str, float]:
    """Wall-clock rates (the targets' reference) and CPU-time rates (for comparing runs under contention)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    pngs = data.pngs()
    one_at_a_time(session, pngs, 0.3)  # warm-up: allocations, caches
    batched(session, pngs, batch_size, 0.3)
    single, single_cpu = one_at_a_time(session, pngs, seconds)
    many, many_cpu = batched(session, pngs, batch_size, seconds)
    return {
        "single_images_per_s": single,
        "single_images_per_cpu_s": single_cpu,
        "batched_images_per_s": many,
        "batched_images_per_cpu_s": many_cpu,
        "batch_size": batch_size,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model.onnx")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = parser.parse_args(argv)
    json.dump(measure(args.model, args.seconds, args.batch_size, args.threads), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
