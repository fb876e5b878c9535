"""The real tritonclient HTTP client against a real `python -m service` process: what a Triton user
would run, unchanged, with every answer compared to onnxruntime run directly on the same tensors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.support import png_bytes, reference_probabilities
from training.data import Split

N = 4


@pytest.fixture(scope="module")
def triton_client(live_server: str) -> Iterator[triton.InferenceServerClient]:
    connection = triton.InferenceServerClient(url=live_server.removeprefix("http://"))
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def served(live_server: str) -> dict[str, Any]:
    return httpx.get(live_server + "/v1/models").json()["models"][0]


@pytest.fixture(scope="module")
def images(test_split: Split) -> np.ndarray:
    return test_split.images[N : 2 * N]


def scaled(images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) / 255.0)[..., None]


def image_input(array: np.ndarray, datatype: str, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def test_health_and_metadata(triton_client: triton.InferenceServerClient, served: dict[str, Any]) -> None:
    name, version = served["name"], served["version"]
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready(name)
    assert triton_client.is_model_ready(name, version)
    assert not triton_client.is_model_ready("no-such-model")
    assert not triton_client.is_model_ready(name, "999")
    assert {"binary_tensor_data", "classification"} <= set(triton_client.get_server_metadata()["extensions"])

    meta = triton_client.get_model_metadata(name)
    assert meta["name"] == name
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 28, 28, 1]}]
    # The graph's outputs, then those the service computes from them (the OOD score and flag, Grad-CAM).
    derived = ["ood_score", "in_distribution", "gradcam", "layercam"]
    assert [o["name"] for o in meta["outputs"]] == [o["name"] for o in served["outputs"]] + derived
    assert triton_client.get_model_metadata(name, version) == meta
    with pytest.raises(InferenceServerException) as caught:
        triton_client.get_model_metadata("no-such-model")
    assert caught.value.status() == "404"
    assert "no-such-model" in caught.value.message()


@pytest.mark.parametrize(("binary_in", "binary_out"), [(True, True), (False, False), (True, False), (False, True)])
def test_fp32_equals_onnxruntime(
    triton_client: triton.InferenceServerClient,
    served: dict[str, Any],
    images: np.ndarray,
    reference_session: ort.InferenceSession,
    binary_in: bool,
    binary_out: bool,
) -> None:
    result = triton_client.infer(
        served["name"],
        [image_input(scaled(images), "FP32", binary_in)],
        outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary_out)],
        request_id="abc",
    )
    assert result.get_response()["id"] == "abc"
    assert result.get_response()["model_version"] == served["version"]
    # The same session on the same float32 tensor (JSON round-trips float32 exactly): bit for bit equal.
    np.testing.assert_array_equal(result.as_numpy("probabilities"), reference_probabilities(reference_session, images))


def test_feature_maps_and_embedding(
    triton_client: triton.InferenceServerClient,
    served: dict[str, Any],
    images: np.ndarray,
    reference_session: ort.InferenceSession,
) -> None:
    layers = [o["name"] for o in served["outputs"] if o.get("kind") in ("feature_map", "embedding")]
    assert layers
    result = triton_client.infer(
        served["name"],
        [image_input(scaled(images), "FP32")],
        outputs=[triton.InferRequestedOutput(layer, binary_data=i % 2 == 0) for i, layer in enumerate(layers)],
    )
    expected = reference_session.run(layers, {"image": scaled(images)})
    for layer, reference in zip(layers, expected, strict=True):
        np.testing.assert_array_equal(result.as_numpy(layer), reference)


def test_all_outputs_when_none_requested(
    triton_client: triton.InferenceServerClient, served: dict[str, Any], images: np.ndarray
) -> None:
    result = triton_client.infer(served["name"], [image_input(scaled(images), "FP32")])  # binary_data_output
    for output in served["outputs"]:
        assert list(result.as_numpy(output["name"]).shape) == [N, *output["shape"][1:]]
    # And the derived outputs, as tritonclient decodes them (BOOL included).
    flags, scores = result.as_numpy("in_distribution"), result.as_numpy("ood_score")
    assert flags.dtype == np.bool_ and scores.shape == (N,) and flags.sum() >= N - 1  # 95 % of garments pass
    np.testing.assert_array_equal(flags, scores <= served["out_of_distribution"]["threshold"])
    for method in ("gradcam", "layercam"):
        assert result.as_numpy(method).shape == (N, 28, 28)


@pytest.mark.parametrize("binary", [True, False])
def test_classification(
    triton_client: triton.InferenceServerClient,
    served: dict[str, Any],
    images: np.ndarray,
    reference_session: ort.InferenceSession,
    binary: bool,
) -> None:
    result = triton_client.infer(
        served["name"],
        [image_input(scaled(images), "FP32")],
        outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)],
    )
    classes = result.as_numpy("probabilities")
    assert classes.shape == (N, 3)
    expected = reference_probabilities(reference_session, images)
    for row, entries in enumerate(classes):
        parsed = [(e.decode() if isinstance(e, bytes) else e).split(":", 2) for e in entries]
        indexes = [int(index) for _, index, _ in parsed]
        assert indexes == list(np.argsort(-expected[row], kind="stable")[:3])
        assert [np.float32(score) for score, _, _ in parsed] == [expected[row][i] for i in indexes]
        assert [label for _, _, label in parsed] == [served["classes"][i] for i in indexes]


@pytest.mark.parametrize("shape", ["[N]", "[N, 1]"])
def test_png_files_as_bytes(
    triton_client: triton.InferenceServerClient,
    served: dict[str, Any],
    images: np.ndarray,
    reference_session: ort.InferenceSession,
    shape: str,
) -> None:
    files = np.array([png_bytes(image) for image in images], dtype=np.object_)
    if shape == "[N, 1]":
        files = files.reshape(N, 1)
    result = triton_client.infer(served["name"], [image_input(files, "BYTES")])
    # A 28x28 Fashion-MNIST PNG goes through preprocessing untouched: exactly pixels / 255.
    np.testing.assert_array_equal(result.as_numpy("probabilities"), reference_probabilities(reference_session, images))


@pytest.mark.parametrize("binary", [True, False])
def test_uint8_pixels(
    triton_client: triton.InferenceServerClient,
    served: dict[str, Any],
    images: np.ndarray,
    reference_session: ort.InferenceSession,
    binary: bool,
) -> None:
    result = triton_client.infer(
        served["name"],
        [image_input(images, "UINT8", binary)],
        outputs=[triton.InferRequestedOutput("probabilities")],
    )
    np.testing.assert_array_equal(result.as_numpy("probabilities"), reference_probabilities(reference_session, images))


def test_compressed_request(
    triton_client: triton.InferenceServerClient,
    served: dict[str, Any],
    images: np.ndarray,
    reference_session: ort.InferenceSession,
) -> None:
    for algorithm in ("gzip", "deflate"):
        result = triton_client.infer(
            served["name"],
            [image_input(scaled(images), "FP32")],
            outputs=[triton.InferRequestedOutput("probabilities")],
            request_compression_algorithm=algorithm,
        )
        expected = reference_probabilities(reference_session, images)
        np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)


def test_bad_requests_raise_with_the_servers_message(
    triton_client: triton.InferenceServerClient, served: dict[str, Any], images: np.ndarray
) -> None:
    name = served["name"]
    with pytest.raises(InferenceServerException) as caught:
        triton_client.infer(name, [image_input(scaled(images) * 2, "FP32")])
    assert caught.value.status() == "400"
    assert "[0, 1]" in caught.value.message()

    with pytest.raises(InferenceServerException) as caught:
        triton_client.infer(name, [image_input(scaled(images), "FP32")], outputs=[triton.InferRequestedOutput("nope")])
    assert caught.value.status() == "400"
    assert "'nope'" in caught.value.message()

    files = np.array([png_bytes(images[0]), b"not an image"], dtype=np.object_)
    with pytest.raises(InferenceServerException) as caught:
        triton_client.infer(name, [image_input(files, "BYTES")])
    assert caught.value.status() == "400"
    assert "element 1" in caught.value.message()

    with pytest.raises(InferenceServerException) as caught:
        triton_client.infer("no-such-model", [image_input(scaled(images), "FP32")])
    assert caught.value.status() == "404"

    # and it still answers
    assert triton_client.infer(name, [image_input(scaled(images), "FP32")]).as_numpy("probabilities").shape == (
        N,
        10,
    )
