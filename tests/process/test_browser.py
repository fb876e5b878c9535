"""The real web page end to end in headless Chromium (Debian's, driven by Playwright), served by a real
`python -m service` process."""

from __future__ import annotations

import os
import shutil

import pytest
from PIL import Image

from service.model import Card
from tests.support import ROOT, model_folder, png_bytes, reference_probabilities

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Without these, Chromium's own background connections are refused on a closed network and slow it down.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = ROOT / "test-artifacts"


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
    layers = Card.read(model_folder()).outputs_of("feature_map")
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
