"""The Open Inference Protocol (/v2) through the in-process app, with hand-built requests: the wire
format both ways, and every malformed request answered with the protocol's status and an {"error"}
that names the problem, never a FastAPI 422 or a 500."""

from __future__ import annotations

import base64
import gzip
import json
import struct
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.model import Model
from tests.support import make_settings, model_folder, png_bytes, reference_probabilities
from training.data import Split

N = 3  # images per request: enough to catch row mix-ups, light on a busy machine


@pytest.fixture(scope="module")
def served(client: TestClient) -> dict[str, Any]:
    """What /v1 says is being served: name, version, classes, outputs (never hard-coded)."""
    return client.get("/v1/models").json()["models"][0]


@pytest.fixture(scope="module")
def name(served: dict[str, Any]) -> str:
    return served["name"]


@pytest.fixture(scope="module")
def images(test_split: Split) -> np.ndarray:
    return test_split.images[:N]


def scaled(images: np.ndarray) -> np.ndarray:
    """The model's input for uint8 pixels, as training made it: float32 [N, 28, 28, 1] in [0, 1]."""
    return (images.astype(np.float32) / 255.0)[..., None]


def fp32_input(images: np.ndarray, nested: bool = False) -> dict[str, Any]:
    x = scaled(images)
    data = x.tolist() if nested else x.ravel().tolist()
    return {"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": data}


def binary_body(header: dict[str, Any], *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    return head + b"".join(blobs), headers


def length_prefixed(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def post(client: TestClient, name: str, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None):
    url = f"/v2/models/{name}/infer"
    if isinstance(body, bytes):
        return client.post(url, content=body, headers=headers or {})
    return client.post(url, json=body)


def outputs_of(response: httpx.Response) -> dict[str, np.ndarray]:
    """Decode a response by hand, from the protocol's documents rather than through any client."""
    assert response.status_code == 200, response.text
    length = response.headers.get("inference-header-content-length")
    content = response.content
    if length is None:
        assert response.headers["content-type"] == "application/json"
        header, binary = json.loads(content), b""
    else:
        assert response.headers["content-type"] == "application/octet-stream"
        header, binary = json.loads(content[: int(length)]), content[int(length) :]
    arrays, offset = {}, 0
    for output in header["outputs"]:
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            data = output["data"]
            array = np.array(data, dtype=object if output["datatype"] == "BYTES" else np.float32)
        else:
            blob, offset = binary[offset : offset + size], offset + size
            if output["datatype"] == "BYTES":
                items, at = [], 0
                while at < len(blob):
                    (n,) = struct.unpack_from("<I", blob, at)
                    items.append(blob[at + 4 : at + 4 + n].decode())
                    at += 4 + n
                array = np.array(items, dtype=object)
            else:
                assert output["datatype"] == "FP32"
                array = np.frombuffer(blob, "<f4")
        arrays[output["name"]] = array.reshape(output["shape"])
    assert offset == len(binary), "binary_data_size values must add up to the binary part"
    return arrays


def json_header(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return json.loads(response.content[: int(response.headers["inference-header-content-length"])])


# Outputs the committed model offers beside its graph's: computed from them (service.dataplane.derived_outputs).
DERIVED = ["ood_score", "in_distribution", "gradcam", "layercam"]


def reference_outputs(session: ort.InferenceSession, images: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"image": scaled(images)}), strict=True))


# ---------------------------------------------------------------------------------------- metadata


def test_server_metadata_and_health(client: TestClient) -> None:
    meta = client.get("/v2").json()
    assert {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    assert meta["name"] and meta["version"]
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200


def test_model_metadata(client: TestClient, served: dict[str, Any]) -> None:
    name, version = served["name"], served["version"]
    meta = client.get(f"/v2/models/{name}").json()
    assert meta["name"] == name
    assert meta["versions"] == [version]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": served["input"]["name"], "datatype": "FP32", "shape": [-1, 28, 28, 1]}]
    # The graph's outputs, then those computed from them (the OOD score and flag, Grad-CAM: tests/app/test_explain.py).
    assert [o["name"] for o in meta["outputs"]] == [o["name"] for o in served["outputs"]] + DERIVED
    assert all(o["datatype"] == ("BOOL" if o["name"] == "in_distribution" else "FP32") for o in meta["outputs"])
    assert all(o["shape"][0] == -1 for o in meta["outputs"])
    assert client.get(f"/v2/models/{name}/versions/{version}").json() == meta
    for path in (f"/v2/models/{name}/ready", f"/v2/models/{name}/versions/{version}/ready"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.json() == {"name": name, "ready": True}


@pytest.mark.parametrize(
    ("method", "path", "named"),
    [
        ("GET", "/v2/models/no-such-model", "no-such-model"),
        ("GET", "/v2/models/no-such-model/ready", "no-such-model"),
        ("GET", "/v2/models/{name}/versions/999", "999"),
        ("GET", "/v2/models/{name}/versions/999/ready", "999"),
        ("POST", "/v2/models/no-such-model/infer", "no-such-model"),
        ("POST", "/v2/models/{name}/versions/999/infer", "999"),
    ],
)
def test_unknown_model_or_version_is_404(client: TestClient, name: str, method: str, path: str, named: str) -> None:
    response = client.request(method, path.format(name=name), json={"inputs": []})
    assert response.status_code == 404
    assert named in response.json()["error"]


# --------------------------------------------------------------------------------------- inference


def test_json_fp32_equals_onnxruntime(
    client: TestClient, served: dict[str, Any], images: np.ndarray, reference_session: ort.InferenceSession
) -> None:
    body = {"id": "req-7", "inputs": [fp32_input(images)], "outputs": [{"name": "probabilities"}]}
    response = post(client, served["name"], body)
    header = response.json()
    assert header["model_name"] == served["name"]
    assert header["model_version"] == served["version"]
    assert header["id"] == "req-7"
    # float32 -> JSON -> float32 is exact, and it is the same session on the same tensor: equal, bit for bit.
    np.testing.assert_array_equal(
        outputs_of(response)["probabilities"], reference_probabilities(reference_session, images)
    )


def test_nested_data_equals_flat(client: TestClient, name: str, images: np.ndarray) -> None:
    flat = outputs_of(post(client, name, {"inputs": [fp32_input(images)]}))
    nested = outputs_of(post(client, name, {"inputs": [fp32_input(images, nested=True)]}))
    assert flat.keys() == nested.keys()
    for key in flat:
        np.testing.assert_array_equal(flat[key], nested[key])


def test_no_outputs_named_returns_all_of_them(
    client: TestClient, served: dict[str, Any], images: np.ndarray, reference_session: ort.InferenceSession
) -> None:
    result = outputs_of(post(client, served["name"], {"inputs": [fp32_input(images)]}))
    assert list(result) == [o["name"] for o in served["outputs"]] + DERIVED
    expected = reference_outputs(reference_session, images)
    for output in served["outputs"]:
        assert list(result[output["name"]].shape) == [N, *output["shape"][1:]]
        np.testing.assert_array_equal(result[output["name"]], expected[output["name"]])


def test_uint8_pixels_are_scaled_on_the_server(client: TestClient, name: str, images: np.ndarray) -> None:
    fp32 = outputs_of(post(client, name, {"inputs": [fp32_input(images)]}))
    for shape in ([N, 28, 28], [N, 28, 28, 1]):
        tensor = {"name": "image", "datatype": "UINT8", "shape": shape, "data": images.ravel().tolist()}
        uint8 = outputs_of(post(client, name, {"inputs": [tensor]}))
        np.testing.assert_array_equal(uint8["probabilities"], fp32["probabilities"])
        np.testing.assert_array_equal(uint8["embedding"], fp32["embedding"])


def test_binary_tensors_both_ways(
    client: TestClient, name: str, images: np.ndarray, reference_session: ort.InferenceSession
) -> None:
    x = scaled(images)
    header = {
        "inputs": [
            {
                "name": "image",
                "datatype": "FP32",
                "shape": list(x.shape),
                "parameters": {"binary_data_size": x.nbytes},
            }
        ],
        "outputs": [
            {"name": "probabilities", "parameters": {"binary_data": True}},
            {"name": "embedding"},  # JSON: binary_data_output is not set
        ],
    }
    response = post(client, name, *binary_body(header, x.tobytes()))
    outputs = json_header(response)["outputs"]
    assert outputs[0]["parameters"] == {"binary_data_size": N * 10 * 4}
    assert "data" in outputs[1]
    assert len(response.content) == int(response.headers["inference-header-content-length"]) + N * 10 * 4
    result = outputs_of(response)
    np.testing.assert_array_equal(result["probabilities"], reference_probabilities(reference_session, images))

    # binary_data_output at request level; a per-output binary_data: false overrides it
    header["parameters"] = {"binary_data_output": True}
    header["outputs"] = [
        {"name": "embedding"},
        {"name": "probabilities", "parameters": {"binary_data": False}},
    ]
    outputs = json_header(post(client, name, *binary_body(header, x.tobytes())))["outputs"]
    assert outputs[0]["parameters"] == {"binary_data_size": N * 128 * 4}
    assert "data" in outputs[1]


def test_bytes_images_in_json_and_binary(client: TestClient, name: str, images: np.ndarray) -> None:
    fp32 = outputs_of(post(client, name, {"inputs": [fp32_input(images)], "outputs": [{"name": "probabilities"}]}))
    pngs = [png_bytes(image) for image in images]
    as_json = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [N],
                "data": [base64.b64encode(p).decode() for p in pngs],
            }
        ]
    }
    from_json = outputs_of(post(client, name, as_json))
    blob = length_prefixed(pngs)
    header = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [N, 1],
                "parameters": {"binary_data_size": len(blob)},
            }
        ]
    }
    from_binary = outputs_of(post(client, name, *binary_body(header, blob)))
    # A 28x28 dark-background PNG passes preprocessing untouched: the same tensor as pixels / 255.
    np.testing.assert_array_equal(from_json["probabilities"], fp32["probabilities"])
    np.testing.assert_array_equal(from_binary["probabilities"], fp32["probabilities"])


def test_classification(client: TestClient, served: dict[str, Any], images: np.ndarray) -> None:
    request = {"inputs": [fp32_input(images)], "outputs": [{"name": "probabilities"}]}
    probabilities = outputs_of(post(client, served["name"], request))["probabilities"]
    for binary in (False, True):
        request["outputs"] = [{"name": "probabilities", "parameters": {"classification": 3, "binary_data": binary}}]
        classes = outputs_of(post(client, served["name"], request))["probabilities"]
        assert classes.shape == (N, 3)
        for row, entries in enumerate(classes):
            parsed = [entry.split(":", 2) for entry in entries]
            indexes = [int(index) for _, index, _ in parsed]
            assert indexes == list(np.argsort(-probabilities[row], kind="stable")[:3])
            assert [label for _, _, label in parsed] == [served["classes"][i] for i in indexes]
            # the score is written so that it reads back as the same float32
            assert [np.float32(score) for score, _, _ in parsed] == [probabilities[row][i] for i in indexes]


def test_gzip_request_body(client: TestClient, name: str, images: np.ndarray) -> None:
    body = json.dumps({"inputs": [fp32_input(images)], "outputs": [{"name": "probabilities"}]}).encode()
    plain = outputs_of(post(client, name, body, {"Content-Type": "application/json"}))
    zipped = outputs_of(post(client, name, gzip.compress(body), {"Content-Encoding": "gzip"}))
    np.testing.assert_array_equal(zipped["probabilities"], plain["probabilities"])


# ------------------------------------------------------------------------------------------ errors

PIXELS = bytes(range(256)) * 3 + bytes(16)  # 784 bytes: one UINT8 image
UINT8 = {"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": list(PIXELS)}


def _binary(header: dict[str, Any], *blobs: bytes, length_delta: int = 0) -> tuple[bytes, dict[str, str]]:
    body, headers = binary_body(header, *blobs)
    headers["Inference-Header-Content-Length"] = str(int(headers["Inference-Header-Content-Length"]) + length_delta)
    return body, headers


def _uint8_binary(size: int) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "image",
                "datatype": "UINT8",
                "shape": [1, 28, 28],
                "parameters": {"binary_data_size": size},
            }
        ]
    }


def _with(**changes: Any) -> dict[str, Any]:
    return {"inputs": [{**UINT8, **changes}]}


BAD_REQUESTS: dict[str, tuple[Any, int, str]] = {
    # id: (request: a JSON-able dict, or (body, headers); status; a word the error must contain)
    "header length beyond the body": (
        _binary(_uint8_binary(784), PIXELS, length_delta=10_000),
        400,
        "Inference-Header-Content-Length",
    ),
    "header length not a number": (
        (b"{}", {"Inference-Header-Content-Length": "ten"}),
        400,
        "not an integer",
    ),
    "binary size beyond the data": (_binary(_uint8_binary(784), PIXELS[:700]), 400, "binary_data_size 784"),
    "binary bytes left over": (_binary(_uint8_binary(784), PIXELS + b"extra"), 400, "5 bytes"),
    "binary size not the shape's": (_binary(_uint8_binary(700), PIXELS[:700]), 400, "needs 784"),
    "binary size without the header": (
        (json.dumps(_uint8_binary(784)).encode() + PIXELS, {}),
        400,
        "malformed JSON",
    ),
    "binary size but no header length": (_uint8_binary(784), 400, "Inference-Header-Content-Length"),
    "data and binary both": (_with(parameters={"binary_data_size": 0}), 400, "both"),
    "neither data nor binary": (_with(data=None), 400, "neither"),
    "data length not the shape's": (_with(data=list(PIXELS[:700])), 400, "needs 784"),
    "ragged data": (_with(data=[[1, 2], [3]]), 400, "ragged"),
    "strings as numbers": (_with(data=["1"] * 784), 400, "not valid UINT8"),
    "UINT8 out of range": (_with(data=[256] * 784), 400, "outside"),
    "floats as UINT8": (_with(data=[0.5] * 784), 400, "not valid UINT8"),
    "FP32 out of [0, 1]": (_with(datatype="FP32", data=[2.0] * 784), 400, "[0, 1]"),
    "wrong datatype": (_with(datatype="FP64", data=[0.0] * 784), 400, "FP64"),
    "unknown datatype": (_with(datatype="FLOAT"), 400, "FLOAT"),
    "bad shape": (_with(shape=[1, 28, 28, 3]), 400, "[1, 28, 28, 3]"),
    "negative dimension": (_with(shape=[-1, 28, 28]), 400, "shape"),
    "no rows": (_with(shape=[0, 28, 28], data=[]), 400, "no images"),
    "too many rows": (_with(shape=[257, 28, 28], data=list(PIXELS) * 257), 413, "257"),
    "wrong input name": (_with(name="pixels"), 400, "'pixels'"),
    "unknown output": ({"inputs": [UINT8], "outputs": [{"name": "no-such-output"}]}, 400, "'no-such-output'"),
    "output twice": (
        {"inputs": [UINT8], "outputs": [{"name": "embedding"}, {"name": "embedding"}]},
        400,
        "twice",
    ),
    "classification not a count": (
        {"inputs": [UINT8], "outputs": [{"name": "probabilities", "parameters": {"classification": "3"}}]},
        400,
        "classification",
    ),
    "binary_data not a boolean": (
        {"inputs": [UINT8], "outputs": [{"name": "embedding", "parameters": {"binary_data": 1}}]},
        400,
        "binary_data",
    ),
    "shared memory": (_with(parameters={"shared_memory_region": "r"}), 400, "shared memory"),
    "malformed JSON": ((b'{"inputs": [', {"Content-Type": "application/json"}), 400, "malformed JSON"),
    "empty body": ((b"", {}), 400, "malformed JSON"),
    "not an object": ([1, 2], 400, "object"),
    "missing inputs": ({"outputs": [{"name": "probabilities"}]}, 400, "inputs"),
    "no inputs": ({"inputs": []}, 400, "exactly one input"),
    "two inputs": ({"inputs": [UINT8, UINT8]}, 400, "exactly one input"),
    "id not a string": ({"id": 7, "inputs": [UINT8]}, 400, "id"),
    "shape not integers": (_with(shape=[1, 28.0, 28]), 400, "shape"),
    "BYTES not base64": (
        _with(datatype="BYTES", shape=[2], data=[base64.b64encode(b"x").decode(), "not base64!"]),
        400,
        "element 1",
    ),
    "BYTES not an image": (
        _with(datatype="BYTES", shape=[1], data=[base64.b64encode(b"hello").decode()]),
        400,
        "element 0",
    ),
    "BYTES length prefix beyond the data": (
        _binary(
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 8},
                    }
                ]
            },
            struct.pack("<I", 100) + b"abcd",
        ),
        400,
        "declares 100 bytes",
    ),
    "BYTES count not the shape's": (_with(datatype="BYTES", shape=[2], data=["aGVsbG8="]), 400, "needs 2"),
    "unsupported content encoding": ((b"{}", {"Content-Encoding": "br"}), 415, "br"),
    "corrupt gzip": ((b"not gzip at all", {"Content-Encoding": "gzip"}), 400, "gzip"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_get_protocol_errors(client: TestClient, name: str, case: tuple[Any, int, str]) -> None:
    request, status, word = case
    if isinstance(request, tuple):
        response = post(client, name, *request)
    else:
        response = client.post(f"/v2/models/{name}/infer", json=request)
    assert response.status_code == status, response.text
    assert word in response.json()["error"]


def test_bad_image_in_a_batch_is_named(client: TestClient, name: str, images: np.ndarray) -> None:
    elements = [png_bytes(images[0]), png_bytes(images[1])[:60], png_bytes(images[2])]
    blob = length_prefixed(elements)
    header = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [3],
                "parameters": {"binary_data_size": len(blob)},
            }
        ]
    }
    response = post(client, name, *binary_body(header, blob))
    assert response.status_code == 400
    assert "element 1" in response.json()["error"]


def test_service_answers_after_bad_requests(client: TestClient, name: str) -> None:
    for request, _, _ in BAD_REQUESTS.values():  # again, all at once, then a good one
        if isinstance(request, tuple):
            post(client, name, *request)
        else:
            client.post(f"/v2/models/{name}/infer", json=request)
    response = client.post(f"/v2/models/{name}/infer", json={"inputs": [UINT8], "outputs": [{"name": "probabilities"}]})
    assert response.status_code == 200
    assert client.get("/v2/health/ready").status_code == 200


# --------------------------------------------------------------------------------------- not ready


def test_not_ready_is_503(client: TestClient) -> None:
    # No `with`: the lifespan never runs, so the model is read (its card) but never loaded.
    model = Model(model_folder())
    not_ready = TestClient(create_app(make_settings(), model=model), raise_server_exceptions=False)
    assert not_ready.get("/v2/health/live").status_code == 200
    for method, path in [
        ("GET", "/v2/health/ready"),
        ("GET", f"/v2/models/{model.name}/ready"),
        ("GET", f"/v2/models/{model.name}/versions/{model.version}/ready"),
        ("POST", f"/v2/models/{model.name}/infer"),
    ]:
        response = not_ready.request(method, path, json={"inputs": [UINT8]})
        assert response.status_code == 503, path
        assert "not ready" in response.json()["error"]
    # Metadata comes from the card, which is read before loading.
    assert not_ready.get(f"/v2/models/{model.name}").status_code == 200

    # No model object at all yet (the lifespan builds it): everything model-related is 503.
    empty = TestClient(create_app(make_settings()), raise_server_exceptions=False)
    for path in ("/v2/health/ready", f"/v2/models/{model.name}", f"/v2/models/{model.name}/ready"):
        assert empty.get(path).status_code == 503, path
    # The served app is untouched by all this.
    assert client.get("/v2/health/ready").status_code == 200
