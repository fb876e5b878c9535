"""card.json: everything the service and a reader need to know about one model version."""

from __future__ import annotations

import json
import math
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from training.data import CLASS_NAMES, sha256_of

CARD = "card.json"
LIBRARIES = ("tensorflow-cpu", "keras", "tf2onnx", "onnx", "onnxruntime", "numpy")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def outputs_spec(shapes: dict[str, list[int]]) -> list[dict[str, object]]:
    """Describe each ONNX output; `shapes` maps name → shape with -1 for the batch."""
    spec: list[dict[str, object]] = []
    for name, shape in shapes.items():
        if name == "probabilities":
            kind, meaning = "probabilities", "softmax class probabilities in class-id order, summing to 1"
        elif name == "embedding":
            kind, meaning = "embedding", "activations of the penultimate dense layer (after ReLU)"
        else:
            kind, meaning = "feature_map", f"activations of conv layer {name} after ReLU, NHWC"
        spec.append({"name": name, "shape": shape, "dtype": "float32", "kind": kind, "description": meaning})
    return spec


def build(
    *,
    name: str,
    version: str,
    onnx_path: Path,
    lean_path: Path,
    lean_outputs: tuple[str, ...] | list[str],
    output_shapes: dict[str, list[int]],
    training: dict[str, object],
    parameters: int,
    data_sha256: dict[str, str],
    multiply_adds: int | None = None,
    parity: dict[str, object],
    lean_parity: dict[str, object],
    opset: int,
    metrics: dict[str, object] | None = None,
    created: str | None = None,
    extras: dict[str, dict[str, object]] | None = None,
    selection: list[dict[str, object]] | None = None,
) -> dict[str, object]:
    """The card of one exported version. `lean_path` is the graph with only `lean_outputs` as outputs (the
    probabilities and the embedding), which the server prefers for runs that want nothing else; `extras`
    are the entries of the files beside the graphs ({"explain": {"file": ..., ...}, "ood": ...}: each
    gets its file's SHA-256); `selection` is the log of the runs the model was chosen from (validation scores
    only; training/selection.py); `created` defaults to now."""
    folder = onnx_path.parent
    return {
        "name": name,
        "version": version,
        "description": "Fashion-MNIST garment classifier (10 classes), trained with TensorFlow/Keras, "
        "exported with tf2onnx.",
        "classes": list(CLASS_NAMES),
        "input": {
            "name": "image",
            "shape": [-1, 28, 28, 1],
            "dtype": "float32",
            "layout": "NHWC",
            "range": [0.0, 1.0],
            "polarity": "light garment on a dark background, as in Fashion-MNIST",
        },
        "outputs": outputs_spec(output_shapes),
        "metrics": metrics or {},
        "training": training,
        **({"selection": selection} if selection else {}),
        "parameters": parameters,
        **({"multiply_adds": multiply_adds} if multiply_adds is not None else {}),  # per image, conv and dense
        "data": {"name": "Fashion-MNIST", "sha256": data_sha256},
        "onnx": {"file": onnx_path.name, "sha256": sha256_of(onnx_path), "opset": opset, "parity": parity},
        "onnx_lean": {
            "file": lean_path.name,
            "sha256": sha256_of(lean_path),
            "outputs": list(lean_outputs),
            "parity": lean_parity,
        },
        **{
            key: {"file": entry["file"], "sha256": sha256_of(folder / str(entry["file"])), **entry}
            for key, entry in (extras or {}).items()
        },
        "libraries": {"python": platform.python_version(), **{lib: _version(lib) for lib in LIBRARIES}},
        "created": created or datetime.now(UTC).isoformat(timespec="seconds"),
    }


def read(folder: Path) -> dict[str, object]:
    return json.loads((folder / CARD).read_text())


def write(folder: Path, card: dict[str, object]) -> None:
    (folder / CARD).write_text(json.dumps(card, indent=2) + "\n")


def standard_error(accuracy: float, images: int) -> float:
    """Binomial standard error of an accuracy measured on `images` images."""
    return math.sqrt(accuracy * (1 - accuracy) / images) if images else float("nan")


def card_metrics(
    evaluation: dict[str, object], validation_accuracy: float | None, validation_images: int | None = None
) -> dict[str, object]:
    """The card keeps the headline figures and per-class scores; the confusion matrix stays in
    evaluation.json. The validation score comes with its size and binomial standard error: differences
    below about two of those are noise."""
    summary = {k: v for k, v in evaluation.items() if k != "confusion_matrix"}
    if validation_accuracy is not None:
        summary["validation_accuracy"] = round(validation_accuracy, 4)
        if validation_images:
            summary["validation_images"] = validation_images
            summary["validation_standard_error"] = round(standard_error(validation_accuracy, validation_images), 4)
    return summary
