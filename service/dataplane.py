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
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from service import arrays, imaging
from service.batching import Batcher, BatchStats
from service.errors import BadInput, NotFound, NotReady, ServiceError
from service.model import Model, build_model
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


def decodes_inline(data: bytes, max_bytes: int) -> bool:
    """A small PNG, judged by its IHDR header (width, height) before anything is decoded."""
    if not max_bytes >= len(data) >= 24 or not data.startswith(imaging.PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width * height <= INLINE_PNG_PIXELS


def decode_images(files: Sequence[Upload], limits: imaging.ImageLimits) -> Batch:
    """Image files -> one batch; a file that fails gets its own error and the others go on."""
    tensors, failures = [], {}
    for index, upload in enumerate(files):
        try:
            if arrays.is_array_file(upload.data, upload.filename):
                raise BadInput("send an array file on its own, not among images")
            tensors.append(imaging.preprocess(upload.data, limits))
        except ServiceError as exc:
            failures[index] = exc
    tensor = np.stack(tensors) if tensors else np.zeros((0, 28, 28, 1), np.float32)
    return Batch(tensor, [u.filename for u in files], failures)


def decode_uploads(files: Sequence[Upload], limits: imaging.ImageLimits, max_rows: int) -> Batch:
    """Image files, or one .npy/.npz array file of [N, 28, 28(, 1)] (then one item per row)."""
    if len(files) == 1 and arrays.is_array_file(files[0].data, files[0].filename):
        tensor = arrays.load_array_file(files[0].data, max_rows)
        return Batch(tensor, [files[0].filename] * len(tensor))
    return decode_images(files, limits)


# ------------------------------------------------------------------------------------- the data plane


class DataPlane:
    """What is served and how inputs reach it. `open()` loads the model (unless given one already
    loaded) and starts its batcher; until then, and after `close()`, every request is 503."""

    def __init__(self, settings: Settings, model: Model | None = None) -> None:
        self.settings = settings
        self.limits = imaging.ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        self._model = model
        self._batcher: Batcher | None = None
        # Called after each session run with (batch size, each caller's queue time, run time): metrics.
        self.batch_observers: list[Callable[[int, list[float], float], None]] = []

    async def open(self) -> None:
        model = self._model or build_model(self.settings)
        if not model.ready:
            await asyncio.to_thread(model.load)
        batcher = Batcher(model, self.settings.batch_max_size, self.settings.batch_max_delay_ms)
        batcher.observers.extend(self.batch_observers)
        await batcher.start()
        self._model, self._batcher = model, batcher

    async def close(self) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            await batcher.stop()

    # ------------------------------------------------------------------------------ what is served

    @property
    def ready(self) -> bool:
        return self._batcher is not None and self._model is not None and self._model.ready

    @property
    def batch_stats(self) -> BatchStats | None:
        """How the served model's batches have looked (None before `open()`)."""
        return self._batcher.stats if self._batcher is not None else None

    def loaded(self) -> Model | None:
        """The served model, ready or not (None before it is read)."""
        return self._model

    def model(self, name: str | None = None, version: str | None = None, *, ready: bool = True) -> Model:
        """The model `name` (any name: the served one) at `version` (any: the served one). 404 for an
        unknown name or version, 503 while it is not ready (unless `ready=False`)."""
        model = self._model
        if model is None:
            raise NotReady("model not loaded yet")
        if name is not None and name != model.name:
            raise NotFound(f"unknown model {name!r}; serving {model.name!r}")
        if version is not None and version != model.version:
            raise NotFound(f"model {name!r} has no version {version!r} being served; serving version {model.version!r}")
        if ready and not self.ready:
            raise NotReady("model not ready" if name is None else f"model {name!r} is not ready")
        return model

    # ---------------------------------------------------------------------------------------- inputs

    async def off_loop(self, work: Callable[..., T], *args: Any, inline: bool = False) -> T:
        """`work(*args)`, in a worker thread unless `inline`: CPU work in proportion to a request must not
        hold the event loop, which serves every other request of this process."""
        return work(*args) if inline else await asyncio.to_thread(work, *args)

    def decodes_inline(self, data: bytes) -> bool:
        return decodes_inline(data, self.settings.inline_decode_max_bytes)

    async def image(self, data: bytes) -> np.ndarray:
        """One image file -> float32 [1, 28, 28, 1]."""
        tensor = await self.off_loop(imaging.preprocess, data, self.limits, inline=self.decodes_inline(data))
        return tensor[None]

    async def uploads(self, files: Sequence[Upload]) -> Batch:
        """Image files (each may fail on its own), or one array file."""
        return await self.off_loop(decode_uploads, files, self.limits, self.settings.max_batch_images)

    async def images(self, files: Sequence[Upload]) -> Batch:
        """Image files only (each may fail on its own)."""
        inline = all(self.decodes_inline(f.data) for f in files)
        return await self.off_loop(decode_images, files, self.limits, inline=inline)

    def array(self, values: np.ndarray) -> np.ndarray:
        """uint8 pixels or floats in [0, 1], [N, 28, 28(, 1)] -> the model's float32 batch."""
        return arrays.to_model_batch(values, self.settings.max_batch_images)

    # -------------------------------------------------------------------------------------- running

    async def infer(self, model: Model, tensor: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """The named outputs for a float32 [N, 28, 28, 1] batch, through the model's batcher."""
        if self._batcher is None or self._batcher.model is not model:
            raise NotReady(f"model {model.name!r} is not being served")
        return await self._batcher.run(tensor, list(outputs))

    async def classify(self, model: Model, tensor: np.ndarray, k: int) -> list[dict[str, Any]]:
        """Class scores (see class_scores) of each image of the batch."""
        if not len(tensor):
            return []
        result = await self.infer(model, tensor, model.lean_outputs)
        return class_scores(model.card.classes, result[model.lean_outputs[0]], k)
