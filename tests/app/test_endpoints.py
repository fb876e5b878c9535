"""The plain endpoints (service/api/endpoints.py): every error raised inside one reaches the client exactly
as the same error raised inside an ordinary FastAPI route does; their query parameters are validated by
their one parameter model, as FastAPI would; and the OpenAPI document describes them from that model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from PIL import Image
from starlette.exceptions import HTTPException

from service.api.endpoints import Endpoint
from service.app import ENDPOINTS, create_app
from service.errors import BadInput, NotFound, NotReady, ServiceError, TooLarge, UnsupportedMedia
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MODEL = "fashion-mnist-cnn"

# Each kind of exception a handler can raise, made fresh for every request.
RAISED: dict[str, Callable[[], Exception]] = {
    "bad-input": lambda: BadInput("bad input here"),
    "not-found": lambda: NotFound("no such thing"),
    "too-large": lambda: TooLarge("too large"),
    "unsupported": lambda: UnsupportedMedia("not a type we read"),
    "not-ready": lambda: NotReady("not ready yet"),
    "other-status": lambda: ServiceError("a teapot", 418),
    "http-exception": lambda: HTTPException(409, "conflict", headers={"X-Why": "because"}),
    "validation": lambda: RequestValidationError([{"loc": ("query", "x"), "msg": "bad x", "type": "value_error"}]),
    "unexpected": lambda: RuntimeError("a bug"),
}


def concrete(path: str) -> str:
    return path.replace("{name}", MODEL).replace("{version}", "1")


@pytest.fixture(scope="module")
def app_client() -> Iterator[TestClient]:
    settings = Settings(models=ROOT / "models", model=MODEL, providers=["cpu"])
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize("kind", list(RAISED))
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.path)
def test_errors_inside_a_plain_endpoint_match_a_fastapi_route(
    app_client: TestClient, endpoint: Endpoint, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every handler asks the data plane for its model first (the repository API's read their small JSON body
    first); GET /v1/models (a FastAPI route with its dependency) asks for a model too. The same exception
    raised there must give the same status, headers and body."""
    from service.api import repository

    plane = app_client.app.state.dataplane  # type: ignore[attr-defined]

    def raising(*_: object, **__: object) -> object:
        raise RAISED[kind]()

    monkeypatch.setattr(plane, "model", raising)
    monkeypatch.setattr(repository, "_json_object", raising)
    through_fastapi = app_client.get("/v1/models")
    through_plain = app_client.post(concrete(endpoint.path), content=b"x", headers={"content-type": "image/png"})
    assert through_plain.status_code == through_fastapi.status_code
    assert through_plain.content == through_fastapi.content
    assert through_plain.headers["content-type"] == through_fastapi.headers["content-type"] == "application/json"
    assert through_plain.headers.get("x-why") == through_fastapi.headers.get("x-why")
    assert through_plain.json()["error"]
    raised = RAISED[kind]()
    expected = (
        raised.status_code if isinstance(raised, ServiceError | HTTPException) else 422 if kind == "validation" else 500
    )
    assert through_plain.status_code == expected


def test_query_parameters_are_validated_by_the_endpoints_model(app_client: TestClient) -> None:
    buffer = BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buffer, format="PNG")
    files = {"file": ("a.png", buffer.getvalue(), "image/png")}
    ok = app_client.post("/v1/predict?top_k=2&feature_maps=false&unknown=1", files=files)
    assert ok.status_code == 200 and len(ok.json()["top_k"]) == 2
    bad = app_client.post("/v1/predict?top_k=0&feature_maps=perhaps", files=files)
    assert bad.status_code == 422
    assert [d["loc"] for d in bad.json()["detail"]] == [["query", "top_k"], ["query", "feature_maps"]]
    assert bad.json()["error"].startswith("invalid request: query.top_k: ")
    maps = app_client.post("/v1/feature-maps?format=jpeg", files=files)
    assert maps.status_code == 422 and maps.json()["detail"][0]["loc"] == ["query", "format"]


def test_openapi_documents_each_plain_endpoint_from_its_parameter_model(app_client: TestClient) -> None:
    document = app_client.get("/openapi.json").json()
    for endpoint in ENDPOINTS:
        operation = document["paths"][endpoint.path]["post"]
        documented = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
        assert documented == set(endpoint.params.model_fields)
        assert "requestBody" in operation and operation["summary"] == endpoint.summary
        # The statuses the middleware can answer on any route are declared here too, as on FastAPI's routes.
        assert {"401", "431", "503", "504"} <= set(operation["responses"])
    top_k = next(p for p in document["paths"]["/v1/predict"]["post"]["parameters"] if p["name"] == "top_k")
    assert top_k["schema"] | {"title": None} == {"type": "integer", "minimum": 1, "maximum": 10, "default": 3} | {
        "title": None
    }
    prediction = document["paths"]["/v1/predict"]["post"]["responses"]["200"]["content"]["application/json"]
    assert prediction["schema"] == {"$ref": "#/components/schemas/Prediction"}
    assert "ClassScore" in document["components"]["schemas"]
