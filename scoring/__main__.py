"""python -m scoring (or fashion-score) INPUT... --out results.csv|results.jsonl|-: the command."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import numpy as np

from scoring import InputError, UsageError
from scoring.engines import Engine, LocalEngine, RemoteEngine
from scoring.inputs import BrokenSource, ImageSource, Source, count, is_array_input, plan
from scoring.outputs import Progress, Row, Stats, Writer
from service.errors import ModelLoadError
from service.model import Model, locate


def prog() -> str:
    """The command as it was called: the console script by its name, else `python -m scoring`."""
    script = Path(sys.argv[0]).name if sys.argv else ""
    return script if script == "fashion-score" else "python -m scoring"


def score(
    sources: list[Source], engine: Engine, batch_size: int, emit: Callable[[Row], None], progress: Progress
) -> None:
    """Score every source in order; `emit(row)` is called once per image, in input order."""
    done = 0
    pending: list[ImageSource] = []

    def flush_images() -> None:
        nonlocal done
        if pending:
            results = engine.score_images([s.path for s in pending])
            for source, result in zip(pending, results, strict=True):
                if isinstance(result, str):
                    emit(Row(str(source.path), truth=source.truth, error=result))
                else:
                    emit(Row(str(source.path), result, source.truth))
            done += len(pending)
            pending.clear()
            progress.update(done)

    for source in sources:
        if isinstance(source, ImageSource):
            pending.append(source)
            if len(pending) >= batch_size:
                flush_images()
            continue
        flush_images()  # keep rows in input order
        if isinstance(source, BrokenSource):
            emit(Row(str(source.path), error=source.error))
            done += 1
            continue
        for start in range(0, len(source.images), batch_size):
            chunk = source.images[start : start + batch_size]
            truths = source.labels[start : start + batch_size] if source.labels is not None else [None] * len(chunk)
            names = [f"{source.path}#{start + i}" for i in range(len(chunk))]
            try:
                probabilities: list[np.ndarray | None] = list(engine.score_array(chunk))
                error = None
            except InputError as exc:
                probabilities, error = [None] * len(chunk), str(exc)
            for name, probs, truth in zip(names, probabilities, truths, strict=True):
                emit(Row(name, probs, None if truth is None else int(truth), error))
            done += len(chunk)
            progress.update(done)
    flush_images()


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
        "--out", "-o", metavar="FILE", default="-", help="results .csv or .jsonl; - for JSONL on stdout (default)"
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
        "--api-key",
        metavar="KEY",
        default=(os.environ.get("FASHION_SERVE_API_KEY") or "").split(",")[0].strip() or None,
        help="API key for --url (default: the first of $FASHION_SERVE_API_KEY)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if not 1 <= args.top_k <= 10:
        parser.error(f"--top-k must be 1-10, got {args.top_k}")
    if args.threads < 0:
        parser.error(f"--threads must be 0 or more, got {args.threads}")
    if args.out != "-" and Path(args.out).suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
        parser.error(f"--out {args.out}: the name must end in .csv or .jsonl (or be - for JSONL on stdout)")
    for path in [*args.inputs, *([args.labels] if args.labels else [])]:
        if not path.exists():
            parser.error(f"no such file or folder: {path}")
    if args.labels is not None:
        targets = [p for p in args.inputs if not p.is_dir() and is_array_input(p)]
        if len(targets) != 1 or len(args.inputs) != 1:
            parser.error("--labels needs exactly one input, an IDX or .npy/.npz file")
    if args.url and not re.match(r"https?://", args.url):
        parser.error(f"--url must start with http:// or https://, got {args.url!r}")
    return args


def make_engine(args: argparse.Namespace) -> Engine:
    if args.url:
        try:
            return RemoteEngine(args.url, args.api_key)
        except (InputError, urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ModelLoadError(f"cannot use the server at {args.url}: {reason}") from None
    folder = locate(args.models, args.model, args.model_version)
    providers = [p for p in args.providers.replace(" ", "").lower().split(",") if p]
    model = Model(folder, providers=providers or ["auto"], intra_op_threads=args.threads)
    model.load()
    return LocalEngine(model)


def main(argv: list[str] | None = None) -> int:
    """The exit code: 0 when something was scored, 1 when nothing could be (or no model), 2 for bad arguments."""
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
    try:
        sources = plan(args.inputs, engine.classes, args.labels)
    except UsageError as exc:
        print(f"{prog()}: error: {exc}", file=sys.stderr)
        return 2

    fmt = "jsonl" if args.out == "-" or not args.out.lower().endswith(".csv") else "csv"
    try:
        stream = sys.stdout if args.out == "-" else open(args.out, "w", newline="", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
        return 2
    writer = Writer(stream, fmt, engine.classes, args.top_k)
    stats = Stats(engine.classes)
    progress = Progress(count(sources), enabled=not args.quiet)

    def emit(row: Row) -> None:
        writer.write(row)
        stats.add(row)

    start = time.perf_counter()
    try:
        score(sources, engine, args.batch_size, emit, progress)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
