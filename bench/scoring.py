"""python -m bench.scoring: the batch scorer's throughput, in-process against --engine ray on a local Ray cluster
of one node and of two (bench/raycluster.py: separate `ray start` processes, one CPU each), on the 10,000 test
images (IDX). Each figure is the scorer's own (images scored / seconds from the first batch to the last row
written, as its summary prints: for Ray, that includes starting the actors, each loading the model), beside
the whole command's wall time, which adds Python's start, the model's load and, for Ray, connecting to the
cluster; for Ray also the time to its first rows and the rate after them (the steady state). Needs the ray
extra."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.raycluster import LocalRayCluster

ROOT = Path(__file__).resolve().parent.parent
IDX = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")) / "t10k-images-idx3-ubyte.gz"


def score(
    inputs: Path, batch_size: int, extra: list[str], env: dict[str, str] | None = None
) -> tuple[float, float, str]:
    """(images/s as the scorer reports it, wall seconds, its description of the engine)."""
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable, "-m", "scoring", str(inputs), "--out", f"{folder}/out.csv", "--models", "models",
            "--model", "fashion-mnist-cnn", "--providers", "cpu", "--batch-size", str(batch_size), "--quiet", *extra,
        ]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    match = re.search(r"^scored (\d+) images, \d+ failed, in [\d.]+ s: ([\d,]+) images/s \((.*)\)$", done.stderr, re.M)
    if not match:
        raise SystemExit(f"no summary in the scorer's output:\n{done.stderr[-3000:]}")
    return float(match.group(2).replace(",", "")), wall, match.group(3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scoring", description=__doc__)
    parser.add_argument("--inputs", type=Path, default=IDX, help="what to score (default: the 10,000 test images)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the best is reported")
    args = parser.parse_args(argv)
    if not args.inputs.exists():
        raise SystemExit(f"{args.inputs} is missing (Debian's dataset-fashion-mnist)")

    rows: list[tuple[str, float, float, str]] = []

    def best(label: str, extra: list[str], env: dict[str, str] | None = None) -> None:
        runs = [score(args.inputs, args.batch_size, extra, env) for _ in range(args.repeat)]
        rate, wall, what = max(runs)
        print(f"{label}: {rate:,.0f} images/s, {wall:.1f} s wall ({what})", file=sys.stderr)
        rows.append((label, rate, wall, what))

    best("in-process (1 core)", [])
    for nodes in (1, 2):
        with LocalRayCluster(nodes=nodes, cpus=1) as cluster:
            best(
                f"Ray, {nodes} node{'s' * (nodes > 1)} x 1 CPU",
                ["--engine", "ray", "--address", cluster.address],
                cluster.env(),
            )

    base = rows[0][1]
    print(f"\n{'engine':<26} {'images/s':>9} {'vs in-process':>14} {'wall s':>7}   Ray: first rows after, then")
    for label, rate, wall, what in rows:
        ray = re.search(r"first rows after ([\d.]+) s [^,]*(?:, then ([\d,]+) images/s)?", what)
        steady = f"{float(ray.group(1)):5.1f} s, {ray.group(2) or '-'} images/s" if ray else ""
        print(f"{label:<26} {rate:>9,.0f} {rate / base:>13.2f}x {wall:>7.1f}   {steady}")
    print(f"\n{args.inputs.name}, batch size {args.batch_size}, on {os.cpu_count()} cores (best of {args.repeat})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
