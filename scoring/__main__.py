"""python -m scoring (or fashion-score) INPUT... --out results.csv|results.jsonl|-: the command."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import sys
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, NoReturn

from scoring import InputError, UsageError
from scoring.engines import BulkEngine, Engine, LocalEngine, RemoteEngine, run_unit
from scoring.inputs import Source, count, is_array_input, plan, units
from scoring.outputs import Progress, Row, Stats, Writer, unit_rows
from service.errors import ModelLoadError
from service.model import Model, locate


def prog() -> str:
    """The command as it was called: the console script by its name, else `python -m scoring`."""
    script = Path(sys.argv[0]).name if sys.argv else ""
    return script if script == "fashion-score" else "python -m scoring"


def score(
    sources: list[Source],
    engine: Engine | BulkEngine,
    batch_size: int,
    emit: Callable[[Row], None],
    progress: Progress,
) -> None:
    """Score every source in order; `emit(row)` is called once per image, in input order."""
    if isinstance(engine, BulkEngine):  # it runs the units itself (a Ray cluster), and streams them back in order
        engine.score_units(list(units(sources, batch_size)), emit, progress)
        return
    done = 0
    for unit in units(sources, batch_size):
        for row in unit_rows(unit, run_unit(engine, unit)):
            emit(row)
        done += len(unit)
        progress.update(done)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(
        prog=prog(),
        description="Classify image files, folders, .npy/.npz arrays and IDX files with the served model; "
        "write one row per image (CSV or JSONL) and a summary with accuracy when labels are known.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image file, folder, .npy/.npz or IDX")
    parser.add_argument(
        "--out",
        "-o",
        metavar="FILE",
        default="-",
        help="results .csv, .jsonl or .parquet (needs pyarrow); - for JSONL on stdout (default)",
    )
    parser.add_argument(
        "--labels", metavar="FILE", type=Path, help="IDX label file (or .npy of class ids) for the one array input"
    )
    parser.add_argument(
        "--batch-size", metavar="N", type=int, default=256, help="images per model run or request (256)"
    )
    parser.add_argument(
        "--top-k", metavar="K", type=int, default=1, help="also list the k best classes (1-10; default 1)"
    )
    parser.add_argument(
        "--models", metavar="DIR", type=Path, default=Path("models"), help="model repository (default models)"
    )
    parser.add_argument("--model", metavar="NAME", help="model name (default: the only one)")
    parser.add_argument("--model-version", metavar="VERSION", help="model version (default: the highest)")
    parser.add_argument(
        "--providers", metavar="LIST", default="auto", help="execution providers, e.g. cuda,cpu (default auto)"
    )
    parser.add_argument(
        "--threads", metavar="N", type=int, default=1, help="onnxruntime threads (default 1; 0: one per core)"
    )
    parser.add_argument("--url", help="score through a running server at this URL instead of in-process")
    parser.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: the model in this process (default); ray: a Ray cluster, one model session per actor "
        "(needs the ray extra)",
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="--engine ray: the cluster's address (its head's host:port, ray://host:port, or auto); default: "
        "start a local Ray instance for the job",
    )
    parser.add_argument(
        "--actors", metavar="N", type=int, help="--engine ray: model replicas (default: as many as the CPUs allow)"
    )
    parser.add_argument(
        "--actor-cpus", metavar="CPUS", type=float, default=1.0, help="--engine ray: CPUs per actor (default 1)"
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=(os.environ.get("FASHION_SERVE_API_KEY") or "").split(",")[0].strip() or None,
        help="API key for --url (default: the first of $FASHION_SERVE_API_KEY)",
    )
    parser.add_argument(
        "--allow-failures",
        action="store_true",
        help="exit 0 even when some inputs failed (they are still reported); by default any failure exits 1",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if not 1 <= args.top_k <= 10:
        parser.error(f"--top-k must be 1-10, got {args.top_k}")
    if args.threads < 0:
        parser.error(f"--threads must be 0 or more, got {args.threads}")
    if args.out != "-" and Path(args.out).suffix.lower() not in (".csv", ".jsonl", ".ndjson", ".parquet"):
        parser.error(
            f"--out {args.out}: the name must end in .csv or .jsonl, or .parquet (or be - for JSONL on stdout)"
        )
    if args.out.lower().endswith(".parquet") and importlib.util.find_spec("pyarrow") is None:
        parser.error("--out .parquet needs pyarrow: pip install pyarrow (or the ray extra, which brings it)")
    for path in [*args.inputs, *([args.labels] if args.labels else [])]:
        if not path.exists():
            parser.error(f"no such file or folder: {path}")
    if args.labels is not None:
        targets = [p for p in args.inputs if not p.is_dir() and is_array_input(p)]
        if len(targets) != 1 or len(args.inputs) != 1:
            parser.error("--labels needs exactly one input, an IDX or .npy/.npz file")
    if args.engine == "ray" and args.url:
        parser.error("--engine ray and --url exclude each other: --url scores through a server")
    if args.engine != "ray" and (args.address or args.actors is not None):
        parser.error("--address and --actors are for --engine ray")
    if args.actors is not None and args.actors < 1:
        parser.error(f"--actors must be at least 1, got {args.actors}")
    if args.actor_cpus <= 0:
        parser.error(f"--actor-cpus must be above 0, got {args.actor_cpus}")
    if args.url and not re.match(r"https?://", args.url):
        parser.error(f"--url must start with http:// or https://, got {args.url!r}")
    return args


def make_engine(args: argparse.Namespace) -> Engine | BulkEngine:
    if args.url:
        try:
            return RemoteEngine(args.url, args.api_key)
        except (InputError, urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ModelLoadError(f"cannot use the server at {args.url}: {reason}") from None
    folder = locate(args.models, args.model, args.model_version)
    providers = [p for p in args.providers.replace(" ", "").lower().split(",") if p]
    if args.engine == "ray":
        from scoring.ray_engine import RayEngine  # Ray is imported only for --engine ray

        return RayEngine(folder, providers or ["auto"], args.threads, args.address, args.actors, args.actor_cpus)
    model = Model(folder, providers=providers or ["auto"], intra_op_threads=args.threads)
    model.load()
    return LocalEngine(model)


def main(argv: list[str] | None = None) -> int:
    """The exit code: 0 when every input was scored (or some failed, with --allow-failures), 1 when any
    failed or nothing could be scored (or no model), 2 for bad arguments."""
    try:
        args = parse_args(argv)
    except UsageError as exc:
        print(f"{prog()}: error: {exc} (see --help)", file=sys.stderr)
        return 2
    try:
        engine = make_engine(args)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    skipped: list[Path] = []
    try:
        sources = plan(args.inputs, engine.classes, args.labels, skipped)
    except UsageError as exc:
        print(f"{prog()}: error: {exc}", file=sys.stderr)
        return 2

    suffix = "" if args.out == "-" else Path(args.out).suffix.lower()
    fmt = {".csv": "csv", ".parquet": "parquet"}.get(suffix, "jsonl")
    stream: IO[Any]
    try:
        if fmt == "parquet":
            stream = open(args.out, "wb")  # noqa: SIM115
        else:
            stream = sys.stdout if args.out == "-" else open(args.out, "w", newline="", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
        return 2
    writer = Writer(stream, fmt, engine.classes, args.top_k)
    stats = Stats(engine.classes, skipped=len(skipped))
    progress = Progress(count(sources), enabled=not args.quiet)

    def emit(row: Row) -> None:
        writer.write(row)
        stats.add(row)

    start = time.perf_counter()
    try:
        score(sources, engine, args.batch_size, emit, progress)
        writer.close()
        stream.flush()
    except BrokenPipeError:  # `... | head`: the reader has all it wanted
        # Point stdout at /dev/null so that Python's own flush at exit does not complain again.
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (urllib.error.URLError, OSError) as exc:  # the server went away, or the disk filled up
        progress.close()
        print(f"error: scoring stopped: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    finally:
        if stream is not sys.stdout:
            stream.close()
    seconds = time.perf_counter() - start
    progress.close()
    if stats.scored == 0:  # one line, with the first reason: usually every input failed the same way
        reason = f"all {stats.failed} failed; {stats.failures[0]}" if stats.failures else "no images found"
        print(f"error: nothing could be scored ({reason})", file=sys.stderr)
        return 1
    print(stats.summary(seconds, engine.description), file=sys.stderr)
    if stats.failed and not args.allow_failures:
        print(
            f"error: {stats.failed} of {stats.failed + stats.scored} images failed (listed above and in the "
            "output's error column); --allow-failures exits 0 all the same",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
