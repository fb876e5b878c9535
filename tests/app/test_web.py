"""The web page's router in-process: the page and its files, and /v1/preprocess.

The page's files on their own are checked in tests/unit/test_web_files.py, the real page end to end in
headless Chromium in tests/process/test_browser.py."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service import imaging
from service.app import create_app
from tests.support import ROOT, make_settings, png_bytes

WEB_DIR = ROOT / "service" / "web"


@pytest.fixture(scope="module")
def web_client() -> Iterator[TestClient]:
    with TestClient(create_app(make_settings()), raise_server_exceptions=False) as client:
        yield client


def test_page_and_its_files_are_served(web_client: TestClient) -> None:
    page = web_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/web/app.js" defer></script>' in page.text
    assert '<link rel="stylesheet" href="/web/style.css">' in page.text
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        response = web_client.get(f"/web/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert response.content == (WEB_DIR / name).read_bytes()
    for path in ("/web/index.html.bak", "/web/..%2Fscore.py", "/web/%2e%2e/app.py", "/web/"):
        response = web_client.get(path)
        assert response.status_code == 404 and "error" in response.json(), path


def test_preprocess_returns_the_servers_model_input(web_client: TestClient, test_split) -> None:  # type: ignore[no-untyped-def]
    # A Fashion-MNIST image passes through unchanged; a "photo" (dark garment on white, large) is
    # trimmed, scaled and negated: both must come back exactly as imaging.preprocess makes them.
    photo = Image.fromarray(255 - test_split.images[3]).resize((200, 200), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=92)
    for data in (png_bytes(test_split.images[0]), buffer.getvalue()):
        response = web_client.post("/v1/preprocess", files={"file": ("x", data, "application/octet-stream")})
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.content == imaging.input_png(imaging.preprocess(data))
        assert Image.open(io.BytesIO(response.content)).size == (28, 28)
    # The raw body works as for /v1/predict; a data set image comes back pixel for pixel.
    pixels = test_split.images[0]
    raw = web_client.post("/v1/preprocess", content=png_bytes(pixels), headers={"content-type": "image/png"})
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(raw.content))), pixels)


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"files": {"file": ("a.png", b"\x89PNG\r\n\x1a\nbroken", "image/png")}}, 400, "corrupt PNG"),
        ({"files": {"file": ("a.pdf", b"%PDF-1.4 ...", "application/pdf")}}, 415, "PDF documents are not accepted"),
        ({"files": {"other": ("a.png", b"x", "image/png")}}, 400, "multipart field 'file' is missing"),
        ({"content": b"{}", "headers": {"content-type": "application/json"}}, 415, "unsupported content type"),
    ],
)
def test_preprocess_errors_are_json(web_client: TestClient, kwargs, status, message) -> None:  # type: ignore[no-untyped-def]
    response = web_client.post("/v1/preprocess", **kwargs)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_preprocess_is_in_the_openapi_document(web_client: TestClient) -> None:
    paths = web_client.get("/openapi.json").json()["paths"]
    assert "image/png" in paths["/v1/preprocess"]["post"]["responses"]["200"]["content"]
    assert "/" not in paths and "/web/{name}" not in paths
