"""The model: reads a repository version, verifies it, owns the onnxruntime sessions.

It never sees HTTP. `load()` builds the session (and a leaner one for runs that want only the
probabilities); each answers one warm-up inference before `ready` turns true."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
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


# ------------------------------------------------------------------ a graph with fewer outputs
# onnxruntime runs every node of a graph whatever outputs a run asks for; with the feature maps declared
# as graph outputs, each run also copies them out of onnxruntime's blocked (NCHWc) layout, about 17 % of
# the instructions of a probabilities-only run (valgrind, batches of 16). So the model is also loaded
# as a second session whose graph declares only the probabilities. The serving side has no `onnx`
# package (training does), so the graph's output list is edited in the protobuf wire format directly:
# ModelProto.graph is field 7, GraphProto.output field 12, ValueInfoProto.name field 1.
_MODEL_GRAPH, _GRAPH_OUTPUT, _VALUE_INFO_NAME = 7, 12, 1


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data):
            raise ValueError("truncated protobuf")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return value, at
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(data: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """(field number, the field's whole encoding, its payload when length-delimited) for each field."""
    at = 0
    while at < len(data):
        start = at
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        payload = b""
        if wire == 0:
            _, at = _varint(data, at)
        elif wire == 1:
            at += 8
        elif wire == 2:
            size, at = _varint(data, at)
            payload, at = data[at : at + size], at + size
        elif wire == 5:
            at += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if at > len(data):
            raise ValueError("truncated protobuf")
        yield number, data[start:at], payload


def _value_name(value_info: bytes) -> str:
    return next((p.decode() for n, _, p in _fields(value_info) if n == _VALUE_INFO_NAME), "")


def graph_with_outputs(model: bytes, keep: Iterable[str]) -> bytes:
    """The serialized ONNX model with only the graph outputs named in `keep`, everything else as it was."""
    keep = set(keep)

    def graph(payload: bytes) -> bytes:
        return b"".join(
            whole for number, whole, value in _fields(payload) if number != _GRAPH_OUTPUT or _value_name(value) in keep
        )

    out = bytearray()
    for number, whole, payload in _fields(model):
        if number == _MODEL_GRAPH:
            edited = graph(payload)
            out += _encode_varint(_MODEL_GRAPH << 3 | 2) + _encode_varint(len(edited)) + edited
        else:
            out += whole
    return bytes(out)


@dataclass
class Card:
    name: str
    version: str
    classes: list[str]
    input: dict[str, Any]
    outputs: list[dict[str, Any]]
    metrics: dict[str, Any]
    sha256: str
    raw: dict[str, Any]

    @classmethod
    def read(cls, folder: Path) -> Card:
        path = folder / "card.json"
        try:
            raw = json.loads(path.read_text())
            card = cls(
                name=raw["name"],
                version=str(raw["version"]),
                classes=list(raw["classes"]),
                input=dict(raw["input"]),
                outputs=list(raw["outputs"]),
                metrics=dict(raw.get("metrics") or {}),
                sha256=raw["onnx"]["sha256"],
                raw=raw,
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{path}: unreadable model card ({type(exc).__name__}: {exc})") from None
        if not card.classes or not card.outputs:
            raise ModelLoadError(f"{path}: card lists no classes or no outputs")
        return card


@dataclass
class Model:
    folder: Path
    providers: list[str] = field(default_factory=lambda: ["auto"])
    strict_providers: bool = False
    intra_op_threads: int = 1
    graph_optimization: str = "all"

    card: Card = field(init=False)
    session: ort.InferenceSession | None = field(init=False, default=None)
    # The same model with only its probabilities as graph outputs: what most runs ask for, cheaper.
    lean_session: ort.InferenceSession | None = field(init=False, default=None)
    provider_warnings: list[str] = field(init=False, default_factory=list)
    ready: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.card = Card.read(self.folder)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        return self.card.version

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.card.outputs]

    @property
    def feature_layers(self) -> list[str]:
        return [o["name"] for o in self.card.outputs if o.get("kind") == "feature_map"]

    @functools.cached_property
    def lean_outputs(self) -> list[str]:  # asked on every run: computed once
        return [o["name"] for o in self.card.outputs if o.get("kind") == "probabilities"]

    @property
    def providers_in_use(self) -> list[str]:
        return self.session.get_providers() if self.session else []

    def load(self) -> None:
        onnx_path = self.folder / self.card.raw.get("onnx", {}).get("file", "model.onnx")
        try:
            data = onnx_path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"{onnx_path}: cannot read model ({exc.strerror})") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.card.sha256:
            raise ModelLoadError(
                f"{onnx_path}: SHA-256 {digest[:12]}… does not match the card's {self.card.sha256[:12]}…"
            )

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
        try:
            session = ort.InferenceSession(data, sess_options=options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
            raise ModelLoadError(f"{onnx_path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
        # A provider can be offered yet fail to initialise (missing CUDA libraries); onnxruntime then
        # silently runs on CPU. Report what the session really uses.
        actual = session.get_providers()
        for provider in chosen:
            if provider not in actual:
                message = f"{provider} could not be initialised; running on {', '.join(actual)}"
                if self.strict_providers:
                    raise ModelLoadError(message)
                warnings.append(message)
        missing = set(self.output_names) - {o.name for o in session.get_outputs()}
        if missing or session.get_inputs()[0].name != self.card.input["name"]:
            raise ModelLoadError(f"{onnx_path}: graph does not match its card (outputs missing: {sorted(missing)})")
        self.session = session
        self.lean_session = self._lean_session(data, options, actual)
        self.provider_warnings = warnings
        for message in warnings:
            log.warning(message)
        # Warm-up, each session: ready means it has answered once (a first run allocates its buffers).
        self.run(np.zeros((1, 28, 28, 1), np.float32))
        if self.lean_session is not None:
            self.run(np.zeros((1, 28, 28, 1), np.float32), self.lean_outputs)
        self.ready = True
        log.info("model %s version %s ready on %s", self.name, self.version, ", ".join(actual))

    def _lean_session(
        self, data: bytes, options: ort.SessionOptions, providers: list[str]
    ) -> ort.InferenceSession | None:
        """The probabilities-only session, or None (runs then all use the full one): an optimisation only."""
        lean = self.lean_outputs
        if not lean or len(lean) == len(self.output_names):
            return None
        try:
            session = ort.InferenceSession(graph_with_outputs(data, lean), sess_options=options, providers=providers)
        except Exception as exc:  # an unexpected encoding: serve everything from the full graph
            log.warning("no probabilities-only session (%s); every run uses the full graph", exc)
            return None
        if sorted(o.name for o in session.get_outputs()) != sorted(lean):
            return None
        return session

    def run(self, batch: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run a float32 [N, 28, 28, 1] batch; returns the requested outputs (default: all)."""
        if self.session is None:
            raise ModelLoadError("model not loaded")
        names = outputs or self.output_names
        self.check_outputs(names)
        lean = self.lean_session
        session = lean if lean is not None and all(n in self.lean_outputs for n in names) else self.session
        results = session.run(names, {self.card.input["name"]: batch})
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
            "classes": self.card.classes,
            "input": self.card.input,
            "outputs": self.card.outputs,
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
