"""The real web page and the API documentation end to end in headless Chromium (Debian's, driven by
Playwright), served by a real `python -m service` process with an API key, with every request that does not
go to that server aborted: the pages must work with no network at all.

The page: it asks for the key (kept in sessionStorage), uploads each image once, draws the model input and
every channel of every conv layer from that one answer, and enlarges a channel on click. A screenshot at
desktop width is kept in test-artifacts/web.png. The docs: /docs (Swagger UI, with Authorize sending the
key) and /redoc render from the service's own files."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from service.model import Card
from tests.support import ROOT, model_folder, reference_probabilities, running_server
from training.ood_sets import uniform_noise

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Without these, Chromium's own background connections are refused on a closed network and slow it down.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = ROOT / "test-artifacts"
EXAMPLES = ROOT / "examples"
KEY = "browser-test-key"
DESKTOP = {"width": 1440, "height": 900}


def playwright_api() -> Any:
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


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(tmp_path_factory.mktemp("browser"), api_key=KEY) as server:
        yield server.url


class Offline:
    """A browser context in which only `url` answers: every other request is aborted and recorded."""

    def __init__(self, browser: Any, url: str) -> None:
        self.url = url
        self.outside: list[str] = []
        self.errors: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.context = browser.new_context(viewport=DESKTOP)
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("request", lambda r: self.requests.append((r.method, r.url.removeprefix(url))))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)

    def _route(self, route: Any) -> None:
        if route.request.url.startswith(self.url + "/"):
            route.continue_()
        else:
            self.outside.append(route.request.url)
            route.abort()


@pytest.fixture(scope="module")
def browser(keyed_server: str) -> Iterator[Any]:
    sync_api = playwright_api()
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def test_page_asks_for_the_key_and_classifies_each_image_with_one_upload(  # type: ignore[no-untyped-def]
    browser, keyed_server, tmp_path, test_split, reference_session
) -> None:
    expect = playwright_api().expect
    card_info = Card.read(model_folder())
    channels_of = {o.name: o.shape[-1] for o in card_info.outputs if o.kind == "feature_map"}
    good = EXAMPLES / "ankle-boot.png"  # test image 0, as the data set has it
    expected = card_info.classes[int(reference_probabilities(reference_session, test_split.images[:1])[0].argmax())]
    photo = EXAMPLES / "photo-trouser.png"  # a shop photo: dark garment on white, large, in colour
    broken = tmp_path / "not-a-picture.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a PNG")

    offline = Offline(browser, keyed_server)
    page = offline.page
    page.goto(keyed_server + "/")  # the page itself needs no key
    # The API does: the page says so and shows the key field.
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#key-note")).to_contain_text("needs an API key")
    page.fill("#api-key", "not-the-key")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-note")).to_contain_text("refused this key")
    page.fill("#api-key", KEY)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#model-info")).to_contain_text(model_folder().parent.name)
    expect(page.locator("#key-note")).to_contain_text("kept for this tab only")
    assert page.evaluate("sessionStorage.getItem('fashion-serve.api-key')") == KEY
    assert page.evaluate("localStorage.length") == 0

    # The broken file first: results are listed newest first, so the real image ends on top.
    page.set_input_files("#files", [str(broken)])
    rejected = page.locator(f'.result[data-file="{broken.name}"]')
    expect(rejected).to_have_attribute("data-state", "error", timeout=30_000)
    expect(rejected.get_by_role("alert")).to_contain_text("corrupt PNG")
    page.set_input_files("#files", [str(photo), str(good)])
    card = page.locator(f'.result[data-file="{good.name}"]')
    expect(card).to_have_attribute("data-state", "done", timeout=60_000)
    expect(page.locator(f'.result[data-file="{photo.name}"]')).to_have_attribute("data-state", "done", timeout=60_000)
    expect(page.locator(f'.result[data-file="{photo.name}"] .verdict .label')).to_have_text("Trouser")
    expect(card.locator(".verdict .label")).to_have_text(expected)
    expect(card.locator(".bar.top .bar-label")).to_have_text(expected)
    expect(page.locator("#status")).to_contain_text("2 classified · 1 rejected")
    assert card.locator(".bar").count() == 10

    # One prediction per image: the input and the maps come from the same answer; then, for each image that
    # was classified, one explanation overlay per method the model offers.
    posts = [path for method, path in offline.requests if method == "POST"]
    explains = [f"/v1/explain?format=png&method={m}" for m in ("layercam", "occlusion")] * 2
    assert sorted(posts) == sorted(["/v1/predict?top_k=10&feature_maps=true&input=true"] * 3 + explains), posts
    # The model input drawn on the page is the image's own pixels (a data set image passes unchanged).
    drawn = card.locator("canvas.model-input").evaluate(
        "c => Array.from(c.getContext('2d').getImageData(0, 0, 28, 28).data.filter((_, i) => i % 4 === 0))"
    )
    np.testing.assert_array_equal(np.array(drawn, np.uint8).reshape(28, 28), test_split.images[0])

    # Every channel of every layer is a tile of its own, big enough to see.
    for layer, channels in channels_of.items():
        assert card.locator(f'.tile[data-layer="{layer}"]').count() == channels, layer
    tile = card.locator('.tile[data-layer="conv2"][data-channel="5"]')
    box = tile.bounding_box()
    assert box is not None and box["width"] >= 40, box
    # A click enlarges it, with its layer and channel number.
    tile.click()
    zoom = card.locator(".zoom")
    expect(zoom).to_be_visible()
    expect(zoom.locator(".zoom-caption")).to_contain_text("conv2 · channel 5 (of 0–63)")
    zoomed = zoom.locator("canvas").bounding_box()
    assert zoomed is not None and zoomed["width"] >= 250, zoomed
    assert tile.get_attribute("aria-pressed") == "true"
    pixels = "c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)"
    assert zoom.locator("canvas").evaluate(pixels) == tile.locator("canvas").evaluate(pixels)  # the same channel
    # The card uses the width of a desktop screen.
    width = card.bounding_box()
    assert width is not None and width["width"] > 0.9 * (DESKTOP["width"] - 60), width

    # The explanation overlays beside the prediction (224×224 PNGs from /v1/explain); a garment gets no notice.
    for method in ("layercam", "occlusion"):
        overlay = card.locator(f'.explain-figure[data-method="{method}"] img')
        expect(overlay).to_be_visible()
        assert overlay.evaluate("i => i.naturalWidth") == 224
    expect(card.locator(".ood-notice")).to_be_hidden()
    # Noise is not a garment, whatever label it gets: the card says so.
    noise = tmp_path / "noise.png"
    noise.write_bytes(uniform_noise(1)[0])
    page.set_input_files("#files", [str(noise)])
    flagged = page.locator('.result[data-file="noise.png"]')
    expect(flagged).to_have_attribute("data-state", "done", timeout=60_000)
    expect(flagged.locator(".ood-notice")).to_contain_text("does not look like a garment")
    assert flagged.get_attribute("data-in-distribution") == "false"

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web.png"), full_page=True)
    offline.context.close()
    assert offline.outside == [], f"the page asked for things elsewhere: {offline.outside}"
    unexpected = [e for e in offline.errors if "400" not in e and "401" not in e]  # the 400 and 401s it was shown
    assert unexpected == [], offline.errors


def test_docs_work_offline_and_send_the_key_given_to_authorize(browser, keyed_server) -> None:  # type: ignore[no-untyped-def]
    expect = playwright_api().expect
    offline = Offline(browser, keyed_server)
    page = offline.page

    page.goto(keyed_server + "/docs")
    expect(page.locator(".swagger-ui .opblock").first).to_be_visible(timeout=30_000)
    assert page.locator(".swagger-ui .opblock").count() >= 10
    # Authorize with the key, then try an API route from the page.
    page.click(".swagger-ui .auth-wrapper button.authorize")
    dialog = page.locator(".swagger-ui .dialog-ux .modal-ux")
    expect(dialog).to_be_visible()
    dialog.locator("input").first.fill(KEY)
    dialog.locator(".auth-btn-wrapper button.authorize").first.click()
    dialog.locator("button.btn-done").first.click()
    operation = page.locator(".opblock-get:has([data-path='/v1/models'])").first
    operation.locator(".opblock-summary").first.click()
    operation.locator("button.try-out__btn").click()
    operation.locator("button.execute").click()
    status = operation.locator(".live-responses-table tbody .response-col_status").first
    expect(status).to_have_text("200", timeout=30_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "docs.png"))

    page.goto(keyed_server + "/redoc")
    expect(page.get_by_role("heading", name="Fashion-MNIST serving", exact=False).first).to_be_visible(timeout=30_000)
    expect(page.get_by_role("heading", name="Classify one image", exact=False).first).to_be_attached()
    offline.context.close()
    assert offline.outside == [], f"the documentation asked for things elsewhere: {offline.outside}"
    assert offline.errors == [], offline.errors
