"""What scores the inputs: the model in this process (the server's own decoding and Model.run, no HTTP,
no batcher) or a running server's /v1/predict/batch."""

from __future__ import annotations

import io
import json
import re
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from scoring import InputError
from scoring.outputs import Scores
from service import arrays, imaging
from service.dataplane import Upload, decode_images
from service.errors import ModelLoadError, ServiceError
from service.model import OOD_SCORE, Model

if TYPE_CHECKING:
    from scoring.inputs import Unit
    from scoring.outputs import Progress, Row


class Engine(Protocol):
    classes: list[str]
    description: str

    def score_images(self, paths: list[Path]) -> list[np.ndarray | str]:
        """Probabilities [classes] or an error message, per path."""
        ...

    def score_array(self, chunk: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Probabilities [n, classes] of raw array rows; raises InputError for the whole chunk."""
        ...


@runtime_checkable
class BulkEngine(Protocol):
    """An engine that runs the whole job itself (scoring.ray_engine on a Ray cluster) rather than one batch
    per call: it scores the units (scoring.inputs.units) and calls `emit` for each image, in input order."""

    classes: list[str]

    @property
    def description(self) -> str: ...  # read after the job: it may tell how the job went

    def score_units(self, units: list[Unit], emit: Callable[[Row], None], progress: Progress) -> None: ...


def run_unit(engine: Engine, unit: Unit) -> list[np.ndarray | str]:
    """Probabilities [classes] or an error message for each image of `unit`, as `engine` scores them."""
    if unit.broken is not None:
        return [unit.broken.error]
    if unit.images is not None:
        return engine.score_images([source.path for source in unit.images])
    assert unit.array is not None
    chunk = unit.array.images[unit.start : unit.stop]
    try:
        return list(engine.score_array(chunk))
    except InputError as exc:  # the chunk as a whole (its dtype or range): every row of it fails
        return [str(exc)] * len(chunk)


def unreadable(exc: OSError) -> str:
    return f"cannot read file: {exc.strerror or exc}"


class LocalEngine:
    """A loaded Model: images decoded as the server decodes uploads, each batch one Model.run."""

    def __init__(self, model: Model) -> None:
        if not model.lean_outputs:
            raise ModelLoadError(f"model {model.name} version {model.version}: its card lists no probabilities output")
        self.model = model
        self.classes = list(model.card.classes)
        self.limits = imaging.ImageLimits()  # the server's defaults
        self.description = f"{model.name} version {model.version} on {', '.join(model.providers_in_use)}"

    def _probabilities(self, batch: np.ndarray) -> list[np.ndarray]:
        """Per image: its probabilities, as Scores with the OOD fields when the model serves them."""
        model = self.model
        result = model.run(batch, model.classify_outputs)  # with the OOD score, when the model serves one
        probabilities = result[model.probabilities_output]
        if model.ood is None or OOD_SCORE not in result:
            return [Scores.of(row) for row in probabilities]
        scores = result[OOD_SCORE]
        return [Scores.of(*row) for row in zip(probabilities, scores, model.ood.passes(scores), strict=True)]

    def score_images(self, paths: list[Path]) -> list[np.ndarray | str]:
        results: list[np.ndarray | str | None] = []
        uploads: list[Upload] = []
        for path in paths:
            try:
                uploads.append(Upload(path.name, path.read_bytes()))
                results.append(None)
            except OSError as exc:
                results.append(unreadable(exc))
        batch = decode_images(uploads, self.limits)
        scored = iter(self._probabilities(batch.tensor)) if len(batch.tensor) else iter(())
        decoded = (batch.failures[i].message if i in batch.failures else next(scored) for i in range(len(batch)))
        return [next(decoded) if r is None else r for r in results]

    def score_array(self, chunk: np.ndarray) -> list[np.ndarray]:
        try:
            batch = arrays.to_model_batch(chunk, len(chunk))
        except ServiceError as exc:
            raise InputError(exc.message) from None
        return self._probabilities(batch)


class RemoteEngine:
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
                results.append(unreadable(exc))
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
                    item["error"] if item.get("error") else _scores(item) for item in answer
                )
            except InputError as exc:  # the request as a whole was refused: every image in it failed
                sent = iter([str(exc)] * len(parts))
            results = [next(sent) if r is None else r for r in results]
        return [r for r in results if r is not None]

    def score_array(self, chunk: np.ndarray) -> list[np.ndarray]:
        buffer = io.BytesIO()
        np.save(buffer, chunk, allow_pickle=False)
        answer = self._request("POST", "/v1/predict/batch", buffer.getvalue(), "application/x-npy")["results"]
        return [_scores(item) for item in answer]


def _scores(item: dict[str, Any]) -> Scores:
    """One /v1/predict/batch result: its probabilities with its OOD fields (when the server sends them)."""
    return Scores.of(item["probabilities"], item.get("ood_score"), item.get("in_distribution"))
