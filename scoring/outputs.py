"""The scorer's output: one CSV or JSONL row per image, a progress bar, and the summary with accuracy."""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from service import dataplane

if TYPE_CHECKING:
    from scoring.inputs import Unit

MAX_REPORTED_FAILURES = 20  # in the summary; every failure still gets its row in the output


class Scores(np.ndarray):
    """One image's class probabilities (a float32 vector, and usable as one) carrying its out-of-distribution
    fields, `ood_score` and `in_distribution` (None where the model serves no OOD score): numpy's way of
    attaching metadata to an array, so that whatever treats a result as a probability vector still works."""

    ood_score: float | None = None
    in_distribution: bool | None = None

    @classmethod
    def of(
        cls, probabilities: np.ndarray, ood_score: float | None = None, in_distribution: bool | None = None
    ) -> Scores:
        scores = np.asarray(probabilities, np.float32).view(cls)
        scores.ood_score = None if ood_score is None else float(ood_score)
        scores.in_distribution = None if in_distribution is None else bool(in_distribution)
        return scores


@dataclass
class Row:
    source: str
    probabilities: np.ndarray | None = None
    truth: int | None = None
    error: str | None = None


def unit_rows(unit: Unit, results: list[np.ndarray | str]) -> list[Row]:
    """The output rows of one unit (scoring.inputs.Unit) from its results, one per image: probabilities or
    an error message."""
    return [
        Row(name, None, truth, result) if isinstance(result, str) else Row(name, result, truth)
        for name, truth, result in zip(unit.names(), unit.truths(), results, strict=True)
    ]


def _p(value: float) -> float:
    """A float32 probability as its shortest decimal: 0.98765433, not 0.9876543283462524."""
    return float(str(np.float32(value)))


PARQUET_ROW_GROUP = 8192  # rows per Parquet row group: written as they fill, so memory stays bounded


class Writer:
    """Rows as CSV or JSON Lines on a text stream, or as Parquet (pyarrow) on a binary one; close() finishes
    a Parquet file (its footer) and is a no-op otherwise."""

    def __init__(self, stream: IO[Any], fmt: str, classes: list[str], top_k: int) -> None:
        self.stream, self.fmt, self.classes, self.top_k = stream, fmt, classes, top_k
        self.pending: list[dict[str, Any]] = []
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            fields = [
                ("source", pa.string()), ("label", pa.string()), ("class_id", pa.int32()),
                ("probability", pa.float32()), ("true_label", pa.string()), ("true_class_id", pa.int32()),
                ("error", pa.string()), ("probabilities", pa.list_(pa.float32())),
            ]  # fmt: skip
            if top_k > 1:
                item = pa.struct([("label", pa.string()), ("class_id", pa.int32()), ("probability", pa.float32())])
                fields.insert(7, ("top_k", pa.list_(item)))
            fields.insert(4, ("ood_score", pa.float32()))
            fields.insert(5, ("in_distribution", pa.bool_()))
            self.schema = pa.schema(fields)
            self.parquet = pq.ParquetWriter(stream, self.schema)
        if fmt == "csv":
            ranks = [f"top{r}_{what}" for r in range(2, top_k + 1) for what in ("label", "probability")]
            self.columns = [
                "source", "label", "class_id", "probability", "ood_score", "in_distribution", "true_label",
                "true_class_id", "error",
                *ranks, *(f"p_{name}" for name in classes),
            ]  # fmt: skip
            self.csv = csv.DictWriter(stream, self.columns, lineterminator="\n")
            self.csv.writeheader()

    def record(self, row: Row) -> dict[str, Any]:
        out: dict[str, Any] = {"source": row.source, "label": None, "class_id": None, "probability": None}
        # Out-of-distribution (service/ood.py): null where the model serves no OOD score, or the image failed.
        ood_score = getattr(row.probabilities, "ood_score", None)
        out["ood_score"] = None if ood_score is None else _p(ood_score)
        out["in_distribution"] = getattr(row.probabilities, "in_distribution", None)
        if row.probabilities is not None:
            order = dataplane.top_k(row.probabilities[None], self.top_k)[0].tolist()
            best = order[0]
            out |= {"label": self.classes[best], "class_id": best, "probability": _p(row.probabilities[best])}
            if self.top_k > 1:
                out["top_k"] = [
                    {"label": self.classes[i], "class_id": i, "probability": _p(row.probabilities[i])} for i in order
                ]
            out["probabilities"] = [_p(v) for v in row.probabilities]
        out["true_label"] = None if row.truth is None else self.classes[row.truth]
        out["true_class_id"] = row.truth
        out["error"] = row.error
        return out

    def write(self, row: Row) -> None:
        record = self.record(row)
        if self.fmt == "parquet":
            self.pending.append(record)
            if len(self.pending) >= PARQUET_ROW_GROUP:
                self._flush_parquet()
            return
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

    def _flush_parquet(self) -> None:
        if self.pending:
            import pyarrow as pa

            self.parquet.write_table(pa.Table.from_pylist(self.pending, self.schema))
            self.pending = []

    def close(self) -> None:
        if self.fmt == "parquet":
            self._flush_parquet()
            self.parquet.close()


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
    skipped: int = 0  # files in folders that are neither images nor arrays
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
        if self.skipped:
            lines.append(f"skipped {self.skipped} file{'s' if self.skipped != 1 else ''} (not images or arrays)")
        return "\n".join(lines)
