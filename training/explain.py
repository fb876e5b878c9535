"""The layers above the last conv layer as plain arrays (model.head.npz), so that the service computes
Grad-CAM's gradient exactly, in numpy, from the graph's own outputs (service/explain.py says how).

`head_of` reads the Keras model and accepts only a head it can differentiate exactly: the last conv
layer's (post-ReLU) output, then optional max pooling (stride = size, no padding), dropout, flatten,
a dense layer with either a ReLU or a batch norm + ReLU (the `embedding` layer), dropout, and a softmax
dense layer. Batch norm is folded into the dense layer's kernel and bias. `check_gradient` compares the
closed-form gradient with TensorFlow's GradientTape on the Keras model (the export's gate, and a test).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from service.explain import Head
from training.architectures import feature_layers

EMBEDDING = "embedding"
GRADIENT_ATOL = 1e-4
HEAD_ATOL = 1e-4


class UnsupportedHead(ValueError):
    """The network above the last conv layer is not of a form whose gradient has a closed form here."""


@dataclass(frozen=True)
class HeadCheck:
    """How the exported head reproduces the ONNX graph above the conv layer, and the gradient TensorFlow's."""

    samples: int
    embedding_max_abs_diff: float  # numpy head on the graph's conv activations vs the graph's embedding
    probabilities_max_abs_diff: float  # softmax of the head's logits vs the graph's probabilities
    gradient_max_abs_diff: float  # closed form vs tf.GradientTape on the Keras model
    gradient_max_abs: float  # the gradient's own scale, for reference


def _activation(layer: keras.layers.Layer) -> str:
    return str(getattr(getattr(layer, "activation", None), "__name__", "linear"))


def head_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers after the last exported conv layer, in order."""
    names = feature_layers(model)
    if not names:
        raise UnsupportedHead(f"{model.name} has no conv layer to explain")
    order = [layer.name for layer in model.layers]
    return model.layers[order.index(names[-1]) + 1 :]  # type: ignore[no-any-return]


def head_of(model: keras.Model) -> Head:
    """The head of `model` as arrays; raises UnsupportedHead for any other form than the module doc's."""
    layer_name = feature_layers(model)[-1] if feature_layers(model) else ""
    rest = [layer for layer in head_layers(model) if not isinstance(layer, layers.Dropout)]  # identity at inference

    def take(kind: type, what: str) -> keras.layers.Layer:
        if not rest or not isinstance(rest[0], kind):
            found = type(rest[0]).__name__ if rest else "nothing"
            raise UnsupportedHead(f"{model.name}: expected {what} above {layer_name}, found {found}")
        return rest.pop(0)

    pool = 1
    if rest and isinstance(rest[0], layers.MaxPooling2D):
        pooling = rest.pop(0)
        size, strides = tuple(pooling.pool_size), tuple(pooling.strides)
        if size[0] != size[1] or strides != size or pooling.padding != "valid":
            raise UnsupportedHead(f"{model.name}: pooling {size} stride {strides} {pooling.padding}")
        pool = size[0]
    take(layers.Flatten, "Flatten")
    dense1 = take(layers.Dense, "Dense")
    kernel = dense1.kernel.numpy().astype(np.float64)
    bias = dense1.bias.numpy().astype(np.float64) if dense1.use_bias else np.zeros(kernel.shape[1])
    if _activation(dense1) == "linear":
        if rest and isinstance(rest[0], layers.BatchNormalization):
            norm = rest.pop(0)
            gamma = norm.gamma.numpy() if norm.scale else np.ones(kernel.shape[1])
            beta = norm.beta.numpy() if norm.center else np.zeros(kernel.shape[1])
            scale = gamma / np.sqrt(norm.moving_variance.numpy().astype(np.float64) + norm.epsilon)
            kernel, bias = kernel * scale, (bias - norm.moving_mean.numpy()) * scale + beta
        relu = take(layers.Activation, "Activation('relu')")
        if _activation(relu) != "relu" or relu.name != EMBEDDING:
            raise UnsupportedHead(f"{model.name}: expected the ReLU layer {EMBEDDING!r}, found {relu.name!r}")
    elif _activation(dense1) != "relu" or dense1.name != EMBEDDING:
        raise UnsupportedHead(f"{model.name}: expected dense {EMBEDDING!r} with a ReLU, found {dense1.name!r}")
    dense2 = take(layers.Dense, "the output Dense")
    if _activation(dense2) != "softmax" or rest:
        raise UnsupportedHead(f"{model.name}: expected a softmax Dense as the last layer")
    return Head(
        layer=layer_name,
        embedding=EMBEDDING,
        pool=pool,
        dense1_kernel=kernel.astype(np.float32),
        dense1_bias=bias.astype(np.float32),
        dense2_kernel=dense2.kernel.numpy().astype(np.float32),
        dense2_bias=dense2.bias.numpy().astype(np.float32),
    )


def tape_gradient(model: keras.Model, images: np.ndarray, class_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the conv layer's activations, d logit / d activations) by tf.GradientTape on the Keras model itself:
    the model is cut at the conv layer, and its own layers above it are applied to a watched copy of the
    activations; the logit is the last dense layer's kernel and bias applied to its input, before the softmax."""
    head_layer_objects = head_layers(model)
    *upper, last = head_layer_objects
    conv = keras.Model(model.inputs[0], model.get_layer(feature_layers(model)[-1]).output)
    activations = conv(images, training=False)
    with tf.GradientTape() as tape:
        tape.watch(activations)
        x = activations
        for layer in upper:
            x = layer(x, training=False)
        logits = tf.matmul(x, last.kernel) + last.bias
        chosen = tf.gather(logits, tf.constant(class_ids), axis=1, batch_dims=1)
    gradient = tape.gradient(chosen, activations)
    return activations.numpy(), gradient.numpy()


def check(model: keras.Model, head: Head, outputs: dict[str, np.ndarray], images: np.ndarray) -> HeadCheck:
    """The head against the ONNX graph's own `outputs` for `images` (conv activations, embedding,
    probabilities) and the closed-form gradient against TensorFlow's; raises ValueError beyond the gates."""
    features, embedding, probabilities = outputs[head.layer], outputs[head.embedding], outputs["probabilities"]
    recomputed, logits = head.forward(features)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    softmax = shifted / shifted.sum(axis=1, keepdims=True)
    embedding_diff = float(np.max(np.abs(recomputed - embedding)))
    probabilities_diff = float(np.max(np.abs(softmax - probabilities)))
    class_ids = probabilities.argmax(axis=1)
    _, want = tape_gradient(model, images, class_ids)
    got = head.logit_gradient(features, embedding, class_ids)
    gradient_diff = float(np.max(np.abs(got - want)))
    result = HeadCheck(len(images), embedding_diff, probabilities_diff, gradient_diff, float(np.max(np.abs(want))))
    if embedding_diff > HEAD_ATOL or probabilities_diff > HEAD_ATOL or gradient_diff > GRADIENT_ATOL:
        raise ValueError(f"the exported head does not reproduce the model: {result}")
    return result
