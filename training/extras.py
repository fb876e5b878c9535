"""The files the export writes beside the graphs for explanations and the out-of-distribution flag:
model.head.npz (training/explain.py: the layers above the last conv layer, for exact Grad-CAM) and
model.ood.npz (training/ood.py: the Gaussians and the threshold). Each is made from the exported graphs'
own outputs, checked, and listed in the card with its SHA-256 (the card's `explain` and `ood` entries)."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import keras
import numpy as np

from training import explain, export, ood
from training.data import Dataset

HEAD_FILE = "model.head.npz"
OOD_FILE = "model.ood.npz"
HEAD_CHECK_IMAGES = 100


def to_tensor(images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) / 255.0)[..., None]


class Extras:
    """export.export's `extras` callback; after the export, `entries` holds the card's entries for the files
    made ({"explain": {...}, "ood": {...}}, each with its file name; card.build adds the SHA-256)."""

    def __init__(self, model: keras.Model, dataset: Dataset, check_images: np.ndarray) -> None:
        self.model, self.dataset, self.check_images = model, dataset, check_images[:HEAD_CHECK_IMAGES]
        self.entries: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []

    def __call__(self, full: bytes, lean: bytes) -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        try:
            head = explain.head_of(self.model)
        except explain.UnsupportedHead as exc:
            self.notes.append(f"no Grad-CAM head ({exc}); occlusion explanations only")
        else:
            outputs = export.graph_outputs(full, self.check_images, [export.PROBABILITIES, head.layer, head.embedding])
            checked = explain.check(self.model, head, outputs, self.check_images)
            files[HEAD_FILE] = head.to_bytes()
            self.entries["explain"] = {
                "file": HEAD_FILE,
                "layer": head.layer,
                "embedding": head.embedding,
                "pool": head.pool,
                "score": "logit",
                "description": "the layers above the last conv layer (batch norm folded): Grad-CAM's gradient "
                "in closed form from the graph's own outputs",
                "check": asdict(checked),
            }
            self.notes.append(
                f"{HEAD_FILE}: Grad-CAM on {head.layer}; closed-form gradient vs tf.GradientTape on "
                f"{checked.samples} images: max |diff| {checked.gradient_max_abs_diff:.1e}"
            )
        start = time.perf_counter()
        train = export.graph_outputs(lean, to_tensor(self.dataset.train.images), [export.EMBEDDING])
        validation = export.graph_outputs(lean, to_tensor(self.dataset.validation.images), [export.EMBEDDING])
        fitted = ood.fit(
            train[export.EMBEDDING],
            self.dataset.train.labels,
            validation[export.EMBEDDING],
            classes=int(self.model.output.shape[-1]),
        )
        files[OOD_FILE] = fitted.model.to_bytes()
        self.entries["ood"] = {
            "file": OOD_FILE,
            "output": export.EMBEDDING,
            "method": "class-conditional Gaussians with a shared covariance on the square root of the embedding; "
            "the score is the Mahalanobis distance to the nearest class mean",
            "transform": fitted.model.transform,
            "threshold": fitted.model.threshold,
            "validation_tpr": fitted.model.validation_tpr,
            "validation_pass_rate": fitted.validation_pass_rate,
            "train_images": fitted.train_images,
            "validation_images": fitted.validation_images,
        }
        self.notes.append(
            f"{OOD_FILE}: fitted on {fitted.train_images} training images in {time.perf_counter() - start:.0f} s; "
            f"threshold {fitted.model.threshold:.3f} passes {fitted.validation_pass_rate:.2%} of "
            f"{fitted.validation_images} validation images"
        )
        return files
