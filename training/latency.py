"""Single-image inference latency of exported models: onnxruntime on one CPU thread, batch 1."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def single_image_latency(onnx_path: Path, runs: int = 2000, warmup: int = 200) -> dict[str, float]:
    """Median and p99 microseconds of `session.run` for one image, probabilities only."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 28, 28, 1), dtype=np.float32)
    for _ in range(warmup):
        session.run(["probabilities"], {"image": x})
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        session.run(["probabilities"], {"image": x})
        times[i] = time.perf_counter() - start
    return {"median_us": float(np.median(times) * 1e6), "p99_us": float(np.percentile(times, 99) * 1e6)}
