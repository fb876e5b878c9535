"""Why did the model say that? Attribution maps for one class of one image, framework-free (numpy, Pillow).

Two methods:

* **Grad-CAM** (Selvaraju et al. 2017) on the last conv layer, exactly. The class score is the class's
  *logit* (before the softmax), as Grad-CAM defines it. Above the last conv layer the network is piecewise
  linear (bn-cnn: 2×2 max pooling, flatten, dense, batch norm, ReLU = the `embedding` output, dropout, which
  is the identity at inference, dense, softmax), so the gradient of a logit with respect to that layer's
  activations A is, with no approximation,

      dz_c/dA = route_maxpool( W1 · (W2[:, c] ⊙ 1[e > 0]) )

  where W1 is the first dense layer with its batch norm folded in (W1 · diag(gamma / sqrt(var + eps))), e the
  embedding the graph itself outputs (e > 0 exactly where the ReLU passes its gradient), and route_maxpool
  hands each pooled gradient to the position that won its window (the first maximum, as TensorFlow's
  MaxPoolGrad does; rows and columns the pooling never reads get zero). The head's weights are exported
  beside the ONNX graph (model.head.npz, listed in the card with its SHA-256); the activations A and e come
  from the graph's own outputs. Grad-CAM is then ReLU(sum_k alpha_k A_k), alpha_k the spatial mean of
  dz_c/dA_k, upsampled bilinearly (half-pixel centres) from the layer's 7×7 to the 28×28 input.
  tests/training checks dz_c/dA against TensorFlow's GradientTape on the Keras model.

* **Occlusion** (Zeiler & Fergus 2014): a square patch of background (0) slides over the preprocessed
  input; every occluded copy is scored in one batch, and each pixel's attribution is the mean drop of the
  class's *probability* over the patches that cover it (positive: hiding it lowers the class's probability).

Both maps are [28, 28] float32 in the input's pixel grid. `overlay_png` draws one over the input.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from PIL import Image

SIZE = 28


class Method(StrEnum):
    gradcam = "gradcam"
    layercam = "layercam"
    occlusion = "occlusion"


@dataclass(frozen=True)
class Explanation:
    """One image's attribution map for one class, with the image's prediction."""

    method: Method
    class_id: int
    label: str
    attribution: np.ndarray  # float32 [28, 28]
    prediction: dict[str, Any]  # class scores (service.dataplane.scored), with the OOD fields
    details: dict[str, Any]  # what the map measures: Grad-CAM's layer and target; occlusion's patch, stride

    def body(self) -> dict[str, Any]:
        """The explanation as JSON-ready values (the prediction is written beside it)."""
        return {
            "method": self.method.value,
            "class_id": self.class_id,
            "label": self.label,
            **self.details,
            "shape": list(self.attribution.shape),
            "data": self.attribution.tolist(),
        }


# --------------------------------------------------------------------------------------------- Grad-CAM


@dataclass(frozen=True)
class Head:
    """The layers above the explained conv layer, as plain arrays: `pool`×`pool` max pooling (stride =
    size, no padding; 1 = none), flatten (NHWC order), dense 1 with its batch norm folded in, ReLU (the
    graph's `embedding` output), dense 2 = the logits."""

    layer: str  # the conv layer's output in the graph, e.g. "conv3"
    embedding: str  # the graph output after dense 1's ReLU, e.g. "embedding"
    pool: int
    dense1_kernel: np.ndarray  # float32 [pooled H * W * C, E]
    dense1_bias: np.ndarray  # float32 [E]
    dense2_kernel: np.ndarray  # float32 [E, classes]
    dense2_bias: np.ndarray  # float32 [classes]

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            layer=np.array(self.layer),
            embedding=np.array(self.embedding),
            pool=np.int64(self.pool),
            dense1_kernel=self.dense1_kernel,
            dense1_bias=self.dense1_bias,
            dense2_kernel=self.dense2_kernel,
            dense2_bias=self.dense2_bias,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Head:
        """Raises ValueError for a file that is not one of these."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                head = cls(
                    str(npz["layer"]),
                    str(npz["embedding"]),
                    int(npz["pool"]),
                    np.asarray(npz["dense1_kernel"], np.float32),
                    np.asarray(npz["dense1_bias"], np.float32),
                    np.asarray(npz["dense2_kernel"], np.float32),
                    np.asarray(npz["dense2_bias"], np.float32),
                )
        except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"not an explanation head file ({type(exc).__name__}: {exc})") from None
        w1, w2 = head.dense1_kernel, head.dense2_kernel
        if (
            head.pool < 1
            or w1.ndim != 2
            or w2.ndim != 2
            or head.dense1_bias.shape != (w1.shape[1],)
            or w2.shape[0] != w1.shape[1]
            or head.dense2_bias.shape != (w2.shape[1],)
        ):
            raise ValueError(f"malformed head (pool {head.pool}, dense shapes {w1.shape}, {w2.shape})")
        return head

    @property
    def classes(self) -> int:
        return int(self.dense2_kernel.shape[1])

    def check_features(self, features: np.ndarray) -> None:
        """A [N, H, W, C] map whose pooled size matches dense 1's input; ValueError otherwise."""
        if features.ndim != 4:
            raise ValueError(f"expected [N, H, W, C] activations, got shape {features.shape}")
        _, height, width, channels = features.shape
        pooled = (height // self.pool) * (width // self.pool) * channels
        if pooled != self.dense1_kernel.shape[0]:
            raise ValueError(f"activations {features.shape[1:]} pool to {pooled} values; the head takes "
                             f"{self.dense1_kernel.shape[0]}")  # fmt: skip

    # ------------------------------------------------------------------------------- forward, backward

    def _windows(self, features: np.ndarray) -> np.ndarray:
        """[N, H, W, C] -> [N, H/p, W/p, C, p*p]: each pooling window's values, row-major in the window."""
        n, height, width, channels = features.shape
        p = self.pool
        h, w = height // p, width // p
        cropped = features[:, : h * p, : w * p]
        return cropped.reshape(n, h, p, w, p, channels).transpose(0, 1, 3, 5, 2, 4).reshape(n, h, w, channels, p * p)

    def forward(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(embedding [N, E], logits [N, classes]) from the conv layer's activations: what the graph computes
        above it (tests use it to check the head file against the graph)."""
        self.check_features(features)
        pooled = self._windows(np.asarray(features, np.float32)).max(axis=-1).reshape(len(features), -1)
        embedding = np.maximum(pooled @ self.dense1_kernel + self.dense1_bias, 0.0)
        return embedding, embedding @ self.dense2_kernel + self.dense2_bias

    def logit_gradient(self, features: np.ndarray, embedding: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
        """d logit[class_ids[i]] / d features[i], [N, H, W, C], exact (see the module's doc)."""
        self.check_features(features)
        features = np.asarray(features, np.float32)
        n, height, width, channels = features.shape
        p = self.pool
        h, w = height // p, width // p
        gradient_embedding = self.dense2_kernel[:, np.asarray(class_ids)].T * (np.asarray(embedding) > 0)
        gradient_pooled = (gradient_embedding @ self.dense1_kernel.T).reshape(n, h, w, channels)
        # TensorFlow's MaxPoolGrad: the whole gradient to the window's first maximum (np.argmax's choice too).
        winners = self._windows(features).argmax(axis=-1)
        routed = (np.arange(p * p) == winners[..., None]) * gradient_pooled[..., None]  # [n, h, w, c, p*p]
        gradient = np.zeros_like(features)
        gradient[:, : h * p, : w * p] = (
            routed.reshape(n, h, w, channels, p, p).transpose(0, 1, 4, 2, 5, 3).reshape(n, h * p, w * p, channels)
        )
        return gradient


def upsample(maps: np.ndarray, size: int = SIZE) -> np.ndarray:
    """[N, h, w] -> [N, size, size], bilinear with half-pixel centres and clamped edges (as
    tf.image.resize and Pillow's bilinear do)."""
    n, h, w = maps.shape
    return np.einsum("ih,nhw,jw->nij", _interpolation(h, size), maps, _interpolation(w, size)).astype(np.float32)


def _interpolation(source: int, target: int) -> np.ndarray:
    """[target, source] weights of bilinear interpolation."""
    position = np.clip((np.arange(target) + 0.5) * source / target - 0.5, 0, source - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, source - 1)
    fraction = position - low
    weights = np.zeros((target, source))
    weights[np.arange(target), low] += 1 - fraction
    weights[np.arange(target), high] += fraction
    return weights


def gradcam(head: Head, features: np.ndarray, embedding: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """[N, 28, 28] Grad-CAM maps of `class_ids` (one per image), in logit units, from the graph's outputs
    `head.layer` ([N, H, W, C]) and `head.embedding` ([N, E])."""
    gradient = head.logit_gradient(features, embedding, class_ids)
    weights = gradient.mean(axis=(1, 2))  # alpha_k: [N, C]
    cam = np.maximum(np.einsum("nhwc,nc->nhw", np.asarray(features, np.float32), weights), 0.0)
    return upsample(cam)


def layercam(head: Head, features: np.ndarray, embedding: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """[N, 28, 28] LayerCAM maps (Jiang et al. 2021): ReLU(sum_k ReLU(dz_c/dA_k(i, j)) · A_k(i, j)), the
    same exact gradient as Grad-CAM but weighted at each position instead of averaged over the map. Grad-CAM's
    average gives a channel that fires on the background beside a garment the weight it earns elsewhere; here
    a position counts only where raising its activation raises the class's logit."""
    gradient = head.logit_gradient(features, embedding, class_ids)
    cam = np.einsum("nhwc,nhwc->nhw", np.maximum(gradient, 0.0), np.asarray(features, np.float32))
    return upsample(np.maximum(cam, 0.0))


# The methods computed from the exact gradient at the last conv layer (they need the model's head).
GRADIENT_MAPS = {Method.gradcam: gradcam, Method.layercam: layercam}
GRADIENT_METHODS = tuple(GRADIENT_MAPS)


# -------------------------------------------------------------------------------------------- occlusion

DEFAULT_PATCH = 6
DEFAULT_STRIDE = 2


def occlusion_positions(patch: int, stride: int, size: int = SIZE) -> list[int]:
    """Top (or left) edges of the patches: every `stride` pixels, and the last one flush with the edge so
    that every pixel is covered."""
    if not 1 <= patch <= size or not 1 <= stride <= patch:
        raise ValueError(
            f"patch must be 1-{size} and stride 1-patch (every pixel covered), got patch {patch}, stride {stride}"
        )
    positions = list(range(0, size - patch + 1, stride))
    if positions[-1] != size - patch:
        positions.append(size - patch)
    return positions


def occluded(image: np.ndarray, patch: int, stride: int, baseline: float = 0.0) -> np.ndarray:
    """[28, 28, 1] -> [K, 28, 28, 1]: one copy per patch position (row-major), the patch set to `baseline`."""
    positions = occlusion_positions(patch, stride, image.shape[0])
    copies = np.repeat(np.asarray(image, np.float32)[None], len(positions) ** 2, axis=0)
    for index, (top, left) in enumerate((t, s) for t in positions for s in positions):
        copies[index, top : top + patch, left : left + patch] = baseline
    return copies


def occlusion_map(reference: float, scores: np.ndarray, patch: int, stride: int, size: int = SIZE) -> np.ndarray:
    """[size, size]: the mean of `reference - scores[k]` over the patches k covering each pixel (scores in
    the order of `occluded`)."""
    positions = occlusion_positions(patch, stride, size)
    drops = (reference - np.asarray(scores, np.float64)).reshape(len(positions), len(positions))
    total, count = np.zeros((size, size)), np.zeros((size, size))
    for i, top in enumerate(positions):
        for j, left in enumerate(positions):
            total[top : top + patch, left : left + patch] += drops[i, j]
            count[top : top + patch, left : left + patch] += 1
    return (total / count).astype(np.float32)


# ------------------------------------------------------------------------------------------ pictures

OVERLAY_SCALE = 8  # 28 px -> 224 px
# A perceptually ordered dark-to-bright ramp (black, purple, red, orange, yellow, white): where the heat goes.
_RAMP = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]],
    np.float64,
)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB [..., 3] float in [0, 255] along the ramp."""
    position = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.minimum(np.floor(position).astype(int), len(_RAMP) - 2)
    fraction = (position - low)[..., None]
    return _RAMP[low] * (1 - fraction) + _RAMP[low + 1] * fraction  # type: ignore[no-any-return]


def normalised(attribution: np.ndarray) -> np.ndarray:
    """The positive part of a map scaled to [0, 1] by its maximum (all zeros when nothing is positive)."""
    positive = np.maximum(np.nan_to_num(np.asarray(attribution, np.float64)), 0.0)
    top = positive.max() if positive.size else 0.0
    return positive / top if top > 0 else positive


def overlay(tensor: np.ndarray, attribution: np.ndarray, scale: int = OVERLAY_SCALE) -> np.ndarray:
    """uint8 RGB [28 * scale, 28 * scale, 3]: the grey input with the map's positive part as heat on top,
    more opaque where the attribution is higher."""
    pixels = np.asarray(tensor, np.float64).reshape(SIZE, SIZE)
    heat = normalised(np.asarray(attribution).reshape(SIZE, SIZE))
    grey = np.repeat(np.clip(pixels, 0, 1)[..., None] * 255.0, 3, axis=-1)
    alpha = (0.75 * heat)[..., None]
    rgb = grey * (1 - alpha) + heat_colours(heat) * alpha
    rgb = np.rint(rgb).astype(np.uint8)
    return np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)


def overlay_png(tensor: np.ndarray, attribution: np.ndarray, scale: int = OVERLAY_SCALE) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(overlay(tensor, attribution, scale)).save(buffer, format="PNG")
    return buffer.getvalue()
