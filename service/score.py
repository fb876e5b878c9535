"""python -m service.score INPUT... --out results.csv|results.jsonl|-: score many images offline.

Inputs are image files, folders (searched recursively), .npy/.npz arrays and IDX image files (gzipped
or not). They go through the server's own code, service.imaging.preprocess and service.model.Model,
in batches of one Model.run each, without HTTP; or, with --url, through a running server's
/v1/predict/batch. One output row per image, written as it is scored; a summary goes to stderr.

True labels come from an IDX label file (--labels, or the standard name beside an IDX image file),
from a .npz's `labels` array, or from folder names (one folder per class, by name or class id).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import io
import json
import os
import re
import struct
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn, Protocol

import numpy as np

from service import arrays, imaging
from service.errors import ModelLoadError, ServiceError
from service.model import Model, locate

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
ARRAY_SUFFIXES = frozenset({".npy", ".npz"})
IDX_IMAGES = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS = 0x00000801  # unsigned bytes, 1 dimension
# Arrays in a .npz: the images under the names the server accepts, the labels under these.
LABEL_KEYS = ("labels", "y", "label")
MAX_REPORTED_FAILURES = 20  # in the summary; every failure still gets its row in the output


class UsageError(Exception):
    """Bad arguments: exit 2 with one line."""


class InputError(Exception):
    """One input cannot be read: reported, skipped, and the rest scored."""


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass
class ImageSource:
    path: Path
    truth: int | None = None


@dataclass
class ArraySource:
    path: Path
    images: np.ndarray  # as stored: [N, 28, 28] or [N, 28, 28, 1], uint8 or float
    labels: np.ndarray | None = None


@dataclass
class BrokenSource:
    path: Path
    error: str


Source = ImageSource | ArraySource | BrokenSource


def is_idx_name(path: Path) -> bool:
    name = path.name.lower()
    return "ubyte" in name or re.search(r"\.idx\d?(\.gz)?$", name) is not None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """A whole IDX file of unsigned bytes (gzipped or not), checked against the expected magic."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"cannot read IDX file: {exc}") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise InputError("not an IDX file of unsigned bytes")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        kinds = {IDX_IMAGES: "images", IDX_LABELS: "labels"}
        raise InputError(f"IDX file holds {kinds.get(found, f'{raw[3]}-D data')}, expected {kinds[magic]}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError("IDX header is truncated")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise InputError(f"IDX file has {len(raw) - header} data bytes, expected {int(np.prod(shape))} for {shape}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def label_file_beside(path: Path) -> Path | None:
    """t10k-images-idx3-ubyte.gz -> t10k-labels-idx1-ubyte.gz, when it exists."""
    name = path.name.replace("images", "labels").replace("idx3", "idx1")
    beside = path.with_name(name)
    return beside if name != path.name and beside.is_file() else None


def read_labels(path: Path, count: int, classes: list[str]) -> np.ndarray:
    """Labels from an IDX label file or a .npy of class ids; raises InputError."""
    if path.suffix.lower() == ".npy":
        try:
            labels = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(f"cannot read labels: {exc}") from None
    else:
        labels = read_idx(path, IDX_LABELS)
    return check_labels(labels, count, classes)


def check_labels(labels: np.ndarray, count: int, classes: list[str]) -> np.ndarray:
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise InputError(f"labels must be a 1-D array of class ids, got {labels.dtype} {list(labels.shape)}")
    if len(labels) != count:
        raise InputError(f"{len(labels)} labels for {count} images")
    if count and (labels.min() < 0 or labels.max() >= len(classes)):
        raise InputError(f"labels must be class ids 0-{len(classes) - 1}")
    return labels.astype(np.int64)


def read_array(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A .npy, or a .npz with one array (or `images`/`x`) and optionally `labels`/`y`."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return np.asarray(loaded), None
        with loaded:
            names = loaded.files
            label_key = next((k for k in LABEL_KEYS if k in names), None)
            image_keys = [k for k in names if k != label_key]
            key = next((k for k in ("images", "x", "image") if k in names), None)
            if key is None and len(image_keys) != 1:
                raise InputError(f".npz holds {len(names)} arrays ({', '.join(names[:5])}); name the images 'images'")
            return loaded[key or image_keys[0]], (loaded[label_key] if label_key else None)
    except InputError:
        raise
    except (OSError, ValueError, EOFError) as exc:  # np.load's errors for truncated or non-array files
        raise InputError(f"unreadable array file: {exc}") from None


def check_images(images: np.ndarray) -> np.ndarray:
    """The shape the server accepts; dtype and range are checked per batch by arrays.to_model_batch."""
    if images.ndim not in (3, 4) or images.shape[1:3] != (28, 28) or images.shape[3:] not in ((), (1,)):
        raise InputError(f"array shape {list(images.shape)} is not [N, 28, 28] or [N, 28, 28, 1]")
    if len(images) == 0:
        raise InputError("array holds no images")
    return images


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def class_from_folder(name: str, classes: list[str]) -> int | None:
    """Folder name -> class id: the class name or id, leniently ('T-shirt_top', 'tshirt-top', 'top',
    'Sandals', '9', '9_ankle_boot' all work)."""
    match = re.fullmatch(r"(\d+)(?:[\s_.-]+(.*))?", name.strip())
    if match:
        wanted = int(match.group(1))
        if 0 <= wanted < len(classes):
            return wanted
        name = match.group(2) or ""
    key = _norm(name)
    if not key:
        return None
    keys = {key, key[:-1] if key.endswith("s") else key, key[:-2] if key.endswith("es") else key}
    for index, cls in enumerate(classes):
        names = {_norm(cls), *(_norm(part) for part in re.split(r"[/|]", cls))}
        if keys & names:
            return index
    return None


def walk(folder: Path) -> Iterator[Path]:
    """Files under `folder` in a stable order; hidden files and folders are skipped."""
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            yield from walk(path)
        elif path.is_file():
            yield path


def plan(inputs: list[Path], classes: list[str], labels_path: Path | None) -> list[Source]:
    """Expand the inputs into sources, with their true labels where they can be known."""
    sources: list[Source] = []
    for given in inputs:
        if given.is_dir():
            for path in walk(given):
                suffix = path.suffix.lower()
                if suffix in IMAGE_SUFFIXES:
                    sources.append(ImageSource(path, class_from_folder(path.parent.name, classes)))
                elif suffix in ARRAY_SUFFIXES or (is_idx_name(path) and "idx1" not in path.name.lower()):
                    sources.append(load_array_source(path, classes, None))
        elif given.suffix.lower() in ARRAY_SUFFIXES or is_idx_name(given):
            sources.append(load_array_source(given, classes, labels_path))
        else:
            sources.append(ImageSource(given))
    return sources


def load_array_source(path: Path, classes: list[str], labels_path: Path | None) -> Source:
    try:
        if path.suffix.lower() in ARRAY_SUFFIXES:
            images, labels = read_array(path)
        else:
            images, labels = read_idx(path, IDX_IMAGES), None
        check_images(images)
    except InputError as exc:
        return BrokenSource(path, str(exc))
    if labels_path is not None:  # given explicitly: a mismatch is the user's mistake, so refuse
        try:
            return ArraySource(path, images, read_labels(labels_path, len(images), classes))
        except InputError as exc:
            raise UsageError(f"--labels {labels_path}: {exc}") from None
    beside = label_file_beside(path) if labels is None else None
    try:
        if beside is not None:
            labels = read_labels(beside, len(images), classes)
        elif labels is not None:
            labels = check_labels(labels, len(images), classes)
    except InputError as exc:
        print(f"warning: {beside or path}: labels ignored: {exc}", file=sys.stderr)
        labels = None
    return ArraySource(path, images, labels)


# ---------------------------------------------------------------------------------------------
# Scoring backends: in-process (the server's code) or a running server


class Backend(Protocol):
    classes: list[str]
    description: str

    def score_images(self, paths: list[Path]) -> list[np.ndarray | str]:
        """Probabilities [10] or an error message, per path."""
        ...

    def score_array(self, chunk: np.ndarray) -> np.ndarray:
        """Probabilities [n, 10] of raw array rows; raises InputError for the whole chunk."""
        ...


class LocalBackend:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.classes = model.card.classes
        self.limits = imaging.ImageLimits()  # the server's defaults
        self.description = f"{model.name} version {model.version} on {', '.join(model.providers_in_use)}"

    def score_images(self, paths: list[Path]) -> list[np.ndarray | str]:
        tensors: list[np.ndarray] = []
        results: list[np.ndarray | str | None] = []
        for path in paths:
            try:
                tensors.append(imaging.preprocess(path.read_bytes(), self.limits))
                results.append(None)
            except ServiceError as exc:
                results.append(exc.message)
            except OSError as exc:
                results.append(f"cannot read file: {exc.strerror or exc}")
        if tensors:
            probabilities = iter(self.model.run(np.stack(tensors), ["probabilities"])["probabilities"])
            results = [next(probabilities) if r is None else r for r in results]
        return [r for r in results if r is not None]

    def score_array(self, chunk: np.ndarray) -> np.ndarray:
        try:
            batch = arrays.to_model_batch(chunk, len(chunk))
        except ServiceError as exc:
            raise InputError(exc.message) from None
        return self.model.run(batch, ["probabilities"])["probabilities"]


class RemoteBackend:
    """POST /v1/predict/batch: images as repeated multipart `files`, array rows as one .npy body."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        info = self._request("GET", "/v1/models")["models"][0]
        self.classes = list(info["classes"])
        self.description = f"{info['name']} version {info['version']} at {self.url}"

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str = "") -> Any:
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=self.headers)
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            # Every error from the service is {"error": "..."}; anything else is reported as it is.
            text = exc.read().decode(errors="replace")
            try:
                message = json.loads(text)["error"]
            except (ValueError, KeyError, TypeError):
                message = text.strip()[:200] or exc.reason
            raise InputError(f"server answered {exc.code}: {message}") from None

    def score_images(self, paths: list[Path]) -> list[np.ndarray | str]:
        boundary = uuid.uuid4().hex
        parts: list[bytes] = []
        results: list[np.ndarray | str | None] = []
        for path in paths:
            try:
                data = path.read_bytes()
            except OSError as exc:
                results.append(f"cannot read file: {exc.strerror or exc}")
                continue
            results.append(None)
            filename = re.sub(r"[^\w.-]", "_", path.name)  # only echoed back; keep the header simple
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n".encode()
                + data
                + b"\r\n"
            )
        if parts:
            body = b"".join(parts) + f"--{boundary}--\r\n".encode()
            try:
                content_type = f"multipart/form-data; boundary={boundary}"
                answer = self._request("POST", "/v1/predict/batch", body, content_type)["results"]
                sent: Iterator[np.ndarray | str] = (
                    item["error"] if item.get("error") else np.asarray(item["probabilities"], np.float32)
                    for item in answer
                )
            except InputError as exc:  # the request as a whole was refused: every image in it failed
                sent = iter([str(exc)] * len(parts))
            results = [next(sent) if r is None else r for r in results]
        return [r for r in results if r is not None]

    def score_array(self, chunk: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        np.save(buffer, chunk, allow_pickle=False)
        answer = self._request("POST", "/v1/predict/batch", buffer.getvalue(), "application/x-npy")["results"]
        return np.asarray([item["probabilities"] for item in answer], np.float32)


# ---------------------------------------------------------------------------------------------
# Output


@dataclass
class Row:
    source: str
    probabilities: np.ndarray | None = None
    truth: int | None = None
    error: str | None = None


def _p(value: float) -> float:
    """A float32 probability as its shortest decimal: 0.98765433, not 0.9876543283462524."""
    return float(str(np.float32(value)))


class Writer:
    def __init__(self, stream: IO[str], fmt: str, classes: list[str], top_k: int) -> None:
        self.stream, self.fmt, self.classes, self.top_k = stream, fmt, classes, top_k
        if fmt == "csv":
            ranks = [f"top{r}_{what}" for r in range(2, top_k + 1) for what in ("label", "probability")]
            self.columns = [
                "source", "label", "class_id", "probability", "true_label", "true_class_id", "error",
                *ranks, *(f"p_{name}" for name in classes),
            ]  # fmt: skip
            self.csv = csv.DictWriter(stream, self.columns, lineterminator="\n")
            self.csv.writeheader()

    def record(self, row: Row) -> dict[str, Any]:
        out: dict[str, Any] = {"source": row.source, "label": None, "class_id": None, "probability": None}
        if row.probabilities is not None:
            order = np.argsort(-row.probabilities, kind="stable")[: self.top_k]
            best = int(order[0])
            out |= {"label": self.classes[best], "class_id": best, "probability": _p(row.probabilities[best])}
            if self.top_k > 1:
                out["top_k"] = [
                    {"label": self.classes[i], "class_id": int(i), "probability": _p(row.probabilities[i])}
                    for i in order
                ]
            out["probabilities"] = [_p(v) for v in row.probabilities]
        out["true_label"] = None if row.truth is None else self.classes[row.truth]
        out["true_class_id"] = row.truth
        out["error"] = row.error
        return out

    def write(self, row: Row) -> None:
        record = self.record(row)
        if self.fmt == "jsonl":
            record.setdefault("probabilities", None)
            self.stream.write(json.dumps(record) + "\n")
            return
        flat = {k: v for k, v in record.items() if k in self.columns}
        for rank, item in enumerate(record.get("top_k", [])[1:], start=2):
            flat[f"top{rank}_label"], flat[f"top{rank}_probability"] = item["label"], item["probability"]
        for name, value in zip(self.classes, record.get("probabilities") or [], strict=False):
            flat[f"p_{name}"] = value
        self.csv.writerow(flat)


# ---------------------------------------------------------------------------------------------
# Progress and summary


class Progress:
    """A one-line bar redrawn in place on a terminal; a line every few seconds in a log."""

    def __init__(self, total: int, enabled: bool, stream: IO[str] | None = None) -> None:
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr  # looked up now, not at import: tests swap sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last = time.perf_counter()
        self.shown = False

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < (0.1 if self.tty else 5.0) and done < self.total):
            return
        self.last = now
        fraction = done / self.total if self.total else 1.0
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        bar = "#" * round(24 * fraction)
        line = f"scoring [{bar:<24}] {done}/{self.total} {fraction:4.0%}  {rate:,.0f} images/s  ETA {eta:.0f}s"
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")


@dataclass
class Stats:
    classes: list[str]
    scored: int = 0
    failed: int = 0
    labelled: int = 0
    correct: int = 0
    failures: list[str] = field(default_factory=list)  # the first few, for the summary
    predicted: np.ndarray = field(init=False)
    true: np.ndarray = field(init=False)
    hits: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.predicted, self.true, self.hits = (np.zeros(len(self.classes), np.int64) for _ in range(3))

    def add(self, row: Row) -> None:
        if row.probabilities is None:
            self.failed += 1
            if len(self.failures) < MAX_REPORTED_FAILURES:
                self.failures.append(f"{row.source}: {row.error}")
            return
        self.scored += 1
        best = int(np.argmax(row.probabilities))
        self.predicted[best] += 1
        if row.truth is not None:
            self.labelled += 1
            self.true[row.truth] += 1
            if best == row.truth:
                self.correct += 1
                self.hits[best] += 1

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def summary(self, seconds: float, description: str) -> str:
        rate = self.scored / seconds if seconds > 0 else 0.0
        lines = [
            f"scored {self.scored} images, {self.failed} failed, in {seconds:.2f} s: {rate:,.0f} images/s "
            f"({description})"
        ]
        if self.accuracy is not None:
            lines.append(f"accuracy {self.accuracy:.4f} ({self.correct}/{self.labelled} labelled images correct)")
        width = max(len(c) for c in self.classes)
        head = f"  {'class':<{width}}  predicted" + ("   true  recall" if self.labelled else "")
        lines.append(head)
        for i, name in enumerate(self.classes):
            line = f"  {name:<{width}}  {self.predicted[i]:>9}"
            if self.labelled:
                recall = f"{self.hits[i] / self.true[i]:.4f}" if self.true[i] else "     -"
                line += f"  {self.true[i]:>5}  {recall}"
            lines.append(line)
        lines += [f"failed: {failure}" for failure in self.failures]
        if self.failed > len(self.failures):
            lines.append(f"failed: ... and {self.failed - len(self.failures)} more (see the output's error column)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The run


def score(
    sources: list[Source], backend: Backend, batch_size: int, emit: Callable[[Row], None], progress: Progress
) -> None:
    """Score every source in order; `emit(row)` is called once per image, in input order."""
    done = 0
    pending: list[ImageSource] = []

    def flush_images() -> None:
        nonlocal done
        if pending:
            results = backend.score_images([s.path for s in pending])
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
                probabilities: list[np.ndarray | None] = list(backend.score_array(chunk))
                error = None
            except InputError as exc:
                probabilities, error = [None] * len(chunk), str(exc)
            for name, probs, truth in zip(names, probabilities, truths, strict=True):
                emit(Row(name, probs, None if truth is None else int(truth), error))
            done += len(chunk)
            progress.update(done)
    flush_images()


def count(sources: list[Source]) -> int:
    return sum(len(s.images) if isinstance(s, ArraySource) else 1 for s in sources)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(
        prog="python -m service.score",
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
        targets = [p for p in args.inputs if not p.is_dir() and (p.suffix.lower() in ARRAY_SUFFIXES or is_idx_name(p))]
        if len(targets) != 1 or len(args.inputs) != 1:
            parser.error("--labels needs exactly one input, an IDX or .npy/.npz file")
    if args.url and not re.match(r"https?://", args.url):
        parser.error(f"--url must start with http:// or https://, got {args.url!r}")
    return args


def make_backend(args: argparse.Namespace) -> Backend:
    if args.url:
        try:
            return RemoteBackend(args.url, args.api_key)
        except (InputError, urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ModelLoadError(f"cannot use the server at {args.url}: {reason}") from None
    folder = locate(args.models, args.model, args.model_version)
    providers = [p for p in args.providers.replace(" ", "").lower().split(",") if p]
    model = Model(folder, providers=providers or ["auto"], intra_op_threads=args.threads)
    model.load()
    return LocalBackend(model)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as exc:
        print(f"python -m service.score: error: {exc} (see --help)", file=sys.stderr)
        return 2
    try:
        backend = make_backend(args)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        sources = plan(args.inputs, backend.classes, args.labels)
    except UsageError as exc:
        print(f"python -m service.score: error: {exc}", file=sys.stderr)
        return 2

    fmt = "jsonl" if args.out == "-" or not args.out.lower().endswith(".csv") else "csv"
    try:
        stream = sys.stdout if args.out == "-" else open(args.out, "w", newline="", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
        return 2
    writer = Writer(stream, fmt, backend.classes, args.top_k)
    stats = Stats(backend.classes)
    progress = Progress(count(sources), enabled=not args.quiet)

    def emit(row: Row) -> None:
        writer.write(row)
        stats.add(row)

    start = time.perf_counter()
    try:
        score(sources, backend, args.batch_size, emit, progress)
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
    print(stats.summary(seconds, backend.description), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
