"""Triton's model repository extension (POST /v2/repository/index, /v2/repository/models/{name}/load and
/unload) and its statistics extension (GET /v2/models[/{name}[/versions/{version}]]/stats), with the paths,
bodies and answers tritonclient's get_model_repository_index, load_model, unload_model and
get_inference_statistics use. HTTP only: the work is the model repository's (service/repository.py), reached
through the data plane."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from service.api.deps import DataPlaneDep, get_dataplane
from service.api.endpoints import Endpoint, OpenAPIResponses, Params
from service.api.schemas import ErrorBody
from service.api.uploads import read_body
from service.errors import BadInput

router = APIRouter(prefix="/v2", tags=["repository"])

MAX_BODY_BYTES = 64 * 1024  # these bodies are a few parameters

ENTRY_SCHEMA = {
    "type": "object",
    "required": ["name", "state", "reason"],
    "properties": {
        "name": {"type": "string"},
        "version": {"type": "string", "description": "Absent for a model with no version known."},
        "state": {"type": "string", "enum": ["READY", "LOADING", "UNLOADING", "UNAVAILABLE"]},
        "reason": {"type": "string", "description": "Why it is not READY (a failed load's reason), or empty."},
    },
}
TOO_LARGE: OpenAPIResponses = {413: {"model": ErrorBody, "description": "Body over 64 KiB"}}
CONTROL_ERRORS: OpenAPIResponses = {
    **TOO_LARGE,
    400: {"model": ErrorBody, "description": "Bad body, or a version failed to load (what was served still is)"},
    403: {"model": ErrorBody, "description": "The repository API is turned off (setting repository_api)"},
    404: {"model": ErrorBody, "description": "No such model in the repository"},
    409: {"model": ErrorBody, "description": "This server cannot serve that model (setting model)"},
}
INDEX_BODY = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"ready": {"type": "boolean", "description": "Only the versions READY."}},
            }
        }
    },
}
LOAD_BODY = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "config": {
                                "type": "string",
                                "description": 'Triton\'s model configuration as JSON; only its version_policy is read, e.g. {"version_policy": {"specific": {"versions": [2]}}}. It stays until the next load.',  # noqa: E501
                            }
                        },
                    }
                },
            },
            "example": {},
        }
    },
}
UNLOAD_BODY = {
    "required": False,
    "content": {"application/json": {"schema": {"type": "object"}, "example": {}}},
}


async def _json_object(request: Request) -> dict[str, Any]:
    body = await read_body(request, MAX_BODY_BYTES)
    if not body.strip():
        return {}
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"request body is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise BadInput("request body must be a JSON object")
    return raw


def _parameters(body: dict[str, Any]) -> dict[str, Any]:
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadInput("parameters must be an object")
    return parameters


def _json(value: Any) -> Response:
    return Response(orjson.dumps(value), media_type="application/json")


async def repository_index(request: Request, _: Params) -> Response:
    plane = get_dataplane(request)
    ready = (await _json_object(request)).get("ready", False)
    if not isinstance(ready, bool):
        raise BadInput("ready must be true or false")
    return _json(plane.repository_index(ready))


async def load_model(request: Request, _: Params) -> Response:
    plane = get_dataplane(request)
    parameters = _parameters(await _json_object(request))
    files = sorted(key for key in parameters if key.startswith("file:"))
    if files:
        raise BadInput(f"files sent with the load ({files[0]}) are not supported: put the version in the repository")
    config = parameters.get("config")
    if config is not None and not isinstance(config, str):
        raise BadInput("parameters.config must be a string of JSON")
    await plane.load_model(request.path_params["name"], config)
    return _json({})


async def unload_model(request: Request, _: Params) -> Response:
    plane = get_dataplane(request)
    _parameters(await _json_object(request))  # unload_dependents: nothing depends on a model here
    await plane.unload_model(request.path_params["name"])
    return _json({})


ENDPOINTS = [
    Endpoint(
        "/v2/repository/index",
        repository_index,
        summary="The model repository's index: each model version and its state",
        description="One entry per model version known: `READY`, `LOADING`, `UNLOADING` (draining its requests) "
        "or `UNAVAILABLE` with the reason (a failed load: what was served before still is). A model with no "
        'version known has one entry without `version`. Body `{"ready": true}`: only the versions ready.',
        request_body=INDEX_BODY,
        responses={
            200: {
                "description": "The index",
                "content": {"application/json": {"schema": {"type": "array", "items": ENTRY_SCHEMA}}},
            },
            400: {"model": ErrorBody, "description": "Not a JSON object, or `ready` not a boolean"},
            **TOO_LARGE,
        },
        tags=["repository"],
    ),
    Endpoint(
        "/v2/repository/models/{name}/load",
        load_model,
        summary="Load or reload a model from the repository",
        description="Reads the model's folder now and serves the versions its version policy chooses (a policy "
        "given in `parameters.config` overrides its own until the next load): each new or changed version is "
        "loaded, verified and warmed before it takes requests; the versions it replaces finish the requests "
        "they have, then are released. Returns when that is done. A version that fails to load changes nothing "
        "that is served (400 with the reason). With several workers, the others follow within a second.",
        request_body=LOAD_BODY,
        responses={200: {"description": "Loaded", "content": {"application/json": {"example": {}}}}, **CONTROL_ERRORS},
        tags=["repository"],
    ),
    Endpoint(
        "/v2/repository/models/{name}/unload",
        unload_model,
        summary="Unload a model",
        description="Its versions take no new requests, finish those they have, and are released; returns when "
        "that is done. It stays unloaded, through polling, until it is loaded again.",
        request_body=UNLOAD_BODY,
        responses={
            200: {"description": "Unloaded", "content": {"application/json": {"example": {}}}},
            **CONTROL_ERRORS,
        },
        tags=["repository"],
    ),
]


# ------------------------------------------------------------------------------------- statistics

STATS_ERRORS: OpenAPIResponses = {
    404: {"model": ErrorBody, "description": "Unknown model or version"},
    503: {"model": ErrorBody, "description": "Not ready"},
}


@router.get("/models/stats", summary="Inference statistics of every loaded model version (this process)")
async def all_statistics(plane: DataPlaneDep) -> dict[str, Any]:
    return {"model_stats": plane.statistics()}


@router.get("/models/{name}/stats", summary="Inference statistics of a model's loaded versions", responses=STATS_ERRORS)
async def model_statistics(name: str, plane: DataPlaneDep) -> dict[str, Any]:
    return {"model_stats": plane.statistics(name)}


@router.get(
    "/models/{name}/versions/{version}/stats",
    summary="Inference statistics of one model version",
    responses=STATS_ERRORS,
)
async def version_statistics(name: str, version: str, plane: DataPlaneDep) -> dict[str, Any]:
    return {"model_stats": plane.statistics(name, version)}
