"""Keras → ONNX with tf2onnx, named inputs and outputs, and a parity gate against Keras.

tf2onnx's `from_keras` fails on Keras 3 models, so the model is wrapped in a `tf.function`
with an explicit input signature and converted with `from_function`; its tensors then get
the names the service and the card use.

Beside model.onnx goes model.lean.onnx: the same graph with only `probabilities` and `embedding` as its
graph outputs (what every prediction needs: the class probabilities, and the embedding its
out-of-distribution score is computed from). onnxruntime runs every node whatever outputs a run asks
for, and copies each declared output out of its blocked layout on every run, so the server answers
those requests from this leaner graph; the conv feature maps are copied only when asked for.

Files that depend on the exported graphs (the explanation head, the out-of-distribution parameters) are
made by an `extras` callback from the graphs' bytes, after the gates and before anything is written.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402

from training.architectures import feature_layers  # noqa: E402

OPSET = 17
INPUT_NAME = "image"
PROBABILITIES = "probabilities"
EMBEDDING = "embedding"
LEAN_FILE = "model.lean.onnx"
LEAN_OUTPUTS = (PROBABILITIES, EMBEDDING)  # those of them the graph has
PARITY_SAMPLES = 1_000
PARITY_ATOL = 1e-5


class ParityError(Exception):
    """ONNX and Keras disagree beyond the gate: nothing is written."""


@dataclass(frozen=True)
class Parity:
    samples: int
    max_abs_diff: float
    argmax_agreement: float


@dataclass(frozen=True)
class Exported:
    """What `export` wrote and measured."""

    parity: Parity  # model.onnx against Keras
    lean_path: Path  # the lean graph, beside model.onnx
    lean_outputs: tuple[str, ...]  # its outputs, probabilities first
    lean_parity: Parity  # that graph against Keras; each of its outputs equals model.onnx's bit for bit
    extras: tuple[Path, ...] = ()  # the files the extras callback made, beside model.onnx


def output_names(model: keras.Model) -> list[str]:
    return [PROBABILITIES, *feature_layers(model), "embedding"]


def to_onnx(model: keras.Model) -> onnx.ModelProto:
    names = output_names(model)
    tapped = keras.Model(model.inputs, [model.output] + [model.get_layer(n).output for n in names[1:]])
    spec = (tf.TensorSpec([None, 28, 28, 1], tf.float32, name=INPUT_NAME),)

    @tf.function(input_signature=spec)
    def serve(image: tf.Tensor) -> list[tf.Tensor]:
        return tapped(image, training=False)

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=OPSET)
    _rename(proto, {proto.graph.input[0].name: INPUT_NAME})
    _rename(proto, {out.name: name for out, name in zip(proto.graph.output, names, strict=True)})
    for out in proto.graph.output:  # a clean, symbolic batch dimension everywhere
        out.type.tensor_type.shape.dim[0].dim_param = "N"
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    proto.graph.name = model.name
    onnx.checker.check_model(proto)
    return proto


def _rename(proto: onnx.ModelProto, mapping: dict[str, str]) -> None:
    graph = proto.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = mapping.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]


def lean_graph(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `proto` whose only graph outputs are `probabilities` and, when the graph has it,
    `embedding`: same nodes, same weights."""
    lean = onnx.ModelProto()
    lean.CopyFrom(proto)
    if not any(out.name == PROBABILITIES for out in lean.graph.output):
        raise ValueError(f"graph {proto.graph.name!r} has no {PROBABILITIES!r} output")
    kept = [out for name in LEAN_OUTPUTS for out in lean.graph.output if out.name == name]
    del lean.graph.output[:]
    lean.graph.output.extend(kept)
    onnx.checker.check_model(lean)
    return lean


def graph_outputs(onnx_bytes: bytes, images: np.ndarray, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The graph's outputs (all, or `names`) for `images`, from onnxruntime on CPU with one thread, in
    batches of 500."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    names = names or [o.name for o in session.get_outputs()]
    parts = [session.run(names, {INPUT_NAME: images[i : i + 500]}) for i in range(0, max(len(images), 1), 500)]
    return {name: np.concatenate([part[k] for part in parts]) for k, name in enumerate(names)}


def onnx_probabilities(onnx_bytes: bytes, images: np.ndarray) -> np.ndarray:
    """The graph's `probabilities` for `images`, from onnxruntime on CPU."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return session.run([PROBABILITIES], {INPUT_NAME: images})[0]  # type: ignore[no-any-return]


def check_parity(model: keras.Model, onnx_bytes: bytes, images: np.ndarray) -> Parity:
    """Probabilities from onnxruntime and Keras on the same images must match."""
    got = onnx_probabilities(onnx_bytes, images)
    want = model.predict(images, batch_size=256, verbose=0)
    diff = float(np.max(np.abs(got - want)))
    agree = float(np.mean(got.argmax(1) == want.argmax(1)))
    parity = Parity(len(images), diff, agree)
    if diff > PARITY_ATOL or agree < 1.0:
        raise ParityError(
            f"ONNX differs from Keras: max |diff| {diff:.2e} (gate {PARITY_ATOL:.0e}), "
            f"argmax agreement {agree:.2%} on {len(images)} images"
        )
    return parity


Extras = Callable[[bytes, bytes], dict[str, bytes]]


def export(model: keras.Model, target: Path, parity_images: np.ndarray, extras: Extras | None = None) -> Exported:
    """Convert to `target` and its lean graph beside it (LEAN_FILE).

    Both graphs must pass the parity gate against Keras on `parity_images`, and each of the lean graph's
    outputs must equal the full graph's exactly; then `extras(full graph bytes, lean graph bytes)` makes
    any files that depend on them ({file name: bytes}, beside `target`; it raises to stop the export).
    Only then is each file moved into place atomically. Nothing is written if a check fails.
    """
    images = parity_images[:PARITY_SAMPLES]
    proto = to_onnx(model)
    data = proto.SerializeToString()
    lean_proto = lean_graph(proto)
    lean = lean_proto.SerializeToString()
    lean_outputs = tuple(out.name for out in lean_proto.graph.output)
    parity = check_parity(model, data, images)
    got, want = graph_outputs(lean, images), graph_outputs(data, images, list(lean_outputs))
    for name in lean_outputs:
        if not np.array_equal(got[name], want[name]):
            raise ParityError(f"{LEAN_FILE}: {name} differs from the full graph's")
    lean_parity = check_parity(model, lean, images)
    files = extras(data, lean) if extras is not None else {}
    lean_path = target.parent / LEAN_FILE
    written = []
    for name, content in files.items():
        written.append(target.parent / name)
        _write_atomically(written[-1], content)
    _write_atomically(lean_path, lean)
    _write_atomically(target, data)
    return Exported(parity, lean_path, lean_outputs, lean_parity, tuple(written))


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=target.suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600: a server running as another user could not read it
    os.replace(tmp, target)
