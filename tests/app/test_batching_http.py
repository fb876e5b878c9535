"""The adaptive batcher behind the app: concurrent requests share session runs; the plain endpoints in
front of it answer every request as before, errors included."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import httpx

from service.app import create_app
from service.batching import Batcher
from service.model import Model
from tests.support import make_settings, png_bytes, reference_probabilities
from tests.support import run_bounded as run


def test_concurrent_http_requests_share_session_runs(test_split, reference_session) -> None:  # type: ignore[no-untyped-def]
    app = create_app(make_settings(batch_max_size=16, batch_max_delay_ms=0))
    pictures = test_split.images[:48]
    want = reference_probabilities(reference_session, pictures)

    async def main() -> tuple[list[httpx.Response], Batcher]:
        async with app.router.lifespan_context(app):
            batcher: Batcher = app.state.dataplane.batcher()  # the default model's
            sizes: list[int] = []
            batcher.observers.append(lambda size, queued, seconds: sizes.append(size))
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                calls: list[Awaitable[httpx.Response]] = [
                    client.post("/v1/predict", files={"file": ("x.png", png_bytes(p), "image/png")}) for p in pictures
                ]
                responses = await asyncio.gather(*calls)
            assert max(sizes) > 1 and max(sizes) <= 16, sizes
            return responses, batcher

    responses, batcher = run(main)
    assert batcher.stats.batches < len(pictures)
    for response, probabilities in zip(responses, want, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["probabilities"] == probabilities.tolist()


# ---- the request path in front of the batcher ----------------------------------------------------


def test_plain_endpoints_answer_through_one_path(test_split, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """/v1/predict and /v1/predict/batch are plain endpoints (service/api/endpoints.py): one handler each,
    the same in tests and in production, whatever dependency overrides the app has. Every request asks the
    data plane for its model once, and the answers (errors included) are the same bytes with or without an
    override present."""
    from fastapi.testclient import TestClient

    from service.api.deps import get_settings
    from service.dataplane import DataPlane

    calls: list[str] = []
    model_lookup = DataPlane.model

    def counted_model(self: DataPlane, *args: Any, **kwargs: Any) -> Model:
        calls.append("model")
        return model_lookup(self, *args, **kwargs)

    monkeypatch.setattr(DataPlane, "model", counted_model)
    pngs = [png_bytes(p) for p in test_split.images[:3]]
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/v1/predict", {"files": {"file": ("a.png", pngs[0], "image/png")}}),
        ("/v1/predict?top_k=10&feature_maps=true", {"files": {"file": ("a.png", pngs[1])}}),
        ("/v1/predict?top_k=0&feature_maps=perhaps", {"files": {"file": ("a.png", pngs[1])}}),
        ("/v1/predict", {"content": pngs[2], "headers": {"content-type": "image/png"}}),
        ("/v1/predict", {"files": {"other": ("a.png", pngs[0])}}),
        ("/v1/predict/batch?top_k=2", {"files": [("files", (f"{i}.png", p)) for i, p in enumerate(pngs)]}),
        ("/v1/predict/batch?top_k=lots", {"files": [("files", ("x.png", pngs[0]))]}),
        ("/v1/predict/batch", {"files": [("files", ("é.png", pngs[0])), ("files", ("bad.png", b"junk"))]}),
    ]
    app = create_app(make_settings())
    with TestClient(app) as client:
        calls.clear()  # the app's startup looked the model up too
        plain = [client.post(path, **kwargs) for path, kwargs in cases]
        looked_up = len(calls)
        app.dependency_overrides[get_settings] = get_settings  # changes nothing for these endpoints
        overridden = [client.post(path, **kwargs) for path, kwargs in cases]
        assert len(calls) == 2 * looked_up
    # One lookup per request that got past its query parameters (the two 422s never reach the handler).
    assert looked_up == len(cases) - 2
    for (path, _), a, b in zip(cases, plain, overridden, strict=True):
        assert (a.status_code, a.headers["content-type"], a.content) == (
            b.status_code,
            b.headers["content-type"],
            b.content,
        ), path
    assert [r.status_code for r in plain] == [200, 200, 422, 200, 400, 200, 422, 200]
