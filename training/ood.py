"""Fit the out-of-distribution score's parameters at export (model.ood.npz): numpy only.

Class-conditional Gaussians with one shared covariance (Lee et al. 2018, "A simple unified framework for
detecting out-of-distribution samples and adversarial attacks") on the square root of the embedding of
the model's own 55,000 training images (the ones it was fitted on; its 5,000 validation images are held
out), computed with onnxruntime on the exported graph as the server computes it. The square root: the
embedding is a ReLU's output, non-negative with a long right tail and many exact zeros, which one
Gaussian per class describes badly; the square root (the variance-stabilising transform of counts) makes
each unit's distribution far more symmetric. The threshold is the validation images' 95th percentile
score, so that 95 % of in-distribution images pass. service/ood.py computes the score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.ood import OodModel

TRANSFORM = "sqrt"
VALIDATION_TPR = 0.95
# A ridge on the shared covariance, relative to its mean variance: keeps the inverse finite if a unit of
# the embedding never fires (none does in the committed model, whose smallest eigenvalue is 1 % of the mean).
RIDGE = 1e-6


@dataclass(frozen=True)
class Fit:
    model: OodModel
    train_images: int
    validation_images: int
    validation_pass_rate: float  # exactly what the threshold was chosen for, up to ties
    eigenvalue_range: tuple[float, float]  # of the shared covariance, for the record


def transform(embedding: np.ndarray, how: str = TRANSFORM) -> np.ndarray:
    x = np.asarray(embedding, np.float64)
    return np.sqrt(np.maximum(x, 0.0)) if how == "sqrt" else x


def fit(
    train_embedding: np.ndarray,
    train_labels: np.ndarray,
    validation_embedding: np.ndarray,
    classes: int,
    how: str = TRANSFORM,
    tpr: float = VALIDATION_TPR,
) -> Fit:
    """Means per class and the shared (pooled within-class) covariance of the transformed training
    embeddings; the threshold from the validation embeddings' scores."""
    x = transform(train_embedding, how)
    labels = np.asarray(train_labels)
    missing = sorted(set(range(classes)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"no training images of class(es) {missing}")
    means = np.stack([x[labels == c].mean(axis=0) for c in range(classes)])
    centred = x - means[labels]
    covariance = centred.T @ centred / len(x)
    covariance += RIDGE * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    eigenvalues = np.linalg.eigvalsh(covariance)
    model = OodModel.from_parameters(means, covariance, np.inf, how, tpr)
    scores = model.score(validation_embedding)
    threshold = float(np.quantile(scores.astype(np.float64), tpr))
    model = model.with_threshold(threshold, tpr)
    return Fit(
        model,
        len(x),
        len(scores),
        float(np.mean(model.passes(scores))),
        (float(eigenvalues[0]), float(eigenvalues[-1])),
    )
