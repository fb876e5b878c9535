"""What a new user meets first, in-process: the documentation pages with no network, the pages reachable
without the API key that the API routes need, bodies recognised by their bytes, arrays sent to the
single-image route pointed to the batch route, and /v1/predict's `input` flag that the web page uses."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api import docs
from service.app import create_app
from tests.support import MODEL, make_settings, png_bytes

KEY = "first-use-key"


@pytest.fixture(scope="module")
def keyed() -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(api_key=KEY)), raise_server_exceptions=False) as client:
        yield client


def local_urls(html: str) -> list[str]:
    """Every src/href/url the page names; each must be a path on this server."""
    return re.findall(r"""(?:src|href)=["']([^"']+)["']|url:\s*["']([^"']+)["']""", html)


@pytest.mark.parametrize("path", [docs.DOCS, docs.REDOC])
def test_docs_pages_need_no_network(client: TestClient, path: str) -> None:
    page = client.get(path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://", page.text), "the page names an outside address"
    named = [a or b for a, b in local_urls(page.text)]
    assert named and all(u.startswith("/") for u in named), named
    for url in named:
        response = client.get(url)
        assert response.status_code == 200, url
        assert len(response.content) > 1000 or url == docs.OPENAPI, url
    if path == docs.DOCS:
        assert '"validatorUrl": null' in page.text  # no badge fetched from the online validator
    else:  # ReDoc's sidebar logo would come from a CDN: the served file names none
        assert b"cdn.redoc.ly" not in client.get(docs.ASSETS + "redoc.standalone.js").content
    assert client.get(docs.ASSETS + "../core.py").status_code == 404
    assert client.get(docs.ASSETS + "core.py").status_code == 404


def test_pages_open_and_api_closed_with_a_key(keyed: TestClient) -> None:
    for path in ("/", "/web/app.js", "/web/style.css", *sorted(docs.PUBLIC_PATHS)):
        assert keyed.get(path).status_code == 200, path
        assert keyed.head(path).status_code in (200, 405), path  # never 401
    for path in ("/v1/models", f"/v1/models/{MODEL}", "/v2", f"/v2/models/{MODEL}", "/docs/", "/web/app.js/x"):
        assert keyed.get(path).status_code == 401, path
    assert keyed.post("/", content=b"x").status_code == 401
    assert keyed.post("/v1/predict", content=png_bytes(np.zeros((28, 28), np.uint8))).status_code == 401
    assert keyed.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_openapi_declares_the_key_only_when_one_is_set(client: TestClient, keyed: TestClient) -> None:
    plain = client.get("/openapi.json").json()
    assert "security" not in plain and "securitySchemes" not in plain.get("components", {})
    secured = keyed.get("/openapi.json").json()
    assert secured["components"]["securitySchemes"] == docs.SECURITY_SCHEMES
    assert secured["security"] == [{"bearer": []}, {"apiKey": []}]
    assert secured["paths"]["/healthz"]["get"]["security"] == []
    assert "security" not in secured["paths"]["/v1/predict"]["post"]  # the document-wide requirement holds


def test_a_body_that_is_an_image_is_read_as_one_whatever_its_type(client: TestClient, test_split) -> None:  # type: ignore[no-untyped-def]
    png = png_bytes(test_split.images[0])
    want = client.post("/v1/predict", content=png, headers={"content-type": "image/png"}).json()
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {"content-type": content_type} if content_type else {}
        response = client.post("/v1/predict", content=png, headers=headers)
        assert response.status_code == 200, (content_type, response.text)
        assert response.json()["probabilities"] == want["probabilities"]
    refused = client.post("/v1/predict", content=b"file=hello", headers={"content-type": "text/plain"})
    assert refused.status_code == 415 and "no known image format" in refused.json()["error"]


def test_an_array_sent_to_the_single_image_route_names_the_batch_route(client: TestClient) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 28, 28), np.uint8))
    npy = buffer.getvalue()
    buffer = io.BytesIO()
    np.savez(buffer, images=np.zeros((2, 28, 28), np.uint8))
    npz = buffer.getvalue()
    for path in ("/v1/predict", "/v1/feature-maps", "/v1/preprocess"):
        for request in (
            {"content": npy},
            {"content": npy, "headers": {"content-type": "application/x-npy"}},
            {"content": npz, "headers": {"content-type": "application/octet-stream"}},
            {"files": {"file": ("images.npy", npy, "application/octet-stream")}},
            {"files": {"file": ("images.npz", npz, "application/zip")}},
        ):
            response = client.post(path, **request)  # type: ignore[arg-type]
            assert response.status_code == 415, (path, request.get("headers"), response.text)
            assert "/v1/predict/batch" in response.json()["error"]


def test_predict_input_flag_returns_what_the_model_saw(client: TestClient, test_split) -> None:  # type: ignore[no-untyped-def]
    pixels = test_split.images[3]
    files = {"file": ("x.png", png_bytes(pixels), "image/png")}
    plain = client.post("/v1/predict", files=files).json()
    assert "input" not in plain
    body = client.post("/v1/predict", files=files, params={"input": "true", "top_k": 10}).json()
    assert body["input"]["shape"] == [28, 28, 1]
    np.testing.assert_array_equal(np.array(body["input"]["data"], np.float32)[..., 0], pixels / np.float32(255))
    assert body["probabilities"] == plain["probabilities"] and len(body["top_k"]) == 10
    both = client.post("/v1/predict", files=files, params={"input": "true", "feature_maps": "true"}).json()
    assert both["input"] == body["input"] and set(both["feature_maps"]) >= {"conv1"}
    assert both["probabilities"] == plain["probabilities"]
    operation = client.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]
    assert "input" in {p["name"] for p in operation["parameters"]}
