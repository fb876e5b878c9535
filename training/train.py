"""Fit one architecture on the training split, choosing the checkpoint on the validation split."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from training import CHECKPOINTS, OPTIMIZERS, SCHEDULES, architectures  # noqa: E402
from training.data import Dataset  # noqa: E402


def keras_weight_decay(decay_per_step: float, learning_rate: float) -> float:
    """Keras 3's optimisers multiply `weight_decay` by the learning rate: each step multiplies every
    weight by (1 − lr_t · weight_decay). To remove the fraction `decay_per_step` of each weight per step
    at the peak learning rate, pass weight_decay = decay_per_step / learning_rate (the decay then follows
    the learning-rate schedule, as in decoupled weight decay). The committed recipe's weight_decay 1e-4 at
    lr 2e-3 is 2e-7 per step: inert."""
    return decay_per_step / learning_rate


@dataclass
class TrainConfig:
    """One training recipe. The defaults are the first default model's `bn-cnn` recipe
    (models/fashion-mnist-cnn/1), except that shifts are now drawn per image (they were one offset per batch:
    a bug). The current default model's recipe is the named recipe `fashion-mnist-cnn` (training/recipes.py)."""

    arch: str = architectures.DEFAULT_ARCH
    epochs: int = 15
    batch_size: int = 128
    seed: int = 0  # the weights' initialisation, the shuffling and the augmentation
    # The validation split's own seed, fixed so that runs with different seeds are compared on the same
    # 5,000 images (paired comparisons). Records without it used `seed` for both.
    split_seed: int = 0
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4  # Keras's coefficient, multiplied by the learning rate; see keras_weight_decay
    # The decay you mean: the fraction of each weight removed per step at the peak learning rate. When
    # set, it replaces `weight_decay` (weight_decay = weight_decay_per_step / learning_rate).
    weight_decay_per_step: float | None = None
    warmup_epochs: int = 1
    schedule: str = "warmup-cosine"  # or "constant" (the seed documents' Adam at a fixed rate)
    augment: bool = True
    max_shift_px: int = 1  # 2 px: validation 93.0%, 1 px: 93.8% (same recipe, keras on the lent GPU)
    horizontal_flip: bool = True
    random_erasing: float = 0.0  # probability per image of erasing one random rectangle (noise-filled)
    label_smoothing: float = 0.0
    ema_momentum: float | None = None  # average the weights (optimizer use_ema); validate and keep the average
    checkpoint: str = "best-val-accuracy"  # which epoch's weights are kept: or "best-val-loss", "last"
    early_stopping_patience: int | None = None  # stop after this many epochs without a better checkpoint score
    validation_size: int = 5_000
    train_limit: int | None = None  # use only the first N training images (tests, quick runs)
    optimizer: str = field(default="AdamW")
    recipe: str | None = None  # the named recipe (training/recipes.py) this config came from, if any

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.schedule, SCHEDULES, "schedule"),
            (self.checkpoint, CHECKPOINTS, "checkpoint"),
            (self.optimizer, OPTIMIZERS, "optimizer"),
        ):
            if value not in allowed:
                raise ValueError(f"{what} {value!r}: choose from {', '.join(allowed)}")
        if not 0.0 <= self.random_erasing <= 1.0 or not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("random_erasing must be in [0, 1] and label_smoothing in [0, 1)")

    def effective_weight_decay(self) -> float:
        """The `weight_decay` Keras is given (0 for Adam, which has none)."""
        if self.optimizer == "Adam":
            return 0.0
        if self.weight_decay_per_step is not None:
            return keras_weight_decay(self.weight_decay_per_step, self.learning_rate)
        return self.weight_decay

    def augmentation(self) -> dict[str, object]:
        if not self.augment:
            return {"enabled": False}
        return {
            "enabled": True,
            "horizontal_flip": self.horizontal_flip,
            "max_shift_px": self.max_shift_px,
            "shift": "per image",
            "random_erasing": self.random_erasing,
        }


@dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]
    best_epoch: int
    seconds: float


def to_tensor(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] → float32 [N, 28, 28, 1] in [0, 1]: the model's input contract."""
    return (images.astype(np.float32) / 255.0)[..., None]


def shift_per_image(images: tf.Tensor, max_shift_px: int) -> tf.Tensor:
    """Shift each image of a [N, H, W, C] batch by its own random offset in [-max, max] px on each axis,
    zero-filled (the background is black). (`tf.image.random_crop` on the 4-D batch draws one crop for
    the whole batch: every image moved the same way.)"""
    pad = max_shift_px
    if not pad:
        return images
    shape = tf.shape(images)
    n, h, w = shape[0], shape[1], shape[2]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    dy = tf.random.uniform([n], 0, 2 * pad + 1, dtype=tf.int32)
    dx = tf.random.uniform([n], 0, 2 * pad + 1, dtype=tf.int32)
    rows = dy[:, None] + tf.range(h)[None, :]  # [N, H]
    cols = dx[:, None] + tf.range(w)[None, :]  # [N, W]
    images = tf.gather(padded, rows, axis=1, batch_dims=1)  # [N, H, W + 2 pad, C]
    return tf.gather(images, cols, axis=2, batch_dims=1)  # [N, H, W, C]


def erase_per_image(
    images: tf.Tensor, probability: float, area: tuple[float, float] = (0.02, 0.25), aspect: float = 3.0
) -> tf.Tensor:
    """Random erasing (Zhong et al. 2017), per image: with `probability`, one rectangle covering `area`
    of the image, aspect ratio in [1/aspect, aspect], is filled with uniform noise in [0, 1]."""
    if not probability:
        return images
    shape = tf.shape(images)
    n, h, w = shape[0], shape[1], shape[2]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    target = tf.random.uniform([n], area[0], area[1]) * hf * wf
    ratio = tf.exp(tf.random.uniform([n], -np.log(aspect), np.log(aspect)))
    eh = tf.clip_by_value(tf.round(tf.sqrt(target * ratio)), 1.0, hf)
    ew = tf.clip_by_value(tf.round(tf.sqrt(target / ratio)), 1.0, wf)
    y0 = tf.floor(tf.random.uniform([n]) * (hf - eh + 1.0))
    x0 = tf.floor(tf.random.uniform([n]) * (wf - ew + 1.0))
    ys = tf.range(hf)[None, :]
    xs = tf.range(wf)[None, :]
    in_rows = (ys >= y0[:, None]) & (ys < (y0 + eh)[:, None])  # [N, H]
    in_cols = (xs >= x0[:, None]) & (xs < (x0 + ew)[:, None])  # [N, W]
    chosen = tf.random.uniform([n]) < probability
    mask = in_rows[:, :, None] & in_cols[:, None, :] & chosen[:, None, None]  # [N, H, W]
    noise = tf.random.uniform(tf.shape(images), dtype=images.dtype)
    return tf.where(mask[..., None], noise, images)


def _dataset(x: np.ndarray, y: np.ndarray, cfg: TrainConfig, training: bool) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        ds = ds.shuffle(len(x), seed=cfg.seed, reshuffle_each_iteration=True)
    ds = ds.batch(cfg.batch_size)
    if training and cfg.augment:

        def augment(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            if cfg.horizontal_flip:
                images = tf.image.random_flip_left_right(images)  # per image on a 4-D batch
            images = shift_per_image(images, cfg.max_shift_px)
            images = erase_per_image(images, cfg.random_erasing)
            return images, labels

        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    if cfg.label_smoothing:
        ds = ds.map(lambda images, labels: (images, tf.one_hot(tf.cast(labels, tf.int32), architectures.NUM_CLASSES)))
    return ds.prefetch(tf.data.AUTOTUNE)


class _KeepBest(keras.callbacks.Callback):
    """Remember the weights of the checkpoint epoch (by validation accuracy, validation loss, or the
    last; never test data) and stop early after `patience` epochs without a better score. With weight
    averaging, `keras.callbacks.SwapEMAWeights(swap_on_epoch=True)` runs before this, so the weights
    validated and kept are the averaged ones."""

    def __init__(self, checkpoint: str = "best-val-accuracy", patience: int | None = None) -> None:
        super().__init__()
        self.checkpoint, self.patience = checkpoint, patience
        self.best = -np.inf
        self.best_epoch = 0
        self.weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        if self.checkpoint == "best-val-loss":
            score = -float(logs.get("val_loss", np.inf))
        elif self.checkpoint == "best-val-accuracy":
            score = float(logs.get("val_accuracy", -1.0))
        else:
            score = float(epoch)
        if score > self.best:
            self.best, self.best_epoch, self.weights = score, epoch + 1, self.model.get_weights()
        elif self.patience is not None and epoch + 1 - self.best_epoch >= self.patience:
            self.model.stop_training = True


def _schedule(cfg: TrainConfig, steps_per_epoch: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    if cfg.schedule == "constant":
        return cfg.learning_rate
    steps = steps_per_epoch * cfg.epochs
    warmup = steps_per_epoch * min(cfg.warmup_epochs, cfg.epochs - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg.learning_rate / 10,
        decay_steps=max(steps - warmup, 1),
        warmup_target=cfg.learning_rate if warmup else None,
        warmup_steps=warmup,
    )


def train(dataset: Dataset, cfg: TrainConfig, verbose: int = 1) -> TrainResult:
    keras.utils.set_random_seed(cfg.seed)
    x_train, y_train = to_tensor(dataset.train.images), dataset.train.labels
    if cfg.train_limit:
        x_train, y_train = x_train[: cfg.train_limit], y_train[: cfg.train_limit]
    x_val, y_val = to_tensor(dataset.validation.images), dataset.validation.labels

    model = architectures.build(cfg.arch)
    schedule = _schedule(cfg, int(np.ceil(len(x_train) / cfg.batch_size)))
    ema = {"use_ema": True, "ema_momentum": cfg.ema_momentum} if cfg.ema_momentum is not None else {}
    if cfg.optimizer == "Adam":
        optimizer: keras.optimizers.Optimizer = keras.optimizers.Adam(learning_rate=schedule, **ema)
    else:
        optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=cfg.effective_weight_decay(), **ema)
    loss: str | keras.losses.Loss = "sparse_categorical_crossentropy"
    if cfg.label_smoothing:  # Keras 3's sparse loss has no label smoothing: one-hot labels instead
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing)
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    keep_best = _KeepBest(cfg.checkpoint, cfg.early_stopping_patience)
    callbacks: list[keras.callbacks.Callback] = [keep_best]
    if cfg.ema_momentum is not None:
        callbacks.insert(0, keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    start = time.perf_counter()
    fit = model.fit(
        _dataset(x_train, y_train, cfg, training=True),
        validation_data=_dataset(x_val, y_val, cfg, training=False),
        epochs=cfg.epochs,
        callbacks=callbacks,
        shuffle=False,  # the tf.data pipeline shuffles; fit's default shuffle=True would only warn
        verbose=verbose,
    )
    seconds = time.perf_counter() - start
    if keep_best.weights is not None:
        model.set_weights(keep_best.weights)
    history = {k: [float(v) for v in vals] for k, vals in fit.history.items()}
    return TrainResult(model, history, keep_best.best_epoch, seconds)


def save(result: TrainResult, cfg: TrainConfig, folder: Path) -> None:
    """The Keras model and its config and history, so it can be re-exported and explained. The optimiser's
    state is left out (an uncompiled copy is saved; `include_optimizer=False` is ignored by the .keras
    format): Adam's two moments would triple the file, and nothing resumes training from it."""
    folder.mkdir(parents=True, exist_ok=True)
    weights_only = keras.Model.from_config(result.model.get_config())  # uncompiled (clone_model compiles)
    weights_only.set_weights(result.model.get_weights())
    weights_only.save(folder / "model.keras")
    (folder / "training.json").write_text(
        json.dumps(
            {
                "config": asdict(cfg),
                "history": result.history,
                "best_epoch": result.best_epoch,
                "training_seconds": round(result.seconds, 1),
                "parameters": result.model.count_params(),
                "multiply_adds": architectures.multiply_adds(result.model),
            },
            indent=2,
        )
    )


def card_training_record(record: dict) -> dict[str, object]:
    """The card's `training` entry, from a training.json record. Records written before the recipe
    options existed (the committed model's) give the same entry as before; newer ones add every option."""
    cfg = record["config"]
    new = "schedule" in cfg  # written by this version: every option is recorded
    schedule = f"linear warm-up {cfg['warmup_epochs']} epoch(s), then cosine decay"
    if new and cfg["schedule"] == "constant":
        schedule = "constant"
    optimizer: dict[str, object] = {
        "name": cfg["optimizer"],
        "learning_rate": cfg["learning_rate"],
        "weight_decay": cfg["weight_decay"],
        "schedule": schedule,
    }
    augmentation: dict[str, object] = {"enabled": False}
    if cfg["augment"]:
        augmentation = {"enabled": True, "horizontal_flip": cfg["horizontal_flip"], "max_shift_px": cfg["max_shift_px"]}
    entry: dict[str, object] = {"architecture": cfg["arch"]}
    if new:
        entry["recipe"] = cfg["recipe"]
        entry["multiply_adds"] = record.get("multiply_adds")
        wd = 0.0 if cfg["optimizer"] == "Adam" else cfg["weight_decay"]
        if cfg["optimizer"] != "Adam" and cfg["weight_decay_per_step"] is not None:
            wd = keras_weight_decay(cfg["weight_decay_per_step"], cfg["learning_rate"])
        optimizer["weight_decay"] = wd  # Keras's coefficient, multiplied by the learning rate each step
        optimizer["weight_decay_per_step_at_peak_lr"] = wd * cfg["learning_rate"]
        optimizer["weight_averaging_ema_momentum"] = cfg["ema_momentum"]
        if cfg["augment"]:
            augmentation |= {"shift": "per image", "random_erasing": cfg["random_erasing"]}
    entry |= {
        "epochs": cfg["epochs"],
        "best_epoch": record["best_epoch"],
        "batch_size": cfg["batch_size"],
        "seed": cfg["seed"],
        "optimizer": optimizer,
        "augmentation": augmentation,
    }
    if new:
        entry |= {
            "label_smoothing": cfg["label_smoothing"],
            "checkpoint": cfg["checkpoint"],
            "early_stopping_patience": cfg["early_stopping_patience"],
            "epochs_run": len(record["history"].get("loss", [])),
        }
    entry |= {
        "validation": f"{cfg['validation_size']} images carved from the training set "
        + (f"(split seed {cfg['split_seed']})" if "split_seed" in cfg else f"(seed {cfg['seed']})"),
        "train_images": cfg["train_limit"] or 60_000 - cfg["validation_size"],
        "training_seconds": record["training_seconds"],
    }
    return entry
