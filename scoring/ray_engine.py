"""--engine ray: the same scoring on a Ray cluster (`--address`), or on a local Ray instance started for the job.

The driver (python -m scoring) plans the work exactly as the in-process scorer does (scoring.inputs.units:
the same batches, so the same answers to the bit), makes it a Ray Dataset with one row per unit, and scores it
with `map_batches` on a pool of actors (ActorPoolStrategy), each holding one onnxruntime session: a
scoring.engines.LocalEngine, i.e. the server's own decoding (service.dataplane.decode_images) and
service.model.Model. Rows come back in input order (preserve_order) and are written and counted as they
arrive, so the output, the progress bar and the summary are the in-process scorer's.

What travels: image files by path (each actor reads its own, so every node needs the inputs at the same path,
as with Ray's own file readers: a shared file system), array rows (.npy/.npz/IDX, read on the driver when the
job is planned) as .npy bytes; the model repository is read by each actor from the same path too. Every node
runs the same environment (`pip install 'fashion-serve[ray]'`).

Faults: an actor whose node dies is restarted on a live node (max_restarts) and its unfinished tasks are run
again there (max_task_retries); Ray Data keeps one output per row, so every image is still scored exactly
once. A file that cannot be read or decoded is an error row, never a failed task.

Ray is imported only here, and only for --engine ray: the server never imports it."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from scoring.engines import LocalEngine, run_unit
from scoring.inputs import ImageSource, Unit
from scoring.outputs import Progress, Row, Scores, unit_rows
from service.errors import ModelLoadError
from service.model import Model

# Ray Data's blocks: one unit per block up to this many, so that the work spreads over every actor and a
# lost node costs the re-run of a few units, not of a large share of the job.
MAX_BLOCKS = 2000


class UnitScorer:
    """One Ray actor: a loaded model, scoring one unit per call (map_batches with batch_size=1)."""

    def __init__(self, folder: str, providers: list[str], threads: int) -> None:
        import ray

        model = Model(Path(folder), providers=providers, intra_op_threads=threads)
        model.load()
        self.engine = LocalEngine(model)
        self.node = ray.get_runtime_context().get_node_id()
        self.pid = os.getpid()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        probabilities, details = [], []
        for paths, npy in zip(batch["paths"], batch["npy"], strict=True):
            unit = decode_unit(str(paths), bytes(npy))
            results = run_unit(self.engine, unit)
            matrix = np.zeros((len(results), len(self.engine.classes)), np.float32)
            for i, result in enumerate(results):
                if not isinstance(result, str):
                    matrix[i] = result
            probabilities.append(npy_bytes(matrix))
            details.append(json.dumps([describe(result) for result in results]))
        n = len(batch["unit"])
        return {
            "unit": np.asarray(batch["unit"], np.int64),
            "probabilities": np.asarray(probabilities, dtype=object),
            "details": np.asarray(details, dtype=object),
            "node": np.asarray([self.node] * n, dtype=object),
            "pid": np.full(n, self.pid, np.int64),
        }


def describe(result: np.ndarray | str) -> dict[str, Any]:
    """What travels beside an image's probabilities: its error, or the out-of-distribution fields a
    scoring.outputs.Scores carries (None where the model serves none)."""
    if isinstance(result, str):
        return {"error": result}
    return {
        "ood_score": getattr(result, "ood_score", None),
        "in_distribution": getattr(result, "in_distribution", None),
    }


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_unit(unit: Unit) -> tuple[str, bytes]:
    """A unit as one Dataset row's fields: the image paths (JSON), or the array rows as .npy bytes."""
    if unit.images is not None:
        return json.dumps([str(s.path) for s in unit.images]), b""
    assert unit.array is not None
    return "[]", npy_bytes(np.ascontiguousarray(unit.array.images[unit.start : unit.stop]))


def decode_unit(paths: str, npy: bytes) -> Unit:
    """The unit an actor runs: what run_unit needs of it (paths, or the array rows), nothing else."""
    if npy:
        from scoring.inputs import ArraySource

        rows = np.load(io.BytesIO(npy), allow_pickle=False)
        return Unit(array=ArraySource(Path("<array>"), rows), start=0, stop=len(rows))
    return Unit(images=[ImageSource(Path(p)) for p in json.loads(paths)])


class RayEngine:
    """Scores whole jobs on Ray (scoring.engines.BulkEngine): connects to `address`, or starts a local
    instance; `actors` model replicas (default: as many as the cluster's CPUs allow), `actor_cpus` each."""

    def __init__(
        self,
        folder: Path,
        providers: list[str],
        threads: int,
        address: str | None = None,
        actors: int | None = None,
        actor_cpus: float = 1.0,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ModelLoadError("--engine ray needs Ray: pip install 'fashion-serve[ray]'") from None
        model = Model(folder, providers=providers, intra_op_threads=threads)  # the card only: no session here
        if not model.lean_outputs:
            raise ModelLoadError(f"model {model.name} version {model.version}: its card lists no probabilities output")
        self.folder, self.providers, self.threads = folder.resolve(), providers, threads
        self.classes = list(model.card.classes)
        self.name, self.version = model.name, model.version
        self.actor_cpus = actor_cpus
        logging.getLogger("ray").setLevel(logging.WARNING)
        try:
            if address:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            else:
                ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"cannot use the Ray cluster at {address or 'a new local instance'}: {exc}") from None
        self.where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        self.actors = actors or max(1, int(cpus // actor_cpus))
        self.nodes = len([n for n in ray.nodes() if n.get("Alive")])
        self.images_per_node: Counter[str] = Counter()
        self.pids: set[int] = set()
        self.first_result_s: float | None = None  # from the job's start to its first unit back
        self.steady_rate: float | None = None  # images/s from the first unit back to the last

    @property
    def description(self) -> str:
        text = (
            f"{self.name} version {self.version} on {self.where}: {self.nodes} node{'s' * (self.nodes != 1)}, "
            f"{self.actors} actor{'s' * (self.actors != 1)} of {self.actor_cpus:g} CPU"
        )
        if self.images_per_node:
            text += "; images per node: " + ", ".join(f"{n[:12]} {c}" for n, c in sorted(self.images_per_node.items()))
        if self.first_result_s is not None:
            text += f"; first rows after {self.first_result_s:.1f} s (the actors starting)"
            if self.steady_rate is not None:
                text += f", then {self.steady_rate:,.0f} images/s"
        return text

    def results(self, units: list[Unit]) -> Iterator[dict[str, Any]]:
        """One output row per unit scored on the cluster, in the order of `units`."""
        import ray
        from ray.data import ActorPoolStrategy, DataContext

        context = DataContext.get_current()
        context.execution_options.preserve_order = True  # rows back in input order
        context.enable_progress_bars = False  # the scorer draws its own...
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # ...so no notice that it is off
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # warnings (retries, lost nodes) still show
        # Ray Data's defaults, kept because they are what is wanted (since Ray 2.60 it warns when they are set):
        # actors spread over the nodes (its scheduling strategy SPREAD), and a lost actor restarted
        # (max_restarts=-1) with its unfinished tasks run again (max_task_retries=-1).
        # tests/process/test_ray_scoring.py checks both nodes work and kills one mid-job.
        items = []
        for index, unit in enumerate(units):
            paths, npy = encode_unit(unit)
            items.append({"unit": index, "paths": paths, "npy": npy})
        dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), MAX_BLOCKS)))
        scored = dataset.map_batches(
            UnitScorer,
            batch_size=1,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=self.actors),
            num_cpus=self.actor_cpus,
            fn_constructor_kwargs={"folder": str(self.folder), "providers": self.providers, "threads": self.threads},
        )
        yield from scored.iter_rows()

    def score_units(self, units: list[Unit], emit: Callable[[Row], None], progress: Progress) -> None:
        remote = [u for u in units if u.broken is None]
        started = time.perf_counter()
        results = self.results(remote) if remote else iter(())
        done = 0
        expected = 0
        first_at, after_first = 0.0, 0
        for unit in units:
            if unit.broken is not None:
                rows = unit_rows(unit, [unit.broken.error])
            else:
                result = next(results)
                if self.first_result_s is None:
                    first_at = time.perf_counter()
                    self.first_result_s = first_at - started
                else:
                    after_first += len(unit)
                if int(result["unit"]) != expected:
                    raise RuntimeError(f"Ray returned unit {result['unit']} where {expected} was due")
                expected += 1
                matrix = np.load(io.BytesIO(bytes(result["probabilities"])), allow_pickle=False)
                scored: list[np.ndarray | str] = [
                    d["error"] if "error" in d else Scores.of(matrix[i], d["ood_score"], d["in_distribution"])
                    for i, d in enumerate(json.loads(result["details"]))
                ]
                rows = unit_rows(unit, scored)
                self.images_per_node[str(result["node"])] += len(rows)
                self.pids.add(int(result["pid"]))
            for row in rows:
                emit(row)
            done += len(unit)
            progress.update(done)
        if next(results, None) is not None:
            raise RuntimeError("Ray returned more units than were sent")
        if after_first:
            self.steady_rate = after_first / max(time.perf_counter() - first_at, 1e-9)
