"""The networks, by name. Each names its conv layers `conv*` and its penultimate dense layer
`embedding`, so the export can expose their activations."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
from keras import layers

from training import ARCHITECTURE_ALIASES, ARCHITECTURE_NAMES, DEFAULT_ARCH

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


def double_conv_same() -> keras.Model:
    """Two *same*-padded convs before each pooling (64, 64 → 128, 128), dropout after each: 1.06 M
    parameters. Formerly called `double-conv` and described as the Polish blog's best network, which it
    is not: the blog padded nothing (see `blog_4conv`). `double-conv` stays as an alias."""
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
    return keras.Model(inputs, outputs, name="double_conv_same")


def _blog(convs: tuple[tuple[int, ...], ...], name: str) -> keras.Model:
    """The Polish blog's convolutional networks, as it built them: 3×3 convs with *valid* padding (no
    padding), each stage's convs followed by 2×2 max pooling and dropout 0.25, then Dense 128 ReLU and a
    10-way softmax. (The blog's own code had two faults, fixed here and in its recipes: its held-out
    images were never divided by 255, and its loss said `from_logits=True` on a softmax output.)"""
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = inputs
    n = 0
    for stage, filters in enumerate(convs, start=1):
        for f in filters:
            n += 1
            x = layers.Conv2D(f, 3, padding="valid", activation="relu", name=f"conv{n}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{stage}")(x)
        x = layers.Dropout(0.25, name=f"drop{stage}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, activation="relu", name="embedding")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def blog_1conv() -> keras.Model:
    """The blog's one-conv network: conv 64 (valid) → pool → dropout 0.25 → Dense 128 → Dense 10."""
    return _blog(((64,),), "blog_1conv")


def blog_2conv() -> keras.Model:
    """The blog's two-conv network: conv 64 → pool → dropout → conv 128 → pool → dropout → Dense 128 →
    Dense 10, all valid padding: 485,514 parameters (the blog says about 486 K)."""
    return _blog(((64,), (128,)), "blog_2conv")


def blog_4conv() -> keras.Model:
    """The blog's four-conv network: conv 64, 64 → pool → dropout → conv 128, 128 → pool → dropout →
    Dense 128 → Dense 10, all valid padding (28 → 26 → 24 → 12 → 10 → 8 → 4)."""
    return _blog(((64, 64), (128, 128)), "blog_4conv")


def _conv_bn(x: keras.KerasTensor, filters: int, name: str) -> keras.KerasTensor:
    # The exposed feature map is the post-activation output, so the ReLU carries the conv's name.
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=name)(x)


def _bn_cnn(channels: tuple[int, int, int], name: str) -> keras.Model:
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = inputs
    for stage, filters in enumerate(channels, start=1):
        x = _conv_bn(x, filters, f"conv{stage}")
        x = layers.MaxPooling2D(2, name=f"pool{stage}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, use_bias=False, name="embedding_dense")(x)
    x = layers.BatchNormalization(name="embedding_bn")(x)
    x = layers.Activation("relu", name="embedding")(x)
    x = layers.Dropout(0.1, name="drop4")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def bn_cnn() -> keras.Model:
    """Our default: three batch-normalised conv stages (32 at 28², 64 at 14², 96 at 7²), a
    pooled 3×3×96 map into a 128-wide embedding. Channel counts were chosen by measured training
    speed on 2 CPU cores (128 channels at 7² trained 2× slower). Almost no dropout: with flips,
    shifts and a 15-epoch budget, dropout 0.1/0.3/0.3 underfitted (train 91.3% < validation 92.8%);
    the recipe sweep (training/sweep.py) found less dropout and 1-px shifts better on validation."""
    return _bn_cnn((32, 64, 96), "bn_cnn")


def bn_cnn_wide() -> keras.Model:
    """bn-cnn with wider stages (40 at 28², 80 at 14², 128 at 7²): 1.6× its multiply-adds, 1.45× its
    parameters; the same head, so Grad-CAM and LayerCAM stay exact on conv3."""
    return _bn_cnn((40, 80, 128), "bn_cnn_wide")


ARCHITECTURES: dict[str, Callable[[], keras.Model]] = dict(
    zip(
        ARCHITECTURE_NAMES,
        (mlp, seed_cnn, double_conv_same, bn_cnn, blog_1conv, blog_2conv, blog_4conv, bn_cnn_wide),
        strict=True,
    )
)
assert DEFAULT_ARCH in ARCHITECTURES
assert all(target in ARCHITECTURES for target in ARCHITECTURE_ALIASES.values())


def build(name: str) -> keras.Model:
    try:
        return ARCHITECTURES[ARCHITECTURE_ALIASES.get(name, name)]()
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(ARCHITECTURES)}") from None


def multiply_adds(model: keras.Model) -> int:
    """Multiply-adds for one image: Conv2D H_out·W_out·k_h·k_w·C_in·C_out (divided by its groups), Dense
    in·out (per position, if its input is not flat). Biases, batch normalisation, activations, pooling
    and dropout are not counted: they are a few per output, against k·k·C_in for a conv."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            k_h, k_w = layer.kernel_size
            c_in = layer.input.shape[-1]
            total += h * w * k_h * k_w * c_in * c_out // layer.groups
        elif isinstance(layer, layers.Dense):
            positions = int(np.prod(layer.input.shape[1:-1], dtype=np.int64))
            total += positions * layer.input.shape[-1] * layer.units
    return int(total)


def feature_layers(model: keras.Model) -> list[str]:
    """The conv feature maps to export, in order: the layers named conv1, conv2, …"""
    return [layer.name for layer in model.layers if layer.name.startswith("conv") and "_" not in layer.name]
