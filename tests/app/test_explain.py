"""Explanations and the out-of-distribution flag through the app: POST /v1/explain (and by model), the OOD
fields of every prediction, and the V2 outputs `ood_score`, `in_distribution`, `gradcam` and `layercam`."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.explain import Head, gradcam, layercam
from service.ood import OodModel
from tests.support import MODEL, VERSION, model_folder, model_version, png_bytes, repository_settings, uint8_input, v2
from training import ood_sets


def _files(data: bytes) -> dict[str, tuple[str, bytes, str]]:
    return {"file": ("x.png", data, "image/png")}


def _noise() -> bytes:
    return ood_sets.uniform_noise(1)[0]


@pytest.fixture(scope="module")
def reference(test_split) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """onnxruntime on the committed graph, and the committed OOD parameters and head, for 5 test images."""
    folder = model_folder()
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    x = (test_split.images[:5].astype(np.float32) / 255.0)[..., None]
    head = Head.from_bytes((folder / "model.head.npz").read_bytes())
    probabilities, features, embedding = session.run(["probabilities", head.layer, "embedding"], {"image": x})
    ood = OodModel.from_bytes((folder / "model.ood.npz").read_bytes())
    return {
        "gradcam": gradcam(head, features, embedding, probabilities.argmax(axis=1)),
        "layercam": layercam(head, features, embedding, probabilities.argmax(axis=1)),
        "layer": np.array(head.layer),
        "ood_score": ood.score(embedding),
        "probabilities": probabilities,
    }


# ------------------------------------------------------------------------------------- OOD fields


def test_every_prediction_carries_the_ood_fields(client: TestClient, test_split, reference) -> None:  # type: ignore[no-untyped-def]
    threshold = client.get(f"/v1/models/{MODEL}").json()["out_of_distribution"]["threshold"]
    for i in range(5):
        body = client.post("/v1/predict", files=_files(png_bytes(test_split.images[i]))).json()
        assert body["ood_score"] == pytest.approx(float(reference["ood_score"][i]), rel=1e-5)
        # 95 % of garments pass by construction; the flag is the score against the model's threshold.
        assert body["in_distribution"] is bool(reference["ood_score"][i] <= threshold)
    assert sum(reference["ood_score"][:5] <= threshold) >= 4
    noise = client.post("/v1/predict", files=_files(_noise())).json()
    assert noise["in_distribution"] is False and noise["ood_score"] > body["ood_score"]
    with_maps = client.post("/v1/predict?feature_maps=true", files=_files(_noise())).json()
    assert with_maps["ood_score"] == pytest.approx(noise["ood_score"], rel=1e-5) and not with_maps["in_distribution"]


def test_batch_items_carry_the_ood_fields(client: TestClient, test_split) -> None:  # type: ignore[no-untyped-def]
    files = [("files", ("a.png", png_bytes(test_split.images[0]), "image/png")), ("files", ("n.png", _noise()))]
    files.append(("files", ("bad.png", b"not an image", "image/png")))
    results = client.post("/v1/predict/batch", files=files).json()["results"]
    assert [r.get("in_distribution") for r in results] == [True, False, None]
    assert isinstance(results[1]["ood_score"], float) and "ood_score" not in results[2]


def test_model_metadata_tells_the_methods_and_the_threshold(client: TestClient) -> None:
    info = client.get(f"/v1/models/{MODEL}").json()
    assert info["explanations"] == ["gradcam", "layercam", "occlusion"]
    assert info["out_of_distribution"]["threshold"] > 0 and info["out_of_distribution"]["validation_tpr"] == 0.95


# ----------------------------------------------------------------------------------------- explain


@pytest.mark.parametrize(
    ("query", "method"), [("", "layercam"), ("?method=layercam", "layercam"), ("?method=gradcam", "gradcam")]
)
def test_gradient_maps_are_the_closed_form_of_the_graphs_outputs(
    client: TestClient, test_split, reference, query: str, method: str
) -> None:  # type: ignore[no-untyped-def]
    """LayerCAM (the default) and Grad-CAM, each equal to its formula on onnxruntime's outputs."""
    for i in range(3):
        response = client.post(f"/v1/explain{query}", files=_files(png_bytes(test_split.images[i])))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["class_id"] == int(reference["probabilities"][i].argmax()) and body["in_distribution"] is True
        explanation = body["explanation"]
        assert explanation["method"] == method and explanation["target"] == "logit"
        assert explanation["layer"] == str(reference["layer"]) and explanation["class_id"] == body["class_id"]
        assert explanation["shape"] == [28, 28]
        np.testing.assert_allclose(np.array(explanation["data"]), reference[method][i], atol=1e-5)
    assert not np.allclose(reference["gradcam"], reference["layercam"])  # two different maps


def test_occlusion_and_a_chosen_class(client: TestClient, test_split) -> None:  # type: ignore[no-untyped-def]
    data = png_bytes(test_split.images[0])  # an ankle boot
    response = client.post("/v1/explain?method=occlusion&patch=4&stride=4&class_id=7", files=_files(data))
    assert response.status_code == 200, response.text
    body = response.json()
    explanation = body["explanation"]
    assert body["label"] == "Ankle boot" and explanation["class_id"] == 7 and explanation["label"] == "Sneaker"
    assert (explanation["patch"], explanation["stride"], explanation["target"]) == (4, 4, "probability")
    attribution = np.array(explanation["data"])
    assert attribution.shape == (28, 28) and np.isfinite(attribution).all()
    # 4×4 patches at stride 4 tile the image: the map is constant on each tile.
    assert np.ptp(attribution[:4, :4]) == 0 and np.ptp(attribution[24:, 24:]) == 0
    own = client.post("/v1/explain?method=occlusion", files=_files(data)).json()["explanation"]
    assert own["class_id"] == 9 and max(map(max, own["data"])) > 0.05  # hiding parts of the boot costs it


def test_png_overlay(client: TestClient, test_split) -> None:  # type: ignore[no-untyped-def]
    for method in ("layercam", "gradcam", "occlusion"):
        response = client.post(f"/v1/explain?format=png&method={method}", files=_files(png_bytes(test_split.images[0])))
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.headers["x-predicted-class"] == response.headers["x-explained-class"] == "9"
        assert response.headers["x-in-distribution"] == "true"
        image = Image.open(io.BytesIO(response.content))
        assert image.size == (224, 224) and image.mode == "RGB"
    flagged = client.post("/v1/explain?format=png", files=_files(_noise()))
    assert flagged.headers["x-in-distribution"] == "false"


def test_explain_by_model_and_version(client: TestClient, test_split) -> None:  # type: ignore[no-untyped-def]
    data = png_bytes(test_split.images[1])
    short = client.post("/v1/explain", files=_files(data)).json()
    for path in (f"/v1/models/{MODEL}/explain", f"/v1/models/{MODEL}/versions/{VERSION}/explain"):
        body = client.post(path, files=_files(data)).json()
        assert body["explanation"] == short["explanation"] and body["model_version"] == VERSION
    assert client.post("/v1/models/nope/explain", files=_files(data)).status_code == 404


@pytest.mark.parametrize(
    ("query", "status", "message"),
    [
        ("class_id=10", 422, "class_id 10 out of range"),
        ("class_id=-1", 422, "class_id"),
        ("method=lime", 422, "method"),
        ("method=occlusion&patch=0", 422, "patch"),
        ("method=occlusion&patch=4&stride=6", 422, "stride 6 is larger than patch 4"),
        ("format=gif", 422, "format"),
    ],
)
def test_explain_parameter_errors(client: TestClient, test_split, query: str, status: int, message: str) -> None:  # type: ignore[no-untyped-def]
    response = client.post(f"/v1/explain?{query}", files=_files(png_bytes(test_split.images[0])))
    assert response.status_code == status and message in response.json()["error"]


def test_explain_upload_errors(client: TestClient) -> None:
    assert client.post("/v1/explain", files=_files(b"not an image")).status_code == 400
    assert client.post("/v1/explain", content=b"", headers={"content-type": "image/png"}).status_code == 400


def test_a_version_without_head_or_ood_explains_by_occlusion_only(tmp_path: Path, test_split) -> None:  # type: ignore[no-untyped-def]
    """An older card (no `explain`, no `ood`, no lean graph): predictions have no OOD fields, Grad-CAM is a
    404 that names the way out, occlusion works, and V2 offers no derived outputs."""
    model_version(tmp_path / "plain" / "1", scale=1.0)
    with TestClient(create_app(repository_settings(tmp_path)), raise_server_exceptions=False) as client:
        data = png_bytes(test_split.images[0])
        body = client.post("/v1/predict", files=_files(data)).json()
        assert body["label"] == "Ankle boot" and "ood_score" not in body and "in_distribution" not in body
        response = client.post("/v1/explain", files=_files(data))
        assert response.status_code == 404 and "method=occlusion" in response.json()["error"]
        assert client.post("/v1/explain?method=occlusion", files=_files(data)).status_code == 200
        assert client.get("/v1/models/plain").json()["explanations"] == ["occlusion"]
        outputs = [o["name"] for o in client.get("/v2/models/plain").json()["outputs"]]
        assert "gradcam" not in outputs and "layercam" not in outputs and "ood_score" not in outputs


# ---------------------------------------------------------------------------------------------- V2


def test_v2_metadata_lists_the_derived_outputs(client: TestClient) -> None:
    outputs = {o["name"]: o for o in client.get(f"/v2/models/{MODEL}").json()["outputs"]}
    assert outputs["ood_score"] == {"name": "ood_score", "datatype": "FP32", "shape": [-1]}
    assert outputs["in_distribution"] == {"name": "in_distribution", "datatype": "BOOL", "shape": [-1]}
    for method in ("gradcam", "layercam"):
        assert outputs[method] == {"name": method, "datatype": "FP32", "shape": [-1, 28, 28]}


def test_v2_infer_returns_ood_and_gradcam(client: TestClient, test_split, reference) -> None:  # type: ignore[no-untyped-def]
    request = uint8_input(rows=3, data=test_split.images[:3].tolist())
    outputs = [{"name": "ood_score"}, {"name": "in_distribution"}, {"name": "gradcam"}, {"name": "layercam"}]
    response = client.post(f"/v2/models/{MODEL}/infer", content=v2([request], outputs=outputs))
    assert response.status_code == 200, response.text
    got = {o["name"]: o for o in response.json()["outputs"]}
    assert got["in_distribution"]["datatype"] == "BOOL" and got["in_distribution"]["data"] == [True] * 3
    np.testing.assert_allclose(got["ood_score"]["data"], reference["ood_score"][:3], rtol=1e-5)
    assert got["gradcam"]["shape"] == [3, 28, 28]
    for method in ("gradcam", "layercam"):
        data = np.array(got[method]["data"]).reshape(3, 28, 28)
        np.testing.assert_allclose(data, reference[method][:3], atol=1e-5)
    unknown = client.post(f"/v2/models/{MODEL}/infer", content=v2([request], outputs=[{"name": "saliency"}]))
    assert unknown.status_code == 400 and "gradcam" in unknown.json()["error"]
