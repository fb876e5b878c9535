"""Grad-CAM is exact: the gradient the service computes in closed form (service/explain.py, from the graph's
own outputs and the exported head) equals TensorFlow's GradientTape gradient on the Keras model."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from service.explain import Head, gradcam, upsample
from tests.support import ROOT
from training import architectures, explain, export
from training.data import load_test
from training.train import to_tensor

FOLDER = ROOT / "models" / "fashion-mnist-cnn" / "1"


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return to_tensor(load_test().images[:100])


def test_closed_form_gradient_equals_gradient_tape_on_100_test_images(images: np.ndarray) -> None:
    """The committed model: its model.head.npz and model.onnx's conv3 and embedding, against tf.GradientTape
    on model.keras, for the predicted class and for another class; within 1e-4 everywhere."""
    import keras

    model = keras.models.load_model(FOLDER / "model.keras")
    head = Head.from_bytes((FOLDER / "model.head.npz").read_bytes())
    session = ort.InferenceSession(str(FOLDER / "model.onnx"), providers=["CPUExecutionProvider"])
    probabilities, features, embedding = session.run(["probabilities", head.layer, head.embedding], {"image": images})
    for class_ids in (probabilities.argmax(axis=1), (probabilities.argmax(axis=1) + 3) % 10):
        activations, want = explain.tape_gradient(model, images, class_ids)
        got = head.logit_gradient(features, embedding, class_ids)
        difference, scale = np.abs(got - want).max(), np.abs(want).max()
        print(f"max |closed form - GradientTape| {difference:.2e} (gradient scale {scale:.2f})")
        assert np.abs(got - want).max() <= 1e-4
        assert np.abs(want).max() > 0.01  # a real gradient, not zeros compared with zeros
        # And so Grad-CAM itself: weights from TensorFlow's gradient give the same maps.
        weights = want.mean(axis=(1, 2))
        tape_cam = upsample(np.maximum(np.einsum("nhwc,nc->nhw", activations, weights), 0.0))
        np.testing.assert_allclose(gradcam(head, features, embedding, class_ids), tape_cam, atol=1e-4)


def test_committed_head_is_what_the_keras_model_exports() -> None:
    import keras

    committed = Head.from_bytes((FOLDER / "model.head.npz").read_bytes())
    fresh = explain.head_of(keras.models.load_model(FOLDER / "model.keras"))
    assert (committed.layer, committed.embedding, committed.pool) == (fresh.layer, fresh.embedding, fresh.pool)
    assert (fresh.layer, fresh.embedding, fresh.pool) == ("conv3", "embedding", 2)
    for name in ("dense1_kernel", "dense1_bias", "dense2_kernel", "dense2_bias"):
        assert np.array_equal(getattr(committed, name), getattr(fresh, name))


@pytest.mark.parametrize("arch", list(architectures.ARCHITECTURES))
def test_every_architecture_has_an_exact_head_or_says_why_not(arch: str, images: np.ndarray) -> None:
    """The head is read generically: each architecture's (freshly initialised) head reproduces its own ONNX
    graph above the last conv layer and TensorFlow's gradient, or it is refused with a reason (no conv)."""
    model = architectures.build(arch)
    try:
        head = explain.head_of(model)
    except explain.UnsupportedHead as exc:
        assert arch == "mlp", exc
        return
    data = export.to_onnx(model).SerializeToString()
    sample = images[:20]
    outputs = export.graph_outputs(data, sample, [export.PROBABILITIES, head.layer, head.embedding])
    checked = explain.check(model, head, outputs, sample)
    assert checked.gradient_max_abs_diff <= 1e-4 and checked.embedding_max_abs_diff <= 1e-4


def test_an_unsupported_head_is_refused_by_name() -> None:
    import keras
    from keras import layers

    inputs = keras.Input((28, 28, 1), name="image")
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(8, activation="relu", name="embedding")(x)
    model = keras.Model(inputs, layers.Dense(10, activation="softmax", name="probabilities")(x))
    with pytest.raises(explain.UnsupportedHead, match="expected Flatten above conv1, found GlobalAveragePooling2D"):
        explain.head_of(model)
