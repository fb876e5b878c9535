"""The explanation math (service/explain.py) and the out-of-distribution score (service/ood.py, training/ood.py),
on small arrays and on the committed model's files."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from service import explain
from service.explain import Head
from service.ood import OodModel
from tests.support import ROOT
from training import ood, ood_sets

FOLDER = ROOT / "models" / "fashion-mnist-cnn" / "1"


@pytest.fixture(scope="module")
def head() -> Head:
    return Head.from_bytes((FOLDER / "model.head.npz").read_bytes())


@pytest.fixture(scope="module")
def graph(test_split) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """model.onnx's outputs for 200 test images."""
    session = ort.InferenceSession(str(FOLDER / "model.onnx"), providers=["CPUExecutionProvider"])
    x = (test_split.images[:200].astype(np.float32) / 255.0)[..., None]
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"image": x}), strict=True)) | {"image": x}


# ---------------------------------------------------------------------------------------------- Grad-CAM


def test_the_card_lists_the_head_and_ood_files_with_their_sha256() -> None:
    card = json.loads((FOLDER / "card.json").read_text())
    for key, name in (("explain", "model.head.npz"), ("ood", "model.ood.npz")):
        assert card[key]["file"] == name
        assert hashlib.sha256((FOLDER / name).read_bytes()).hexdigest() == card[key]["sha256"]
    assert card["explain"]["layer"] == "conv3" and card["explain"]["score"] == "logit"
    assert card["explain"]["check"]["gradient_max_abs_diff"] <= 1e-4
    assert card["ood"]["train_images"] == 55_000 and card["ood"]["validation_images"] == 5_000


def test_the_head_reproduces_the_graph_above_conv3(head: Head, graph: dict[str, np.ndarray]) -> None:
    """Pooling, dense + folded batch norm, ReLU and the last dense, in numpy, from the graph's conv3: the
    graph's own embedding and (after a softmax) probabilities."""
    embedding, logits = head.forward(graph["conv3"])
    np.testing.assert_allclose(embedding, graph["embedding"], atol=1e-4)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(shifted / shifted.sum(axis=1, keepdims=True), graph["probabilities"], atol=1e-5)


def _logits64(head: Head, features: np.ndarray) -> np.ndarray:
    """The head's logits in float64 (for finite differences)."""
    n, h, w, c = features.shape
    p = head.pool
    pooled = features[:, : h // p * p, : w // p * p].reshape(n, h // p, p, w // p, p, c).max(axis=(2, 4))
    hidden = np.maximum(pooled.reshape(n, -1) @ head.dense1_kernel.astype(np.float64) + head.dense1_bias, 0)
    return hidden @ head.dense2_kernel.astype(np.float64) + head.dense2_bias  # type: ignore[no-any-return]


def test_the_closed_form_gradient_matches_finite_differences(head: Head, graph: dict[str, np.ndarray]) -> None:
    """Central differences of the float64 head along random directions: a piecewise-linear function, so
    with a step far below the kinks' distances they agree to rounding. The directions move only the positions
    that win their pooling window by a margin: where a window ties (all zeros after the ReLU), the function has
    a kink and no derivative to compare with (test_gradient_goes_to_each_windows_first_maximum covers that)."""
    rng = np.random.default_rng(0)
    features = graph["conv3"][:20].astype(np.float64)
    embedding = graph["embedding"][:20]
    class_ids = graph["probabilities"][:20].argmax(axis=1)
    gradient = head.logit_gradient(features.astype(np.float32), embedding, class_ids).astype(np.float64)
    rows = np.arange(len(features))
    windows = features[:, :6, :6].reshape(20, 3, 2, 3, 2, -1).transpose(0, 1, 3, 5, 2, 4).reshape(20, 3, 3, -1, 4)
    ordered = np.sort(windows, axis=-1)
    clear = (ordered[..., 3] - ordered[..., 2] > 1e-3)[..., None] & (windows == ordered[..., 3:])
    movable = np.zeros_like(features, bool)
    movable[:, :6, :6] = clear.reshape(20, 3, 3, -1, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(20, 6, 6, -1)
    assert movable.sum() > 1000
    for _ in range(5):
        direction = rng.normal(size=features.shape) * movable
        step = 1e-6
        ahead = _logits64(head, features + step * direction)[rows, class_ids]
        behind = _logits64(head, features - step * direction)[rows, class_ids]
        numeric = (ahead - behind) / (2 * step)
        analytic = np.einsum("nhwc,nhwc->n", gradient, direction)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-3, atol=1e-3)


def test_gradient_goes_to_each_windows_first_maximum(head: Head) -> None:
    """Ties (a window of zeros after the ReLU) route the whole gradient to the window's first position, as
    TensorFlow's MaxPoolGrad does; rows and columns the pooling never reads (the 7th) get none."""
    features = np.zeros((1, 7, 7, head.dense1_kernel.shape[0] // 9), np.float32)
    embedding, _ = head.forward(features)
    gradient = head.logit_gradient(features, embedding, np.array([0]))
    assert not gradient[0, 6].any() and not gradient[0, :, 6].any()
    assert not gradient[0, 1::2, :6].any() and not gradient[0, :6, 1::2].any()
    assert gradient[0, 0:6:2, 0:6:2].any()


def test_gradcam_maps(head: Head, graph: dict[str, np.ndarray]) -> None:
    class_ids = graph["probabilities"].argmax(axis=1)
    maps = explain.gradcam(head, graph["conv3"], graph["embedding"], class_ids)
    assert maps.shape == (200, 28, 28) and maps.dtype == np.float32
    assert (maps >= 0).all() and (maps.reshape(200, -1).max(axis=1) > 0).mean() > 0.9
    other = explain.gradcam(head, graph["conv3"], graph["embedding"], (class_ids + 1) % 10)
    assert not np.allclose(maps, other)  # the class matters


def test_layercam_weights_each_position_by_its_own_positive_gradient(head: Head, graph: dict[str, np.ndarray]) -> None:
    class_ids = graph["probabilities"].argmax(axis=1)
    features, embedding = graph["conv3"], graph["embedding"]
    maps = explain.layercam(head, features, embedding, class_ids)
    assert maps.shape == (200, 28, 28) and maps.dtype == np.float32 and (maps >= 0).all()
    gradient = head.logit_gradient(features, embedding, class_ids)
    for i in range(3):  # position by position, channel by channel
        cam = np.zeros(features.shape[1:3])
        for y, x, c in np.ndindex(*features.shape[1:]):
            cam[y, x] += max(gradient[i, y, x, c], 0.0) * features[i, y, x, c]
        np.testing.assert_allclose(maps[i], explain.upsample(cam[None])[0], rtol=1e-4, atol=1e-6)
    # Not Grad-CAM: the spatial average of the gradient would spread weight to positions this leaves dark.
    assert not np.allclose(maps, explain.gradcam(head, features, embedding, class_ids), atol=1e-3)
    assert not np.allclose(maps, explain.layercam(head, features, embedding, (class_ids + 1) % 10))


def test_upsampling_is_pillows_bilinear() -> None:
    maps = np.random.default_rng(1).random((2, 7, 7)).astype(np.float32)
    got = explain.upsample(maps)
    for i in range(2):
        want = np.asarray(Image.fromarray(maps[i], "F").resize((28, 28), Image.Resampling.BILINEAR))
        np.testing.assert_allclose(got[i], want, atol=1e-5)
    constant = explain.upsample(np.full((1, 7, 7), 3.0))
    np.testing.assert_allclose(constant, 3.0, atol=1e-6)


def test_head_files_round_trip_and_bad_ones_are_refused(head: Head) -> None:
    again = Head.from_bytes(head.to_bytes())
    assert again.layer == head.layer and np.array_equal(again.dense1_kernel, head.dense1_kernel)
    with pytest.raises(ValueError, match="not an explanation head file"):
        Head.from_bytes(b"not an npz")
    broken = Head(head.layer, head.embedding, head.pool, head.dense1_kernel, head.dense1_bias[:3], head.dense2_kernel,
                  head.dense2_bias)  # fmt: skip
    with pytest.raises(ValueError, match="malformed head"):
        Head.from_bytes(broken.to_bytes())
    with pytest.raises(ValueError, match="pool to"):
        head.forward(np.zeros((1, 14, 14, 96), np.float32))


# --------------------------------------------------------------------------------------------- occlusion


@pytest.mark.parametrize(("patch", "stride"), [(6, 2), (4, 4), (5, 3), (28, 1), (1, 1), (28, 28)])
def test_occlusion_patches_cover_every_pixel(patch: int, stride: int) -> None:
    positions = explain.occlusion_positions(patch, stride)
    assert positions[0] == 0 and positions[-1] == 28 - patch
    covered = np.zeros(28, int)
    for p in positions:
        covered[p : p + patch] += 1
    assert covered.min() >= 1
    image = np.ones((28, 28, 1), np.float32)
    copies = explain.occluded(image, patch, stride)
    assert copies.shape == (len(positions) ** 2, 28, 28, 1)
    assert all((copy == 0).sum() == patch * patch for copy in copies)


def test_occlusion_map_points_at_what_the_score_depends_on() -> None:
    """A 'model' whose score is the mean of a 6×6 square: the map is highest there and zero far from it."""
    image = np.random.default_rng(2).random((28, 28, 1)).astype(np.float32)
    copies = explain.occluded(image, 4, 2)

    def score(x: np.ndarray) -> np.ndarray:
        return x[..., 10:16, 12:18, 0].mean(axis=(-1, -2))  # type: ignore[no-any-return]

    attribution = explain.occlusion_map(float(score(image)), score(copies), 4, 2)
    assert attribution.shape == (28, 28)
    assert attribution[10:16, 12:18].min() > 0
    assert np.unravel_index(attribution.argmax(), attribution.shape) in {
        (r, c) for r in range(8, 18) for c in range(10, 20)
    }
    assert attribution[:6].max() == 0 and attribution[:, 24:].max() == 0
    for patch, stride in ((0, 1), (4, 5), (29, 1), (4, 0)):
        with pytest.raises(ValueError, match="patch must be 1-28 and stride 1-patch"):
            explain.occlusion_positions(patch, stride)


def test_overlay_is_the_input_where_nothing_is_attributed() -> None:
    image = np.random.default_rng(3).random((28, 28, 1)).astype(np.float32)
    plain = explain.overlay(image, np.zeros((28, 28)))
    assert plain.shape == (224, 224, 3) and plain.dtype == np.uint8
    np.testing.assert_array_equal(plain[::8, ::8, 0], np.rint(image[..., 0] * 255).astype(np.uint8))
    hot = np.zeros((28, 28))
    hot[3, 4] = 2.0
    coloured = explain.overlay(image, hot)
    assert not np.array_equal(coloured[24:32, 32:40], plain[24:32, 32:40])
    np.testing.assert_array_equal(coloured[:16], plain[:16])  # a negative or zero map leaves the rest alone
    png = explain.overlay_png(image, hot)
    assert Image.open(__import__("io").BytesIO(png)).size == (224, 224)


# ---------------------------------------------------------------------------------- out of distribution


def test_the_score_is_the_mahalanobis_distance_to_the_nearest_class() -> None:
    rng = np.random.default_rng(4)
    means = rng.random((3, 5)) * 4
    a = rng.normal(size=(5, 5))
    covariance = a @ a.T + np.eye(5)
    model = OodModel.from_parameters(means, covariance, 2.0, "sqrt", 0.95)
    x = rng.random((50, 5)) * 9
    transformed = np.sqrt(x)
    precision = np.linalg.inv(covariance)
    want = np.sqrt(
        np.min([np.einsum("nd,de,ne->n", transformed - m, precision, transformed - m) for m in means], axis=0)
    )
    np.testing.assert_allclose(model.score(x), want, rtol=1e-4)
    np.testing.assert_array_equal(model.passes(model.score(x)), model.score(x) <= 2.0)
    fields = model.fields(x[:2])
    assert [set(f) for f in fields] == [{"ood_score", "in_distribution"}] * 2
    assert isinstance(fields[0]["in_distribution"], bool) and isinstance(fields[0]["ood_score"], float)


def test_ood_files_round_trip_and_bad_ones_are_refused() -> None:
    model = OodModel.from_parameters(np.zeros((2, 3)), np.eye(3), 1.5, "sqrt", 0.95)
    again = OodModel.from_bytes(model.to_bytes())
    assert again.threshold == 1.5 and again.transform == "sqrt" and np.array_equal(again.whitening, model.whitening)
    with pytest.raises(ValueError, match="not an out-of-distribution parameter file"):
        OodModel.from_bytes(b"PK\x03\x04 nonsense")
    with pytest.raises(ValueError, match="unknown transform"):
        OodModel.from_parameters(np.zeros((2, 3)), np.eye(3), 1.5, "log", 0.95)


def test_fit_chooses_the_threshold_that_95_percent_of_validation_images_pass() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, 4000)
    centres = rng.random((4, 6)) * 5
    embeddings = np.maximum(centres[labels] + rng.normal(size=(4000, 6)), 0)
    validation = np.maximum(centres[rng.integers(0, 4, 1000)] + rng.normal(size=(1000, 6)), 0)
    fitted = ood.fit(embeddings, labels, validation, classes=4)
    assert fitted.validation_pass_rate == pytest.approx(0.95, abs=0.002)
    far = fitted.model.score(np.full((10, 6), 50.0))
    assert (far > fitted.model.threshold).all()
    with pytest.raises(ValueError, match=r"no training images of class\(es\) \[4\]"):
        ood.fit(embeddings, labels, validation, classes=5)


def test_auroc_and_fpr() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(6)
    inside, outside = rng.normal(size=300).round(1), (rng.normal(size=200) + 1).round(1)  # with ties
    labels = np.r_[np.zeros(300), np.ones(200)]
    assert ood_sets.auroc(inside, outside) == pytest.approx(roc_auc_score(labels, np.r_[inside, outside]))
    assert ood_sets.auroc(np.zeros(5), np.ones(5)) == 1.0
    assert ood_sets.fpr_at_tpr(np.arange(100.0), np.array([50.0, 96.0, 200.0])) == pytest.approx(1 / 3)


def test_the_committed_ood_parameters_pass_test_images_and_flag_noise(test_split) -> None:  # type: ignore[no-untyped-def]
    from service import imaging

    model = OodModel.from_bytes((FOLDER / "model.ood.npz").read_bytes())
    session = ort.InferenceSession(str(FOLDER / "model.lean.onnx"), providers=["CPUExecutionProvider"])
    x = (test_split.images[:2000].astype(np.float32) / 255.0)[..., None]
    passed = model.passes(model.score(session.run(["embedding"], {"image": x})[0])).mean()
    assert 0.93 <= passed <= 0.97  # chosen on the validation split for 95 %
    noise = np.stack([imaging.preprocess(data) for data in ood_sets.uniform_noise(200)])
    flagged = 1 - model.passes(model.score(session.run(["embedding"], {"image": noise})[0])).mean()
    assert flagged >= 0.8
