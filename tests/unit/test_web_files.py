"""The web page's own files (service/web/), read from disk: nothing fetched from elsewhere."""

from __future__ import annotations

import re

from tests.support import ROOT

WEB_DIR = ROOT / "service" / "web"


def test_page_uses_nothing_from_elsewhere() -> None:
    for path in WEB_DIR.iterdir():
        text = path.read_text()
        # No absolute or protocol-relative URL: no CDN, no web fonts, no analytics.
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path
        assert "@import" not in text and "@font-face" not in text, path
