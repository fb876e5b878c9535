"""The friendly REST API in-process: every endpoint and every error, on the real model."""

from __future__ import annotations

import gc
import io
import json
import weakref

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import GC_YOUNG_THRESHOLD, create_app
from service.model import Model
from tests.support import make_settings, model_folder, png_bytes, reference_probabilities


def _predict(client: TestClient, data: bytes, **params: object) -> dict:
    response = client.post("/v1/predict", files={"file": ("x.png", data, "image/png")}, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_predict_multipart_matches_onnxruntime(client: TestClient, test_split, reference_session) -> None:  # type: ignore[no-untyped-def]
    images = test_split.images[:20]
    want = reference_probabilities(reference_session, images)
    for i, pixels in enumerate(images):
        body = _predict(client, png_bytes(pixels))
        assert body["probabilities"] == pytest.approx(want[i].tolist(), abs=0)
        assert body["class_id"] == int(want[i].argmax())
        assert body["label"] == body["top_k"][0]["label"]
        assert len(body["top_k"]) == 3 and "feature_maps" not in body
        assert sum(body["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        probs = [t["probability"] for t in body["top_k"]]
        assert probs == sorted(probs, reverse=True)


def test_predict_raw_body_and_top_k(client: TestClient, test_split) -> None:  # type: ignore[no-untyped-def]
    data = png_bytes(test_split.images[0])
    response = client.post("/v1/predict?top_k=10", content=data, headers={"content-type": "image/png"})
    assert response.status_code == 200
    body = response.json()
    assert len(body["top_k"]) == 10
    assert body["probabilities"] == _predict(client, data)["probabilities"]
    assert {body["model"], body["model_version"]} == {model_folder().parent.name, model_folder().name}


def test_predict_with_feature_maps(client: TestClient, test_split, reference_session) -> None:  # type: ignore[no-untyped-def]
    body = _predict(client, png_bytes(test_split.images[1]), feature_maps="true")
    x = (test_split.images[1:2].astype(np.float32) / 255.0)[..., None]
    outputs = [o.name for o in reference_session.get_outputs()]
    want = dict(zip(outputs, reference_session.run(None, {"image": x}), strict=True))
    layers = [name for name in outputs if name.startswith("conv")]
    assert set(body["feature_maps"]) == set(layers)
    for layer in layers:
        fmap = body["feature_maps"][layer]
        assert fmap["shape"] == list(want[layer].shape[1:])
        np.testing.assert_array_equal(np.array(fmap["data"], np.float32), want[layer][0])
    np.testing.assert_array_equal(np.array(body["embedding"], np.float32), want["embedding"][0])


def test_feature_map_png_and_npz(client: TestClient, test_split) -> None:  # type: ignore[no-untyped-def]
    data = png_bytes(test_split.images[2])
    models = client.get("/v1/models").json()["models"][0]
    layers = [o["name"] for o in models["outputs"] if o["kind"] == "feature_map"]
    for layer in layers:
        response = client.post(f"/v1/feature-maps?layer={layer}&format=png", files={"file": ("x.png", data)})
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        picture = Image.open(io.BytesIO(response.content))
        assert picture.size[0] > 28 and picture.size[1] > 28
    default = client.post("/v1/feature-maps", files={"file": ("x.png", data)})
    assert default.status_code == 200 and default.headers["content-type"] == "image/png"

    response = client.post("/v1/feature-maps?format=npz", files={"file": ("x.png", data)})
    assert response.status_code == 200
    archive = np.load(io.BytesIO(response.content))
    assert set(archive.files) >= {"input", "probabilities", "embedding", *layers}
    np.testing.assert_array_equal(archive["input"][..., 0], test_split.images[2] / np.float32(255))


def test_batch_multipart_equals_single_requests_in_order(client: TestClient, test_split) -> None:  # type: ignore[no-untyped-def]
    images = test_split.images[:40]
    files = [("files", (f"img{i}.png", png_bytes(p), "image/png")) for i, p in enumerate(images)]
    files.insert(5, ("files", ("broken.png", b"not an image", "image/png")))
    response = client.post("/v1/predict/batch", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == 41 and body["failed"] == 1
    results = body["results"]
    assert [r["index"] for r in results] == list(range(41))
    assert results[5]["filename"] == "broken.png" and results[5]["status"] == 400 and "error" in results[5]
    good = [r for r in results if "error" not in r]
    assert [r["filename"] for r in good] == [f"img{i}.png" for i in range(40)]
    for r, pixels in zip(good[:10], images[:10], strict=True):
        assert r["probabilities"] == _predict(client, png_bytes(pixels))["probabilities"]


@pytest.mark.parametrize("layout", ["npy-u8", "npy-u8-4d", "npy-float", "npz"])
def test_batch_arrays(client: TestClient, test_split, reference_session, layout: str) -> None:  # type: ignore[no-untyped-def]
    images = test_split.images[:64]
    want = reference_probabilities(reference_session, images)
    buffer = io.BytesIO()
    if layout == "npy-u8":
        np.save(buffer, images)
    elif layout == "npy-u8-4d":
        np.save(buffer, images[..., None])
    elif layout == "npy-float":
        np.save(buffer, images.astype(np.float32) / 255.0)
    else:
        np.savez(buffer, images=images)
    response = client.post("/v1/predict/batch", files={"files": (f"x.{layout[:3]}", buffer.getvalue())})
    assert response.status_code == 200, response.text
    got = np.array([r["probabilities"] for r in response.json()["results"]], np.float32)
    np.testing.assert_array_equal(got, want)
    raw = client.post("/v1/predict/batch", content=buffer.getvalue(), headers={"content-type": "application/x-npy"})
    assert raw.status_code == 200 and raw.json()["count"] == 64


def test_models_endpoints(client: TestClient) -> None:
    listing = client.get("/v1/models").json()["models"]
    assert len(listing) == 1
    info = listing[0]
    assert len(info["classes"]) == 10 and info["classes"][9] == "Ankle boot"
    assert info["input"]["shape"] == [-1, 28, 28, 1]
    assert info["providers"]["in_use"] == ["CPUExecutionProvider"]
    assert "test_accuracy" in info["metrics"]
    assert info["version"] in info["versions"]
    assert client.get(f"/v1/models/{info['name']}").json()["name"] == info["name"]
    missing = client.get("/v1/models/no-such-model")
    assert missing.status_code == 404 and "no-such-model" in missing.json()["error"]


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_not_ready_answers_503_with_error_shape() -> None:
    model = Model(model_folder())  # read but never loaded
    app = create_app(make_settings(), model=model)
    with TestClient(app) as c:
        # the lifespan would load it; stop that by marking it not ready after startup
        model.ready = False
        assert c.get("/healthz").status_code == 200
        for method, path in [("get", "/readyz"), ("get", "/v1/models"), ("post", "/v1/predict")]:
            response = getattr(c, method)(path)
            assert response.status_code == 503
            assert "not ready" in response.json()["error"]


class _Node:
    me: object = None


def test_lifespan_freezes_startup_objects_and_restores_the_collector(test_split) -> None:  # type: ignore[no-untyped-def]
    before = gc.get_threshold()
    gc.unfreeze()  # another app in this process (the session client) may be running with its own freeze
    with TestClient(create_app(make_settings())) as c:
        serving = gc.get_threshold()
        frozen = gc.get_freeze_count()
        assert serving[0] == max(before[0], GC_YOUNG_THRESHOLD) and serving[1:] == before[1:]
        assert frozen > 10_000  # modules, app, model: everything alive at startup
        # Objects made while serving are still collected: a reference cycle dies with gc.collect().
        node = _Node()
        node.me = node
        alive = weakref.ref(node)
        del node
        gc.collect()
        assert alive() is None
        assert c.post("/v1/predict", files={"file": ("x.png", png_bytes(test_split.images[0]))}).status_code == 200
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def _noise_png(side: int) -> bytes:
    """Noise does not compress: about side² bytes."""
    return png_bytes(np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8))


BAD_REQUESTS = [
    # (description, request kwargs, path, expected status, message fragment)
    ("empty file", {"files": {"file": ("x.png", b"")}}, "/v1/predict", 400, "empty"),
    (
        "random bytes",
        {"files": {"file": ("x.png", b"\x01\x02garbage" * 30)}},
        "/v1/predict",
        400,
        "not a recognised image",
    ),
    ("missing field", {"files": {"other": ("x.png", b"abc")}}, "/v1/predict", 400, "'file' is missing"),
    (
        "text field",
        {"data": {"file": "hello"}, "files": {"x": ("x", b"1")}},
        "/v1/predict",
        400,
        "must be a file",
    ),
    ("urlencoded form", {"data": {"file": "hello"}}, "/v1/predict", 415, "unsupported content type"),
    (
        "wrong content type",
        {"content": b"{}", "headers": {"content-type": "application/json"}},
        "/v1/predict",
        415,
        "unsupported content type",
    ),
    ("no content type", {"content": b"abc"}, "/v1/predict", 415, "unsupported content type"),
    (
        "svg",
        {"files": {"file": ("x.svg", b"<svg xmlns='http://www.w3.org/2000/svg'></svg>")}},
        "/v1/predict",
        415,
        "SVG",
    ),
    ("pdf", {"files": {"file": ("x.pdf", b"%PDF-1.4\n%...")}}, "/v1/predict", 415, "PDF"),
    (
        "top_k zero",
        {"files": {"file": ("x.png", b"abc")}, "params": {"top_k": 0}},
        "/v1/predict",
        422,
        "top_k",
    ),
    (
        "top_k text",
        {"files": {"file": ("x.png", b"abc")}, "params": {"top_k": "lots"}},
        "/v1/predict",
        422,
        "top_k",
    ),
    (
        "bad bool",
        {"files": {"file": ("x.png", b"abc")}, "params": {"feature_maps": "perhaps"}},
        "/v1/predict",
        422,
        "feature_maps",
    ),
    (
        "unknown layer",
        {"files": {"file": ("x.png", b"abc")}, "params": {"layer": "../../etc/passwd"}},
        "/v1/feature-maps",
        404,
        "unknown layer",
    ),
    (
        "bad format",
        {"files": {"file": ("x.png", b"abc")}, "params": {"format": "gif"}},
        "/v1/feature-maps",
        422,
        "format",
    ),
    ("batch no files", {"files": {"nothing": ("x", b"abc")}}, "/v1/predict/batch", 400, "'files' is missing"),
    (
        "batch json",
        {"content": b"[]", "headers": {"content-type": "application/json"}},
        "/v1/predict/batch",
        415,
        "unsupported content type",
    ),
    (
        "bad npy",
        {"content": b"\x93NUMPY garbage", "headers": {"content-type": "application/x-npy"}},
        "/v1/predict/batch",
        400,
        "unreadable array",
    ),
    ("unknown route", {}, "/v1/nothing-here", 404, "no such route"),
]


@pytest.mark.parametrize(
    ("what", "kwargs", "path", "status", "message"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_requests_get_clear_json_errors(
    client: TestClient, what: str, kwargs: dict, path: str, status: int, message: str
) -> None:
    response = client.post(path, **kwargs)
    assert response.status_code == status, response.text
    assert message.lower() in response.json()["error"].lower()
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("array", "status", "message"),
    [
        (np.zeros((3, 28, 27), np.uint8), 400, "is not [N, 28, 28]"),
        (np.zeros((0, 28, 28), np.uint8), 400, "no images"),
        (np.zeros((300, 28, 28), np.uint8), 413, "limit is 256"),
        (np.full((2, 28, 28), 2.0, np.float32), 400, "in [0, 1]"),
        (np.full((2, 28, 28), np.nan, np.float32), 400, "finite"),
        (np.zeros((2, 28, 28), np.int64), 400, "neither uint8 nor float"),
    ],
)
def test_bad_arrays(client: TestClient, array: np.ndarray, status: int, message: str) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    response = client.post("/v1/predict/batch", files={"files": ("x.npy", buffer.getvalue())})
    assert response.status_code == status
    assert message in response.json()["error"]


def test_size_limits() -> None:
    settings = make_settings(
        max_image_bytes=50_000, max_image_pixels=1_000_000, max_batch_images=3, max_request_bytes=200_000
    )
    with TestClient(create_app(settings)) as c:
        big = c.post("/v1/predict", files={"file": ("big.png", _noise_png(300))})
        assert big.status_code == 413 and "limit" in big.json()["error"]
        # 4000×4000 black compresses to a few kB: refused by its pixel count, before decoding
        wide = c.post("/v1/predict", files={"file": ("wide.png", png_bytes(np.zeros((4000, 4000), np.uint8)))})
        assert wide.status_code == 413 and "pixels" in wide.json()["error"]
        raw = c.post("/v1/predict", content=b"\x89PNG" + b"\x00" * 60_000, headers={"content-type": "image/png"})
        assert raw.status_code == 413
        four = [("files", (f"{i}.png", png_bytes(np.zeros((28, 28), np.uint8)))) for i in range(4)]
        many = c.post("/v1/predict/batch", files=four)
        assert many.status_code == 413 and "limit is 3" in many.json()["error"]
        assert c.get("/readyz").status_code == 200


def test_openapi_documents_uploads_and_examples(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    predict = schema["paths"]["/v1/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "image/*"}
    assert {"400", "413", "415", "422", "503"} <= set(predict["responses"])
    assert "/v1/predict/batch" in schema["paths"] and "/v1/feature-maps" in schema["paths"]
    assert json.dumps(schema).count("examples") > 3


def test_metrics_exposition(client: TestClient, test_split) -> None:  # type: ignore[no-untyped-def]
    data = png_bytes(test_split.images[3])
    client.post("/v1/predict", files={"file": ("x.png", data)})
    client.post("/v1/predict", files={"file": ("x.png", b"junk")})
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'http_requests_total{method="POST",route="/v1/predict",status="200"}' in text
    assert 'http_requests_total{method="POST",route="/v1/predict",status="400"}' in text
    assert "http_request_duration_seconds_bucket" in text and "inference_batch_size_bucket" in text
    assert "inference_queue_seconds_count" in text and "inference_seconds_count" in text
    assert "http_requests_in_flight" in text
    assert 'model_info{model="' in text and 'providers="CPUExecutionProvider"' in text
    assert 'inference_images_total{model="' in text  # inference metrics carry the model and its version


def test_a_thousand_pngs_single_and_batch_equal_onnxruntime(client: TestClient, test_split, reference_session) -> None:  # type: ignore[no-untyped-def]
    images = test_split.images[:1000]
    want = reference_probabilities(reference_session, images)
    pngs = [png_bytes(p) for p in images]
    single = np.array(
        [
            client.post("/v1/predict", content=d, headers={"content-type": "image/png"}).json()["probabilities"]
            for d in pngs
        ],
        np.float32,
    )
    np.testing.assert_array_equal(single, want)
    batched = []
    for start in range(0, 1000, 250):
        files = [("files", (f"{i}.png", pngs[i], "image/png")) for i in range(start, start + 250)]
        batched += [r["probabilities"] for r in client.post("/v1/predict/batch", files=files).json()["results"]]
    np.testing.assert_array_equal(np.array(batched, np.float32), single)
