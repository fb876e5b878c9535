"""The serving core under every surface (REST /v1, V2, the web page, the offline scorer).

Framework-free: no FastAPI or Starlette here. It owns which model answers and whether it is ready,
turning uploads or arrays into one batch with per-item failures, running batches through the batcher,
and reading class scores (top k, labels) out of the probabilities. The HTTP adapters in service/api
parse requests into these calls and write the results as their protocol wants them.

Decoding a small PNG takes tens of microseconds, less than the hop to a worker thread and back, so such
images are decoded on the event loop; anything bigger, or in another format, in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from service import arrays, explain, imaging, memory
from service.batching import Batcher, BatchStats
from service.errors import BadInput, Busy, NotFound, NotReady, ServiceError
from service.memory import MemoryBudget
from service.model import OOD_SCORE, Model, TensorSpec
from service.repository import Observer, Repository, VersionPolicy
from service.settings import Settings

# Inline decoding: a PNG of at most this many pixels (judged from its header) whose file is at most
# `Settings.inline_decode_max_bytes` long. Its decoded size is then bounded whatever the bytes claim.
INLINE_PNG_PIXELS = 64 * 64

T = TypeVar("T")


@dataclass(frozen=True)
class Upload:
    """One uploaded file: its name (when it had one) and its bytes."""

    filename: str | None
    data: bytes
    content_type: str | None = None


@dataclass
class Batch:
    """Inputs turned into one model batch: the tensors of the items that could be used, in input order,
    and why each of the others failed (by input index)."""

    tensor: np.ndarray  # float32 [usable items, 28, 28, 1]
    names: list[str | None]  # one per input item
    failures: dict[int, ServiceError] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    def first_failure(self) -> ServiceError | None:
        """The failure of the first failed item, its index in the message: for protocols where one bad
        item fails the request (V2)."""
        if not self.failures:
            return None
        index = min(self.failures)
        error = self.failures[index]
        return ServiceError(f"element {index}: {error.message}", error.status_code)


# ------------------------------------------------------------------------------ framework-free helpers


def top_k(probabilities: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest values of each row, best first; ties keep class order."""
    rows = probabilities.reshape(len(probabilities), -1)
    return np.argsort(-rows, axis=1, kind="stable")[:, : min(k, rows.shape[1])]


def class_scores(classes: Sequence[str], probabilities: np.ndarray, k: int) -> list[dict[str, Any]]:
    """Per row of [N, classes] probabilities: label, class id, every probability and the k best.

    Values go through float32 -> Python float (exact), as `float(probabilities[i])` would."""
    orders = top_k(probabilities, k).tolist()
    return [
        {
            "label": classes[order[0]],
            "class_id": order[0],
            "probabilities": row,
            "top_k": [{"label": classes[i], "class_id": i, "probability": row[i]} for i in order],
        }
        for row, order in zip(probabilities.tolist(), orders, strict=True)
    ]


def scored(model: Model, result: dict[str, np.ndarray], k: int) -> list[dict[str, Any]]:
    """class_scores of a run's probabilities, each with `ood_score` and `in_distribution` (service/ood.py)
    when the model serves an out-of-distribution score and the run fetched its embedding."""
    scores = class_scores(model.card.classes, result[model.probabilities_output], k)
    ood = model.ood
    if ood is not None and (OOD_SCORE in result or model.ood_output in result):
        # Computed by Model.run for the whole batch when the run asked for it (classify does), else here.
        ood_scores = result[OOD_SCORE] if OOD_SCORE in result else ood.score(result[model.ood_output])
        for item, fields in zip(scores, ood.fields_of(ood_scores), strict=True):
            item |= fields
    return scores


def derived_outputs(model: Model) -> list[TensorSpec]:
    """Outputs computed from the graph's own (DataPlane.outputs), which the V2 protocol offers by name beside
    them: the OOD score and flag per image, and Grad-CAM and LayerCAM of the predicted class, [N, 28, 28]."""
    specs = []
    if model.ood is not None:
        specs += [TensorSpec("ood_score", (-1,), "float32", "ood_score"), TensorSpec("in_distribution", (-1,), "bool")]
    if model.head is not None:
        specs += [
            TensorSpec(method.value, (-1, explain.SIZE, explain.SIZE), "float32", "attribution")
            for method in explain.GRADIENT_METHODS
        ]
    return specs


def decodes_inline(data: bytes, max_bytes: int) -> bool:
    """A small PNG, judged by its IHDR header (width, height) before anything is decoded."""
    if not max_bytes >= len(data) >= 24 or not data.startswith(imaging.PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width * height <= INLINE_PNG_PIXELS


def decode_images(files: Sequence[Upload], limits: imaging.ImageLimits, budget: MemoryBudget | None = None) -> Batch:
    """Image files -> one batch; a file that fails gets its own error and the others go on. Each decode holds
    its working memory from `budget` (no room in time: the whole request is 503, Busy); a cancelled request
    stops before its next image (memory.Cancelled)."""
    tensors, failures = [], {}
    for index, upload in enumerate(files):
        memory.check_cancelled()
        try:
            if arrays.is_array_file(upload.data, upload.filename):
                raise BadInput("send an array file on its own, not among images")
            tensors.append(imaging.preprocess(upload.data, limits, budget))
        except Busy:
            raise  # the server's state, not this file's fault: the request is retried as a whole
        except ServiceError as exc:
            failures[index] = exc
    tensor = np.stack(tensors) if tensors else np.zeros((0, 28, 28, 1), np.float32)
    return Batch(tensor, [u.filename for u in files], failures)


def decode_uploads(
    files: Sequence[Upload], limits: imaging.ImageLimits, max_rows: int, budget: MemoryBudget | None = None
) -> Batch:
    """Image files, or one .npy/.npz array file of [N, 28, 28(, 1)] (then one item per row)."""
    if len(files) == 1 and arrays.is_array_file(files[0].data, files[0].filename):
        tensor = arrays.load_array_file(files[0].data, max_rows, budget)
        return Batch(tensor, [files[0].filename] * len(tensor))
    return decode_images(files, limits, budget)


# ------------------------------------------------------------------------------------- the data plane


class DataPlane:
    """What is served and how inputs reach it. `open()` opens the model repository (service/repository.py:
    every model and version its policies choose, each loaded and warmed with its own batcher; or only
    `model`, when one is given); until then, and after `close()`, every request is 503."""

    def __init__(self, settings: Settings, model: Model | None = None, repository: Repository | None = None) -> None:
        self.settings = settings
        self.limits = imaging.ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        # One per process: what requests may spend on bodies, decodes and parses at once (service/memory.py).
        self.budget: MemoryBudget | None = None
        if settings.memory_budget_mb:
            self.budget = MemoryBudget(settings.memory_budget_mb * memory.MIB, wait_s=settings.memory_wait_s)
            memory.tune_allocator()  # freed memory goes back to the system after bursts
        self.repository = repository or Repository(settings, model)
        # Told about each loaded version's batches, versions served and released, failed loads: metrics.
        self.observers: list[Observer] = self.repository.observers
        self._live = self.repository.live  # id(model) -> its Served; the same dict, kept up to date there

    async def open(self) -> None:
        await self.repository.open()

    async def close(self) -> None:
        await self.repository.close()

    # ------------------------------------------------------------------------------ what is served

    @property
    def ready(self) -> bool:
        """The default model is ready to answer; with no default model, at least one model is."""
        return self.repository.table.ready()

    def readiness(self) -> dict[str, Any]:
        """/readyz's body; 503 while not `ready`."""
        table = self.repository.table
        if not table.ready():
            if table.default is not None:
                raise NotReady("model not ready")
            if table.default_name is None and table.versions:
                raise NotReady("no model ready")
            raise table.missing_default()
        body: dict[str, Any] = {"status": "ready"}
        if table.default is not None:
            model = table.default.model
            body |= {
                "model": model.name,
                "version": model.version,
                "providers": model.providers_in_use,
                "warnings": model.provider_warnings,
            }
        body["models"] = {name: list(versions) for name, versions in table.versions.items()}
        return body

    @property
    def batch_stats(self) -> BatchStats | None:
        """How the default model's batches have looked (None before `open()`)."""
        served = self.repository.table.default
        return served.batcher.stats if served is not None and served.batcher is not None else None

    def model(self, name: str | None = None, version: str | None = None, *, ready: bool = True) -> Model:
        """The model `name` (None: the default model) at `version` (None: its highest loaded version). 404
        for an unknown name or version (or no default model among several), 503 while it is not ready
        (unless `ready=False`). The request path: dictionary lookups on the routing table, nothing more."""
        table = self.repository.table
        if name is None:
            served = table.default
            if served is None:
                raise table.missing_default()
        else:
            versions = table.versions.get(name)
            if versions is None:
                raise table.unknown(name)
            if version is None:
                served = next(iter(versions.values()))
            else:
                found = versions.get(version)
                if found is None:
                    raise NotFound(f"model {name!r} has no version {version!r} loaded; loaded: {', '.join(versions)}")
                served = found
        model = served.model
        if ready and not model.ready:
            raise NotReady("model not ready" if name is None else f"model {name!r} is not ready")
        return model

    def versions(self, name: str) -> list[str]:
        """The loaded versions of model `name`, highest first (404 if none)."""
        table = self.repository.table
        if name not in table.versions:
            raise table.unknown(name)
        return list(table.versions[name])

    def model_names(self) -> list[str]:
        """The models with a loaded version (503 before `open()`)."""
        table = self.repository.table
        if not table.open and not table.versions:
            raise NotReady("model not loaded yet")
        return list(table.versions)

    def metadata(self, name: str | None = None, version: str | None = None) -> dict[str, Any]:
        """One version's metadata (/v1/models), its `versions` those loaded."""
        model = self.model(name, version)
        return model.metadata(self.versions(model.name))

    def batcher(self, name: str | None = None, version: str | None = None) -> Batcher:
        """The batcher of a loaded version (tests and benchmarks look at it)."""
        served = self._live.get(id(self.model(name, version)))
        if served is None or served.batcher is None:
            raise NotReady("model not being served")
        return served.batcher

    # ------------------------------------------------------------------------------ the repository

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        return self.repository.index(ready_only)

    async def load_model(self, name: str, config: str | None = None) -> None:
        """Load or reload model `name` from the repository; `config`, Triton's JSON model configuration,
        may give its version_policy (nothing else of it is read)."""
        policy = None
        if config:
            try:
                raw = json.loads(config)
                if not isinstance(raw, dict):
                    raise ValueError("not an object")
                policy = VersionPolicy.from_config(raw["version_policy"]) if "version_policy" in raw else None
            except ValueError as exc:
                raise BadInput(f"parameters.config: {exc}") from None
        await self.repository.load(name, policy)

    async def unload_model(self, name: str) -> None:
        await self.repository.unload(name)

    def statistics(self, name: str | None = None, version: str | None = None) -> list[dict[str, Any]]:
        return self.repository.statistics(name, version)

    # ---------------------------------------------------------------------------------------- inputs

    async def off_loop(self, work: Callable[..., T], *args: Any, inline: bool = False) -> T:
        """`work(*args)`, in a worker thread unless `inline`: CPU work in proportion to a request must not
        hold the event loop, which serves every other request of this process. When the awaiting request is
        cancelled (its time limit, its client gone), the thread's work sees memory.check_cancelled() raise at
        its next check (between images, in budget waits) and stops."""
        if inline:
            return work(*args)
        with memory.cancellable() as token:  # copied into the thread's context by to_thread
            try:
                return await asyncio.to_thread(work, *args)
            except asyncio.CancelledError:
                token.set()
                raise

    def decodes_inline(self, data: bytes) -> bool:
        return decodes_inline(data, self.settings.inline_decode_max_bytes)

    async def image(self, data: bytes) -> np.ndarray:
        """One image file -> float32 [1, 28, 28, 1]."""
        # Inline decodes (a PNG of at most INLINE_PNG_PIXELS, on the event loop, one at a time) take no budget.
        if self.decodes_inline(data):
            return imaging.preprocess(data, self.limits)[None]
        return (await self.off_loop(imaging.preprocess, data, self.limits, self.budget))[None]

    async def uploads(self, files: Sequence[Upload]) -> Batch:
        """Image files (each may fail on its own), or one array file."""
        return await self.off_loop(decode_uploads, files, self.limits, self.settings.max_batch_images, self.budget)

    async def images(self, files: Sequence[Upload]) -> Batch:
        """Image files only (each may fail on its own)."""
        if all(self.decodes_inline(f.data) for f in files):
            return decode_images(files, self.limits)
        return await self.off_loop(decode_images, files, self.limits, self.budget)

    def array(self, values: np.ndarray) -> np.ndarray:
        """uint8 pixels or floats in [0, 1], [N, 28, 28(, 1)] -> the model's float32 batch."""
        return arrays.to_model_batch(values, self.settings.max_batch_images)

    # -------------------------------------------------------------------------------------- running

    async def infer(self, model: Model, tensor: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """The named outputs for a float32 [N, 28, 28, 1] batch, through the batcher of the model's version.
        The request counts as in flight in that version for the whole call: a version being retired is
        released only once its count is zero. A request that looked its version up before the version was
        released and arrives only now is answered by that same model, directly: never by another version,
        never with an error."""
        served = self._live.get(id(model))
        if served is None or served.batcher is None:
            if not model.ready:
                raise NotReady(f"model {model.name!r} is not ready")
            return await asyncio.to_thread(model.run, tensor, list(outputs))
        served.in_flight += 1
        try:
            return await served.batcher.run(tensor, list(outputs))
        except Exception:
            served.stats.fail_count += 1
            raise
        finally:
            served.in_flight -= 1
            if served.drained is not None and not served.in_flight:
                served.drained.set()

    async def classify(self, model: Model, tensor: np.ndarray, k: int) -> list[dict[str, Any]]:
        """Class scores (see class_scores) of each image of the batch."""
        if not len(tensor):
            return []
        result = await self.infer(model, tensor, model.classify_outputs)
        return scored(model, result, k)

    async def outputs(self, model: Model, tensor: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The named outputs of a batch: the graph's own and those of derived_outputs(model), from one run."""
        wanted = set(names)
        needed = wanted & set(model.output_names)
        ood = model.ood if wanted & {"ood_score", "in_distribution"} else None
        maps = [method for method in explain.GRADIENT_METHODS if method.value in wanted]
        head = model.head if maps else None
        if ood is not None:
            needed.add(model.ood_output)
        if head is not None:
            needed |= {model.probabilities_output, head.layer, head.embedding}
        result = await self.infer(model, tensor, [n for n in model.output_names if n in needed])
        if ood is not None:
            scores = ood.score(result[model.ood_output])
            result["ood_score"], result["in_distribution"] = scores, ood.passes(scores)
        if head is not None:
            predicted = result[model.probabilities_output].argmax(axis=1)
            for method in maps:
                result[method.value] = explain.GRADIENT_MAPS[method](
                    head, result[head.layer], result[head.embedding], predicted
                )
        return {name: result[name] for name in names}

    # ---------------------------------------------------------------------------------- explanations

    async def explain(
        self,
        model: Model,
        tensor: np.ndarray,
        method: explain.Method,
        class_id: int | None = None,
        k: int = 3,
        patch: int = explain.DEFAULT_PATCH,
        stride: int = explain.DEFAULT_STRIDE,
    ) -> explain.Explanation:
        """An attribution map of one image ([1, 28, 28, 1]) for `class_id` (default: the predicted class),
        with the image's prediction (class scores and OOD fields). Grad-CAM and LayerCAM: one run of the graph's
        probabilities, last conv layer and embedding, then numpy (service/explain.py); occlusion: the image
        and every occluded copy in one batch."""
        if method is explain.Method.occlusion and stride > patch:
            raise ServiceError(f"stride {stride} is larger than patch {patch}: some pixels would never be covered", 422)
        if class_id is not None and not 0 <= class_id < len(model.card.classes):
            raise ServiceError(
                f"class_id {class_id} out of range: the model has {len(model.card.classes)} classes", 422
            )
        if method in explain.GRADIENT_METHODS:
            head = model.head
            if head is None:
                raise NotFound(
                    f"model {model.name!r} version {model.version!r} has no explanation head for {method.value} "
                    "(its card lists no `explain` file): method=occlusion works for every model"
                )
            names = list(dict.fromkeys([*model.classify_outputs, head.layer, head.embedding]))
            result = await self.infer(model, tensor, names)
            prediction = scored(model, result, k)[0]
            chosen = prediction["class_id"] if class_id is None else class_id
            attribution = explain.GRADIENT_MAPS[method](
                head, result[head.layer], result[head.embedding], np.array([chosen])
            )[0]
            details: dict[str, Any] = {"layer": head.layer, "target": "logit"}
        else:
            copies = await self.off_loop(explain.occluded, tensor[0], patch, stride)
            # The OOD score is the image's own (row 0): the copies need only their probabilities.
            outputs = [model.probabilities_output] + ([model.ood_output] if model.ood is not None else [])
            result = await self.infer(model, np.concatenate([tensor, copies]), outputs)
            probabilities = result[model.probabilities_output]
            prediction = scored(model, {name: values[:1] for name, values in result.items()}, k)[0]
            chosen = prediction["class_id"] if class_id is None else class_id
            attribution = explain.occlusion_map(probabilities[0, chosen], probabilities[1:, chosen], patch, stride)
            details = {"target": "probability", "patch": patch, "stride": stride, "baseline": 0.0}
        return explain.Explanation(method, chosen, model.card.classes[chosen], attribution, prediction, details)
