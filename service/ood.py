"""Is this input like anything the model was trained on? The out-of-distribution score of every prediction.

Framework-free numpy. At export (training/ood.py) one Gaussian per class with a covariance shared by all
classes is fitted to the square roots of the training images' embeddings (the penultimate dense layer,
after its ReLU: non-negative and right-skewed, which a square root makes far closer to Gaussian); the
parameters are stored with the model version in a small .npz that its card lists with its SHA-256.

A prediction's `ood_score` is the Mahalanobis distance from its image's transformed embedding to the
nearest class mean: sqrt(min_c (x - mu_c)^T Sigma^-1 (x - mu_c)), computed as the Euclidean distance after
whitening (x L, Sigma^-1 = L L^T). `in_distribution` is `ood_score <= threshold`, the threshold being the
score that 95 % of the validation images (carved from the training set, never fitted) stay under.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

TRANSFORMS = ("sqrt", "identity")
# OpenBLAS multiplies on the calling thread while M x N x K <= 65536 x 4 (its GEMM_MULTITHREAD_THRESHOLD): 16 rows
# of a 128-wide embedding by the 128 x 128 whitening matrix.
ROWS_PER_PRODUCT = 16


@dataclass(frozen=True)
class OodModel:
    """The fitted parameters: the embedding transform, the whitening matrix L (Sigma^-1 = L L^T), the class
    means already whitened, and the threshold with the fraction of validation images under it."""

    transform: str
    whitening: np.ndarray  # float32 [D, D]
    whitened_means: np.ndarray  # float32 [classes, D]: mu_c L
    threshold: float
    validation_tpr: float

    @classmethod
    def from_parameters(
        cls, means: np.ndarray, covariance: np.ndarray, threshold: float, transform: str, validation_tpr: float
    ) -> OodModel:
        if transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {transform!r}; known: {', '.join(TRANSFORMS)}")
        # Cholesky factor of the precision: x Sigma^-1 x^T = |x L|^2.
        whitening = np.linalg.cholesky(np.linalg.inv(np.asarray(covariance, np.float64)))
        return cls(
            transform,
            whitening.astype(np.float32),
            (np.asarray(means, np.float64) @ whitening).astype(np.float32),
            float(threshold),
            float(validation_tpr),
        )

    def with_threshold(self, threshold: float, validation_tpr: float) -> OodModel:
        return OodModel(self.transform, self.whitening, self.whitened_means, float(threshold), float(validation_tpr))

    # ----------------------------------------------------------------------------------------- files

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            transform=np.array(self.transform),
            whitening=self.whitening,
            whitened_means=self.whitened_means,
            threshold=np.float64(self.threshold),
            validation_tpr=np.float64(self.validation_tpr),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> OodModel:
        """Raises ValueError for a file that is not one of these."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                model = cls(
                    str(npz["transform"]),
                    np.asarray(npz["whitening"], np.float32),
                    np.asarray(npz["whitened_means"], np.float32),
                    float(npz["threshold"]),
                    float(npz["validation_tpr"]),
                )
        except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"not an out-of-distribution parameter file ({type(exc).__name__}: {exc})") from None
        dims = model.whitening.shape
        if model.transform not in TRANSFORMS or len(dims) != 2 or dims[0] != dims[1]:
            raise ValueError(f"malformed parameters (transform {model.transform!r}, whitening {dims})")
        if model.whitened_means.ndim != 2 or model.whitened_means.shape[1] != dims[1]:
            raise ValueError(f"class means {model.whitened_means.shape} do not match whitening {dims}")
        return model

    @property
    def dimensions(self) -> int:
        return int(self.whitening.shape[0])

    # ---------------------------------------------------------------------------------------- scores

    def score(self, embedding: np.ndarray) -> np.ndarray:
        """float32 [N, D] embeddings -> [N] distances to the nearest class (0 = at a class mean)."""
        x = np.asarray(embedding, np.float32)
        if self.transform == "sqrt":
            x = np.sqrt(np.maximum(x, 0.0, dtype=np.float32))
        if not len(x):
            return np.zeros(0, np.float32)
        if len(x) <= ROWS_PER_PRODUCT:  # a request's few rows (every /v1/predict): the shortest path
            differences = (x @ self.whitening)[:, None, :] - self.whitened_means
            return np.sqrt(np.einsum("ncd,ncd->nc", differences, differences).min(axis=1))  # type: ignore[no-any-return]
        squared = np.empty((len(x), len(self.whitened_means)), np.float32)
        # In slices of ROWS_PER_PRODUCT rows: OpenBLAS runs a product that small on the calling thread, where a
        # bigger one wakes its own thread pool, which on a busy machine costs far more CPU than the product
        # (measured: 256 rows, 1.9 ms of CPU against 0.36 ms on one thread).
        for start in range(0, len(x), ROWS_PER_PRODUCT):
            whitened = x[start : start + ROWS_PER_PRODUCT] @ self.whitening
            differences = whitened[:, None, :] - self.whitened_means[None]
            squared[start : start + ROWS_PER_PRODUCT] = np.einsum("ncd,ncd->nc", differences, differences)
        return np.sqrt(squared.min(axis=1))  # type: ignore[no-any-return]

    def passes(self, scores: np.ndarray) -> np.ndarray:
        """[N] bool: in distribution (at most the threshold)."""
        return np.asarray(scores) <= self.threshold

    def fields(self, embedding: np.ndarray) -> list[dict[str, Any]]:
        """Per row: {"ood_score": float, "in_distribution": bool}, as every prediction carries them."""
        return self.fields_of(self.score(embedding))

    def fields_of(self, scores: np.ndarray) -> list[dict[str, Any]]:
        """The same from scores already computed (Model.run's `ood_score`, once per batch)."""
        threshold = self.threshold
        # float32 -> Python float is exact, as the probabilities are written.
        return [{"ood_score": score, "in_distribution": score <= threshold} for score in scores.tolist()]
