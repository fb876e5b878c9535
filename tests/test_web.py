"""The web page: its router in-process, then the real page end to end in headless Chromium.

Until service/app.py includes service.api.web.router, these tests add it themselves: the in-process
app gets it with include_router, and the browser test starts its own server process built the same
way as `python -m service` plus the router."""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service import imaging
from service.app import create_app
from service.model import Card
from tests.conftest import (
    ROOT,
    make_settings,
    model_folder,
    png_bytes,
    reference_probabilities,
)

WEB_DIR = ROOT / "service" / "web"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Without these, Chromium's own background connections are refused on a closed network and slow it down.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = ROOT / "test-artifacts"


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


def test_page_uses_nothing_from_elsewhere() -> None:
    for path in WEB_DIR.iterdir():
        text = path.read_text()
        # No absolute or protocol-relative URL: no CDN, no web fonts, no analytics.
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path
        assert "@import" not in text and "@font-face" not in text, path


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


# ---------------------------------------------------------------------------------------------
# End to end in a real browser


def playwright_api() -> object:
    """Playwright's sync API, driving Debian's Chromium (never a downloaded browser). The test command
    installs both; a missing piece fails the test with what to install."""
    missing = None
    try:
        from playwright import sync_api
    except ImportError:
        missing = "the playwright package is not installed"
    if missing is None and not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        missing = f"{CHROMIUM} not found (apt-get install chromium)"
    if missing:
        pytest.fail(missing)
    return sync_api


def test_page_classifies_an_upload_end_to_end(live_server: str, tmp_path, test_split, reference_session) -> None:  # type: ignore[no-untyped-def]
    sync_api = playwright_api()
    index = 0
    expected = Card.read(model_folder()).classes[
        int(reference_probabilities(reference_session, test_split.images[index : index + 1])[0].argmax())
    ]
    layers = [o["name"] for o in Card.read(model_folder()).outputs if o.get("kind") == "feature_map"]
    good = tmp_path / "test-image-0.png"
    good.write_bytes(png_bytes(test_split.images[index]))
    # A product-photo-like image: dark garment on white, large; the page shows what the model sees.
    photo = tmp_path / "photo-of-trousers.jpg"
    Image.fromarray(255 - test_split.images[2]).resize((240, 240), Image.Resampling.BICUBIC).save(photo, quality=92)
    broken = tmp_path / "not-a-picture.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a PNG")

    outside: list[str] = []
    page_errors: list[str] = []
    with sync_api.sync_playwright() as playwright:  # type: ignore[attr-defined]
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            local = (live_server + "/", "blob:", "data:")
            page.on("request", lambda r: None if r.url.startswith(local) else outside.append(r.url))
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.on("console", lambda m: page_errors.append(m.text) if m.type == "error" else None)
            page.goto(live_server + "/")
            expect = sync_api.expect  # type: ignore[attr-defined]
            expect(page.locator("#model-info")).to_contain_text(model_folder().parent.name)

            # The broken file first: results are listed newest first, so the real image ends on top.
            page.set_input_files("#files", [str(broken)])
            rejected = page.locator(f'.result[data-file="{broken.name}"]')
            expect(rejected).to_have_attribute("data-state", "error", timeout=30_000)
            expect(rejected.get_by_role("alert")).to_contain_text("corrupt PNG")
            page.set_input_files("#files", [str(photo), str(good)])

            card = page.locator(f'.result[data-file="{good.name}"]')
            expect(card).to_have_attribute("data-state", "done", timeout=60_000)
            expect(card.locator(".verdict .label")).to_have_text(expected)
            expect(card.locator(".bar.top .bar-label")).to_have_text(expected)
            assert card.locator(".bar").count() == 10
            assert card.locator(".model-input").evaluate("img => img.naturalWidth") == 28
            for layer in layers:
                image = card.locator(f'img.fmap[data-layer="{layer}"]')
                assert image.evaluate("img => img.complete && img.naturalWidth") > 0, layer
            expect(page.locator(f'.result[data-file="{photo.name}"]')).to_have_attribute(
                "data-state", "done", timeout=60_000
            )
            expect(page.locator("#status")).to_contain_text("2 classified · 1 rejected")

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "web.png"), full_page=True)
        finally:
            browser.close()
    assert outside == [], f"the page fetched from elsewhere: {outside}"
    assert [e for e in page_errors if "400" not in e] == [], page_errors  # the rejected upload logs its 400
