"""The model: reads a repository version, verifies it, owns the onnxruntime sessions.

It never sees HTTP. `load()` verifies each ONNX file against its card's SHA-256 and builds the session
(and, when the card lists a probabilities-only graph, a leaner one for the runs that want only the
probabilities); each answers one warm-up inference before `ready` turns true."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from service.errors import ModelLoadError, NotFound

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger("service.model")

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
GRAPH_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def versions(model_dir: Path) -> list[str]:
    """Version folders that hold a model, highest first (numeric versions sort numerically)."""
    found = [p.name for p in model_dir.iterdir() if p.is_dir() and (p / "card.json").is_file()]
    return sorted(found, key=lambda v: (v.isdigit(), int(v) if v.isdigit() else 0, v), reverse=True)


def model_names(repository: Path) -> list[str]:
    if not repository.is_dir():
        return []
    return sorted(p.name for p in repository.iterdir() if p.is_dir() and versions(p))


def locate(repository: Path, name: str | None, version: str | None) -> Path:
    """The folder of the requested (or only) model at the requested (or highest) version."""
    names = model_names(repository)
    if not names:
        raise ModelLoadError(f"no model found in {repository} (expected <name>/<version>/card.json)")
    if name is None:
        if len(names) > 1:
            raise ModelLoadError(f"{repository} holds several models ({', '.join(names)}): choose one with --model")
        name = names[0]
    elif name not in names:
        raise ModelLoadError(f"model {name!r} not found in {repository} (found: {', '.join(names)})")
    available = versions(repository / name)
    chosen = version or available[0]
    if chosen not in available:
        raise ModelLoadError(f"model {name!r} has no version {chosen!r} (found: {', '.join(available)})")
    return repository / name / chosen


def resolve_providers(requested: list[str], available: list[str], strict: bool) -> tuple[list[str], list[str]]:
    """Turn setting names into onnxruntime providers; drop (or refuse) those not on offer."""
    if requested == ["auto"]:
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return [p for p in wanted if p in available], []
    chosen, warnings = [], []
    for name in requested:
        provider = PROVIDER_ALIASES.get(name, name)
        if provider not in PROVIDER_ALIASES.values() and provider not in available:
            raise ModelLoadError(f"unknown execution provider {name!r} (known: {', '.join(PROVIDER_ALIASES)}, auto)")
        if provider in available:
            chosen.append(provider)
        else:
            message = f"{provider} requested but not available in this onnxruntime ({', '.join(available)})"
            if strict:
                raise ModelLoadError(message)
            warnings.append(message + "; falling back")
    if "CPUExecutionProvider" not in chosen:
        if strict and not chosen:
            raise ModelLoadError("no requested execution provider is available")
        chosen.append("CPUExecutionProvider")
    return chosen, warnings


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the graph, as its card describes it."""

    name: str
    shape: tuple[int, ...]  # -1 for the batch dimension, as V2 writes it
    dtype: str
    kind: str | None = None  # outputs: "probabilities", "feature_map" or "embedding"

    @classmethod
    def read(cls, raw: dict[str, Any]) -> TensorSpec:
        return cls(
            str(raw["name"]), tuple(int(d) for d in raw["shape"]), str(raw.get("dtype", "float32")), raw.get("kind")
        )


@dataclass(frozen=True)
class GraphFile:
    """An ONNX file of the version and the SHA-256 its card gives for it."""

    file: str
    sha256: str

    @classmethod
    def read(cls, raw: dict[str, Any]) -> GraphFile:
        return cls(str(raw.get("file", "model.onnx")), str(raw["sha256"]))


@dataclass(frozen=True)
class Card:
    """card.json, read once into types: what the version is, its tensors, its files."""

    name: str
    version: str
    classes: tuple[str, ...]
    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    metrics: dict[str, Any]
    graph: GraphFile
    # The same network with only its probabilities as graph outputs, written at export: onnxruntime
    # runs every node whatever a run asks for, and copies each declared output out of its blocked
    # layout, so runs that want only the probabilities are cheaper on this graph. Optional.
    probabilities_graph: GraphFile | None
    raw: dict[str, Any]

    @classmethod
    def read(cls, folder: Path) -> Card:
        path = folder / "card.json"
        try:
            raw = json.loads(path.read_text())
            lean = raw.get("onnx_probabilities")
            card = cls(
                name=str(raw["name"]),
                version=str(raw["version"]),
                classes=tuple(str(c) for c in raw["classes"]),
                input=TensorSpec.read(raw["input"]),
                outputs=tuple(TensorSpec.read(o) for o in raw["outputs"]),
                metrics=dict(raw.get("metrics") or {}),
                graph=GraphFile.read(raw["onnx"]),
                probabilities_graph=GraphFile.read(lean) if lean else None,
                raw=raw,
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{path}: unreadable model card ({type(exc).__name__}: {exc})") from None
        if not card.classes or not card.outputs:
            raise ModelLoadError(f"{path}: card lists no classes or no outputs")
        return card

    def outputs_of(self, kind: str) -> list[str]:
        return [o.name for o in self.outputs if o.kind == kind]


@dataclass
class Model:
    folder: Path
    providers: list[str] = field(default_factory=lambda: ["auto"])
    strict_providers: bool = False
    intra_op_threads: int = 1
    graph_optimization: str = "all"

    card: Card = field(init=False)
    session: ort.InferenceSession | None = field(init=False, default=None)
    # The card's probabilities-only graph, when it has one: what most runs ask for, cheaper.
    lean_session: ort.InferenceSession | None = field(init=False, default=None)
    provider_warnings: list[str] = field(init=False, default_factory=list)
    ready: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.card = Card.read(self.folder)
        # Asked on every run: computed once.
        self.output_names = [o.name for o in self.card.outputs]
        self.feature_layers = self.card.outputs_of("feature_map")
        self.lean_outputs = self.card.outputs_of("probabilities")
        self.input_name = self.card.input.name

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        return self.card.version

    @property
    def providers_in_use(self) -> list[str]:
        return self.session.get_providers() if self.session else []

    def _read_graph(self, graph: GraphFile) -> bytes:
        """The file's bytes, checked against the SHA-256 its card gives."""
        path = self.folder / graph.file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"{path}: cannot read model ({exc.strerror})") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != graph.sha256:
            raise ModelLoadError(f"{path}: SHA-256 {digest[:12]}… does not match the card's {graph.sha256[:12]}…")
        return data

    def load(self) -> None:
        data = self._read_graph(self.card.graph)
        onnx_path = self.folder / self.card.graph.file
        chosen, warnings = resolve_providers(self.providers, ort.get_available_providers(), self.strict_providers)
        if "CUDAExecutionProvider" in chosen and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu finds CUDA and cuDNN from the nvidia-* wheels (as PyTorch installs them)
            # only when asked to; without them the session silently falls back to CPU.
            try:
                ort.preload_dlls()
            except Exception as exc:  # the system libraries may still be found; the check below tells
                log.warning("onnxruntime.preload_dlls failed: %s", exc)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = GRAPH_LEVELS[self.graph_optimization]
        session = self._session(data, onnx_path, options, chosen)
        # A provider can be offered yet fail to initialise (missing CUDA libraries); onnxruntime then
        # silently runs on CPU. Report what the session really uses.
        actual = session.get_providers()
        for provider in chosen:
            if provider not in actual:
                message = f"{provider} could not be initialised; running on {', '.join(actual)}"
                if self.strict_providers:
                    raise ModelLoadError(message)
                warnings.append(message)
        self._check_graph(session, onnx_path, self.output_names)
        lean: ort.InferenceSession | None = None
        if self.card.probabilities_graph is not None:
            lean_path = self.folder / self.card.probabilities_graph.file
            lean = self._session(self._read_graph(self.card.probabilities_graph), lean_path, options, actual)
            self._check_graph(lean, lean_path, self.lean_outputs)
        self.session, self.lean_session = session, lean
        self.provider_warnings = warnings
        for message in warnings:
            log.warning(message)
        # Warm-up, each session: ready means it has answered once (a first run allocates its buffers).
        self.run(np.zeros((1, 28, 28, 1), np.float32))
        if lean is not None:
            self.run(np.zeros((1, 28, 28, 1), np.float32), self.lean_outputs)
        self.ready = True
        log.info("model %s version %s ready on %s", self.name, self.version, ", ".join(actual))

    @staticmethod
    def _session(data: bytes, path: Path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(data, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
            raise ModelLoadError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None

    def _check_graph(self, session: ort.InferenceSession, path: Path, outputs: list[str]) -> None:
        missing = set(outputs) - {o.name for o in session.get_outputs()}
        if missing or session.get_inputs()[0].name != self.input_name:
            raise ModelLoadError(f"{path}: graph does not match its card (outputs missing: {sorted(missing)})")

    def run(self, batch: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run a float32 [N, 28, 28, 1] batch; returns the requested outputs (default: all)."""
        if self.session is None:
            raise ModelLoadError("model not loaded")
        names = outputs or self.output_names
        self.check_outputs(names)
        lean = self.lean_session
        session = lean if lean is not None and all(n in self.lean_outputs for n in names) else self.session
        results = session.run(names, {self.input_name: batch})
        return dict(zip(names, results, strict=True))

    def check_outputs(self, names: Iterable[str]) -> None:
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise NotFound(f"unknown output {unknown[0]!r}; outputs are {', '.join(self.output_names)}")

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "versions": versions(self.folder.parent),
            "classes": list(self.card.classes),
            "input": self.card.raw["input"],
            "outputs": self.card.raw["outputs"],
            "providers": {
                "requested": self.providers,
                "in_use": self.providers_in_use,
                "available": ort.get_available_providers(),
                "warnings": self.provider_warnings,
            },
            "metrics": self.card.metrics,
            "parameters": self.card.raw.get("parameters"),
            "created": self.card.raw.get("created"),
        }


def build_model(settings: Settings) -> Model:
    """Locate and read the model the settings name (not yet loaded); raises ModelLoadError with a one-line
    reason."""
    return Model(
        locate(settings.models, settings.model, settings.model_version),
        providers=settings.providers,
        strict_providers=settings.strict_providers,
        intra_op_threads=settings.intra_op_threads,
        graph_optimization=settings.graph_optimization,
    )
