"""Provider fallback as the app reports it: /readyz and the model metadata."""

from __future__ import annotations

import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.support import make_settings

CPU = "CPUExecutionProvider"


def test_cuda_fallback_is_reported_in_readyz_and_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a CPU-only build of onnxruntime, whatever this machine has.
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    with TestClient(create_app(make_settings(providers=["cuda", "cpu"]))) as c:
        ready = c.get("/readyz").json()
        assert ready["providers"] == [CPU]
        assert any("CUDAExecutionProvider" in w for w in ready["warnings"])
        meta = c.get("/v1/models").json()["models"][0]["providers"]
        assert meta["requested"] == ["cuda", "cpu"] and meta["in_use"] == [CPU] and meta["warnings"]
