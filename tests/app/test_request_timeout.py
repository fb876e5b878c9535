"""The request timeout in-process: a caller cut off by the limit leaves the batcher working."""

from __future__ import annotations

import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.support import PREDICT, good_png, make_settings


def test_timeout_cancels_a_batcher_caller_and_the_batcher_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process: the model made slow, a request past the limit gets 504 while its batch still runs;
    the batcher skips the abandoned future and serves the next request."""
    app = create_app(make_settings(request_timeout_s=0.3))  # create_app installs the middleware from the setting
    with TestClient(app, raise_server_exceptions=False) as client:
        model = app.state.dataplane.model()
        real_run = model.run

        def slow_run(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.8)
            return real_run(*args, **kwargs)

        monkeypatch.setattr(model, "run", slow_run)
        timed_out = client.post(PREDICT, content=good_png(), headers={"Content-Type": "image/png"})
        assert timed_out.status_code == 504 and "error" in timed_out.json()
        monkeypatch.setattr(model, "run", real_run)
        time.sleep(0.8)  # the abandoned batch finishes in its thread
        assert client.post(PREDICT, content=good_png(), headers={"Content-Type": "image/png"}).status_code == 200
