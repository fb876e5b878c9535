"""The networks, by name. Each names its conv layers `conv*` and its penultimate dense layer
`embedding`, so the export can expose their activations."""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers

from training import ARCHITECTURE_NAMES, DEFAULT_ARCH

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def mlp() -> keras.Model:
    """The seed's baseline: Flatten → Dense(128, relu) → Dense(10, softmax)."""
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = layers.Flatten(name="flatten")(inputs)
    x = layers.Dense(128, activation="relu", name="embedding")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="mlp")


def seed_cnn() -> keras.Model:
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, activation="relu", name="embedding")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="seed_cnn")


def double_conv() -> keras.Model:
    """The Polish seed's best variant: two convs before each pooling, dropout after each."""
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Dropout(0.25, name="drop1")(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu", name="conv3")(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu", name="conv4")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Dropout(0.25, name="drop2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, activation="relu", name="embedding")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="double_conv")


def _conv_bn(x: keras.KerasTensor, filters: int, name: str) -> keras.KerasTensor:
    # The exposed feature map is the post-activation output, so the ReLU carries the conv's name.
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=name)(x)


def bn_cnn() -> keras.Model:
    """Our default: three batch-normalised conv stages (32 at 28², 64 at 14², 96 at 7²), a
    pooled 3×3×96 map into a 128-wide embedding. Channel counts were chosen by measured training
    speed on 2 CPU cores (128 channels at 7² trained 2× slower). Almost no dropout: with flips,
    shifts and a 15-epoch budget, dropout 0.1/0.3/0.3 underfitted (train 91.3% < validation 92.8%);
    the recipe sweep (training/sweep.py) found less dropout and 1-px shifts better on validation."""
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = _conv_bn(inputs, 32, "conv1")
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = _conv_bn(x, 64, "conv2")
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = _conv_bn(x, 96, "conv3")
    x = layers.MaxPooling2D(2, name="pool3")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, use_bias=False, name="embedding_dense")(x)
    x = layers.BatchNormalization(name="embedding_bn")(x)
    x = layers.Activation("relu", name="embedding")(x)
    x = layers.Dropout(0.1, name="drop4")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="bn_cnn")


ARCHITECTURES: dict[str, Callable[[], keras.Model]] = dict(
    zip(ARCHITECTURE_NAMES, (mlp, seed_cnn, double_conv, bn_cnn), strict=True)
)
assert DEFAULT_ARCH in ARCHITECTURES


def build(name: str) -> keras.Model:
    try:
        return ARCHITECTURES[name]()
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(ARCHITECTURES)}") from None


def feature_layers(model: keras.Model) -> list[str]:
    """The conv feature maps to export, in order: the layers named conv1, conv2, …"""
    return [layer.name for layer in model.layers if layer.name.startswith("conv") and "_" not in layer.name]
