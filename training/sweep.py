"""The recipe sweep behind the default's settings: variants of bn-cnn trained for 15 epochs with
Keras 3 on its torch backend (it ran on a lent GPU, where TensorFlow is not installed), choosing by
VALIDATION accuracy only; the test set is never looked at here.

    KERAS_BACKEND=torch python training/sweep.py base lowdrop lowdrop-shift1 ...

Augmentation is done in numpy here (the tf.data pipeline of train.py needs TensorFlow); the
architecture is rebuilt with knobs. Results are in the README.
"""

import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, ".")
import keras
import numpy as np
from keras import layers

from training.data import load

ds = load(os.environ.get("FASHION_MNIST_DIR"), download=False)
xtr = ds.train.images.astype("float32")[..., None] / 255
ytr = ds.train.labels
xva = ds.validation.images.astype("float32")[..., None] / 255
yva = ds.validation.labels
rng = np.random.default_rng(0)


def augment(x, flip=True, shift=2):
    x = x.copy()
    if flip:
        m = rng.random(len(x)) < 0.5
        x[m] = x[m, :, ::-1]
    if shift:
        p = np.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
        dy = rng.integers(0, 2 * shift + 1, len(x))
        dx = rng.integers(0, 2 * shift + 1, len(x))
        idx_y = dy[:, None] + np.arange(28)[None]
        idx_x = dx[:, None] + np.arange(28)[None]
        x = p[np.arange(len(x))[:, None, None], idx_y[:, :, None], idx_x[:, None, :]]
    return x


def cb(x, f, n):
    x = layers.Conv2D(f, 3, padding="same", use_bias=False, name=n + "_conv")(x)
    x = layers.BatchNormalization()(x)
    return layers.Activation("relu", name=n)(x)


def build(c=(32, 64, 96), d=(0.1, 0.3, 0.3), extra=False):
    i = keras.Input((28, 28, 1))
    x = cb(i, c[0], "conv1")
    x = layers.MaxPooling2D(2)(x)
    x = cb(x, c[1], "conv2")
    if extra:
        x = cb(x, c[1], "conv2b")
    x = layers.MaxPooling2D(2)(x)
    if d[0]:
        x = layers.Dropout(d[0])(x)
    x = cb(x, c[2], "conv3")
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    if d[1]:
        x = layers.Dropout(d[1])(x)
    x = layers.Dense(128, use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    if d[2]:
        x = layers.Dropout(d[2])(x)
    return keras.Model(i, layers.Dense(10, activation="softmax")(x))


def run(name, epochs=15, lr=2e-3, wd=1e-4, flip=True, shift=2, bs=128, **kw):
    keras.utils.set_random_seed(0)
    m = build(**kw)
    steps = int(np.ceil(len(xtr) / bs))
    total = steps * epochs
    warm = steps
    sched = keras.optimizers.schedules.CosineDecay(lr / 10, total - warm, warmup_target=lr, warmup_steps=warm)
    m.compile(
        optimizer=keras.optimizers.AdamW(sched, weight_decay=wd),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    t = time.time()
    hist = []
    for _ in range(epochs):
        m.fit(augment(xtr, flip, shift), ytr, batch_size=bs, epochs=1, verbose=0)
        hist.append(round(float(m.evaluate(xva, yva, verbose=0, batch_size=1000)[1]), 4))
    print(
        json.dumps(
            {
                "name": name,
                "params": m.count_params(),
                "val_last": hist[-1],
                "val_best": max(hist),
                "hist": hist,
                "s": round(time.time() - t),
            }
        ),
        flush=True,
    )


RECIPES: dict[str, dict[str, Any]] = {
    "base": dict(),
    "lowdrop": dict(d=(0.0, 0.2, 0.2)),
    "nodrop": dict(d=(0.0, 0.0, 0.1)),
    "lowdrop-lr3": dict(d=(0.0, 0.2, 0.2), lr=3e-3),
    "lowdrop-noflip": dict(d=(0.0, 0.2, 0.2), flip=False),
    "lowdrop-shift1": dict(d=(0.0, 0.2, 0.2), shift=1),
    "lowdrop-20ep": dict(d=(0.0, 0.2, 0.2), epochs=20),
    "extra": dict(d=(0.0, 0.2, 0.2), extra=True),
    "wide": dict(d=(0.0, 0.2, 0.2), c=(32, 64, 128)),
}
if __name__ == "__main__":
    for name in sys.argv[1:]:
        run(name, **RECIPES[name])
