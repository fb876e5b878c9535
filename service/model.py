"""The model: reads a repository version, verifies it, owns the onnxruntime sessions.

It never sees HTTP. `load()` verifies each ONNX file against its card's SHA-256 and builds the session
(and, when the card lists a lean graph, a leaner one for the runs that want only the probabilities and the
embedding); each answers one warm-up inference before `ready` turns true. The card's explanation head and
out-of-distribution parameters (service/explain.py, service/ood.py) are verified and read the same way."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.errors import ModelLoadError, NotFound
from service.explain import GRADIENT_METHODS, Head
from service.ood import OodModel

log = logging.getLogger("service.model")

# A run may ask for this beside the graph's outputs when the card lists OOD parameters: each image's
# out-of-distribution score (service/ood.py), computed from the embedding in the same run, once per batch.
OOD_SCORE = "ood_score"

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


def version_key(version: str) -> tuple[bool, int, str]:
    """Sort key of version names: numeric versions numerically, above any other name."""
    return (version.isdigit(), int(version) if version.isdigit() else 0, version)


def versions(model_dir: Path) -> list[str]:
    """Version folders that hold a model, highest first (numeric versions sort numerically)."""
    found = [p.name for p in model_dir.iterdir() if p.is_dir() and (p / "card.json").is_file()]
    return sorted(found, key=version_key, reverse=True)


def model_names(repository: Path) -> list[str]:
    if not repository.is_dir():
        return []
    return sorted(p.name for p in repository.iterdir() if p.is_dir() and versions(p))


# The model the short routes and the scorer use when a repository holds several and none is named.
PREFERRED_DEFAULT = "fashion-mnist-cnn"


def locate(repository: Path, name: str | None, version: str | None) -> Path:
    """The folder of the requested model (else the only one, else PREFERRED_DEFAULT when present) at the
    requested (or highest) version."""
    names = model_names(repository)
    if not names:
        raise ModelLoadError(
            f"no model found in {repository.absolute()} (expected <name>/<version>/card.json there): choose the "
            "model repository with --models or FASHION_SERVE_MODELS"
        )
    if name is None:
        if len(names) > 1 and PREFERRED_DEFAULT not in names:
            raise ModelLoadError(f"{repository} holds several models ({', '.join(names)}): choose one with --model")
        name = names[0] if len(names) == 1 else PREFERRED_DEFAULT
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
    # The same network with only the outputs every prediction needs as graph outputs (`lean_outputs`: the
    # probabilities and the embedding the out-of-distribution score is computed from), written at export:
    # onnxruntime runs every node whatever a run asks for, and copies each declared output out of its
    # blocked layout, so those runs are cheaper on this graph. Optional. The card's `onnx_lean`; a card
    # from before the embedding was added says `onnx_probabilities`, a graph with the probabilities only.
    lean_graph: GraphFile | None
    raw: dict[str, Any]
    lean_outputs: tuple[str, ...] = ()
    # The layers above the last conv layer as arrays, for exact Grad-CAM (service/explain.py), and the
    # out-of-distribution score's parameters (service/ood.py): the card's `explain` and `ood`. Optional.
    head: GraphFile | None = None
    ood: GraphFile | None = None

    @classmethod
    def read(cls, folder: Path) -> Card:
        path = folder / "card.json"
        try:
            raw = json.loads(path.read_text())
            lean = raw.get("onnx_lean") or raw.get("onnx_probabilities")
            lean_outputs = lean.get("outputs", ["probabilities"]) if lean else []
            head, ood = raw.get("explain"), raw.get("ood")
            card = cls(
                name=str(raw["name"]),
                version=str(raw["version"]),
                classes=tuple(str(c) for c in raw["classes"]),
                input=TensorSpec.read(raw["input"]),
                outputs=tuple(TensorSpec.read(o) for o in raw["outputs"]),
                metrics=dict(raw.get("metrics") or {}),
                graph=GraphFile.read(raw["onnx"]),
                lean_graph=GraphFile.read(lean) if lean else None,
                raw=raw,
                lean_outputs=tuple(str(o) for o in lean_outputs),
                head=GraphFile.read(head) if head else None,
                ood=GraphFile.read(ood) if ood else None,
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
    # The card's lean graph (probabilities and embedding), when it has one: what most runs ask for, cheaper.
    lean_session: ort.InferenceSession | None = field(init=False, default=None)
    # From the card's `explain` and `ood` files, when it lists them (loaded and checked by load()).
    head: Head | None = field(init=False, default=None)
    ood: OodModel | None = field(init=False, default=None)
    provider_warnings: list[str] = field(init=False, default_factory=list)
    ready: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.card = Card.read(self.folder)
        # Asked on every run: computed once.
        self.output_names = [o.name for o in self.card.outputs]
        self.feature_layers = self.card.outputs_of("feature_map")
        self.probabilities_output = next(iter(self.card.outputs_of("probabilities")), "probabilities")
        # The lean graph's outputs, probabilities first (without a lean graph: the probabilities).
        self.lean_outputs = list(self.card.lean_outputs) if self.card.lean_graph else [self.probabilities_output]
        # What every prediction asks for: the probabilities, and the embedding when an OOD score is served.
        self.ood_output = str((self.card.raw.get("ood") or {}).get("output", "embedding"))
        self.classify_outputs = [self.probabilities_output]
        # Where each output goes in a batch's run (the batcher orders merged requests' outputs by it).
        self.output_positions = {name: i for i, name in enumerate(self.output_names)}
        self.input_name = self.card.input.name
        # A model is named by its folders, <name>/<version>/, as the repository routes it: a card that says
        # otherwise (a version folder copied from another) is a warning, never what is reported.
        self.name, self.version = self.folder.parent.name, self.folder.name
        # Logged by whoever serves it (service.repository), not here: reading a card says nothing yet.
        said = (("name", self.name, self.card.name), ("version", self.version, self.card.version))
        self.card_warnings = [
            f"its card's {what} is {card_says!r}; it is {folder_says!r}, its folder's name"
            for what, folder_says, card_says in said
            if folder_says != card_says
        ]

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
        if self.card.lean_graph is not None:
            lean_path = self.folder / self.card.lean_graph.file
            if self.lean_outputs[:1] != [self.probabilities_output] or set(self.lean_outputs) - set(self.output_names):
                raise ModelLoadError(f"{lean_path}: the card's lean outputs {self.lean_outputs} are not its outputs")
            lean = self._session(self._read_graph(self.card.lean_graph), lean_path, options, actual)
            self._check_graph(lean, lean_path, self.lean_outputs)
        self.head, self.ood = self._read_head(), self._read_ood()
        if self.ood is not None:
            self.classify_outputs = [self.probabilities_output, OOD_SCORE]
            self.output_positions[OOD_SCORE] = len(self.output_names)
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

    def _read_head(self) -> Head | None:
        if self.card.head is None:
            return None
        path = self.folder / self.card.head.file
        try:
            head = Head.from_bytes(self._read_graph(self.card.head))
        except ValueError as exc:
            raise ModelLoadError(f"{path}: {exc}") from None
        shapes = {o.name: o.shape for o in self.card.outputs}
        layer, embedding = shapes.get(head.layer), shapes.get(head.embedding)
        if layer is None or embedding is None or len(layer) != 4 or embedding[-1] != head.dense1_kernel.shape[1]:
            raise ModelLoadError(
                f"{path}: its layers {head.layer!r}, {head.embedding!r} do not match the card's outputs"
            )
        if head.classes != len(self.card.classes):
            raise ModelLoadError(f"{path}: {head.classes} classes, the card has {len(self.card.classes)}")
        return head

    def _read_ood(self) -> OodModel | None:
        if self.card.ood is None:
            return None
        path = self.folder / self.card.ood.file
        try:
            ood = OodModel.from_bytes(self._read_graph(self.card.ood))
        except ValueError as exc:
            raise ModelLoadError(f"{path}: {exc}") from None
        shape = next((o.shape for o in self.card.outputs if o.name == self.ood_output), None)
        if shape is None or shape[-1] != ood.dimensions:
            raise ModelLoadError(f"{path}: fitted to {ood.dimensions} values of {self.ood_output!r}, not the card's")
        return ood

    @staticmethod
    def _session(data: bytes, path: Path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(data, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
            raise ModelLoadError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None

    def _check_graph(self, session: ort.InferenceSession, path: Path, outputs: list[str]) -> None:
        missing = set(outputs) - {o.name for o in session.get_outputs()}
        graph_input = session.get_inputs()[0]
        if missing or graph_input.name != self.input_name:
            raise ModelLoadError(f"{path}: graph does not match its card (outputs missing: {sorted(missing)})")
        # Fixed dimensions must agree with the card's (symbolic ones, the batch, take anything).
        card, graph = self.card.input.shape, graph_input.shape
        if len(graph) != len(card) or any(
            isinstance(g, int) and g > 0 and c > 0 and g != c for g, c in zip(graph, card, strict=True)
        ):
            raise ModelLoadError(f"{path}: graph input shape {graph} does not match the card's {list(card)}")

    def run(self, batch: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run a float32 [N, 28, 28, 1] batch; returns the requested outputs (default: all)."""
        if self.session is None:
            raise ModelLoadError("model not loaded")
        names = outputs or self.output_names
        self.check_outputs(names)
        ood = self.ood if OOD_SCORE in names else None
        fetch = [n for n in names if n != OOD_SCORE]
        if ood is not None and self.ood_output not in fetch:
            fetch.append(self.ood_output)
        lean = self.lean_session
        session = lean if lean is not None and all(n in self.lean_outputs for n in fetch) else self.session
        results = dict(zip(fetch, session.run(fetch, {self.input_name: batch}), strict=True))
        if ood is None:
            return results
        results[OOD_SCORE] = ood.score(results[self.ood_output])
        return {name: results[name] for name in names}

    def check_outputs(self, names: Iterable[str]) -> None:
        unknown = [n for n in names if n not in self.output_positions]
        if unknown:
            raise NotFound(f"unknown output {unknown[0]!r}; outputs are {', '.join(self.output_names)}")

    def metadata(self, loaded_versions: list[str] | None = None) -> dict[str, Any]:
        """What /v1/models tells; `versions` lists `loaded_versions` (the repository's, those being served),
        else the version folders found beside this one."""
        return {
            "name": self.name,
            "version": self.version,
            "versions": loaded_versions if loaded_versions is not None else versions(self.folder.parent),
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
            # POST /v1/explain's methods for this version (the gradient methods need the card's head file).
            "explanations": ([m.value for m in GRADIENT_METHODS] if self.head is not None else []) + ["occlusion"],
            "out_of_distribution": None
            if self.ood is None
            else {
                "score": "Mahalanobis distance of the square-rooted embedding to the nearest class (shared covariance)",
                "threshold": self.ood.threshold,
                "validation_tpr": self.ood.validation_tpr,
            },
        }
