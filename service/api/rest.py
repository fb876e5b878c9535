"""The friendly REST API: /v1/predict, /v1/predict/batch, /v1/feature-maps, /v1/models.

The three that classify serve the default model at their short path, and any loaded model and version under
/v1/models/{name}[/versions/{version}]/... (no version: the highest loaded). HTTP only: each handler parses
its request, calls the data plane and writes the answer."""

from __future__ import annotations

import dataclasses
import io
from enum import StrEnum
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from service import imaging
from service.api.deps import DataPlaneDep, get_dataplane
from service.api.endpoints import Endpoint, OpenAPIResponses, Params
from service.api.schemas import BatchPrediction, ErrorBody, ModelInfo, ModelList, Prediction
from service.api.uploads import read_body, read_files, read_single_image
from service.dataplane import DataPlane, Upload, scored
from service.errors import NotFound, UnsupportedMedia
from service.model import Model

ERRORS: OpenAPIResponses = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Empty, undecodable or invalid input",
        413: "Too large: bytes, pixels or image count",
        415: "Unsupported content type or image format",
        422: "Invalid query parameters",
        503: "Model not ready",
    }.items()
}
SINGLE_IMAGE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary", "description": "The image."}},
            }
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}
BATCH_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["files"],
                "properties": {
                    "files": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "Images, or one .npy/.npz array [N,28,28(,1)] (uint8, or float in [0,1]).",
                    }
                },
            }
        },
        "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
        "application/x-npz": {"schema": {"type": "string", "format": "binary"}},
    },
}
TOP_K = Field(3, ge=1, le=10, description="How many of the best classes to list.")


def json_response(body: dict[str, Any]) -> Response:
    """Compact JSON written by orjson: the same values as json.dumps (floats in their shortest
    round-trip form) about 20x faster, a seventh of the event loop's work per /v1/predict."""
    return Response(orjson.dumps(body), media_type="application/json")


# ------------------------------------------------------------------------------------------ predict


class PredictParams(Params):
    top_k: int = TOP_K
    feature_maps: bool = Field(False, description="Also return every conv layer's activations and the embedding.")
    input: bool = Field(
        False, description="Also return the preprocessed 28×28×1 input the model was given (what the web page draws)."
    )


def _served(plane: DataPlane, request: Request) -> Model:
    """The model version the path names: /v1/models/{name}[/versions/{version}]/..., else the default model."""
    path = request.path_params
    return plane.model(path.get("name"), path.get("version"))


async def predict(request: Request, params: PredictParams) -> Response:
    plane = get_dataplane(request)
    model = _served(plane, request)
    upload = await read_single_image(request, plane.settings.max_image_bytes)
    tensor = await plane.image(upload.data)
    body: dict[str, Any] = {"model": model.name, "model_version": model.version}
    if not (params.feature_maps or params.input):
        return json_response(body | (await plane.classify(model, tensor, params.top_k))[0])
    if params.feature_maps:
        result = await plane.infer(model, tensor, model.output_names)
        body |= scored(model, result, params.top_k)[0]  # with the OOD fields, as /v1/predict's
        body["feature_maps"] = {
            layer: {"shape": list(result[layer].shape[1:]), "data": result[layer][0].tolist()}
            for layer in model.feature_layers
        }
        body["embedding"] = result["embedding"][0].tolist()
    else:
        body |= (await plane.classify(model, tensor, params.top_k))[0]
    if params.input:
        body["input"] = {"shape": list(tensor.shape[1:]), "data": tensor[0].tolist()}
    return json_response(body)


# ------------------------------------------------------------------------------------ predict batch


class BatchParams(Params):
    top_k: int = TOP_K


async def predict_batch(request: Request, params: BatchParams) -> Response:
    plane = get_dataplane(request)
    model = _served(plane, request)
    settings = plane.settings
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        files = await read_files(
            request, "files", settings.max_request_bytes, settings.max_batch_images, settings.max_image_bytes
        )
    elif content_type.startswith(("application/x-npy", "application/x-npz", "application/octet-stream")):
        files = [Upload(None, await read_body(request, settings.max_request_bytes))]
    else:
        raise UnsupportedMedia(
            f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data with repeated "
            "field 'files', or a .npy/.npz array as application/x-npy"
        )
    batch = await plane.uploads(files)
    scores = iter(await plane.classify(model, batch.tensor, params.top_k))
    items: list[dict[str, Any]] = []
    for index, filename in enumerate(batch.names):
        # Keys in the response model's order; a missing filename is left out.
        item: dict[str, Any] = {"index": index} if filename is None else {"index": index, "filename": filename}
        error = batch.failures.get(index)
        items.append(item | ({"error": error.message, "status": error.status_code} if error else next(scores)))
    return json_response(
        {
            "model": model.name,
            "model_version": model.version,
            "count": len(items),
            "failed": len(batch.failures),
            "results": items,
        }
    )


# ------------------------------------------------------------------------------------- feature maps


class MapFormat(StrEnum):
    png = "png"
    npz = "npz"


class FeatureMapParams(Params):
    layer: str | None = Field(
        None, description="Conv layer to draw (png); default the first conv layer (conv1 for the committed model)."
    )
    format: MapFormat = Field(MapFormat.png, description="png: one layer as a grid; npz: every array.")


async def feature_maps(request: Request, params: FeatureMapParams) -> Response:
    plane = get_dataplane(request)
    model = _served(plane, request)
    if params.layer is not None and params.layer not in model.feature_layers:
        raise NotFound(f"unknown layer {params.layer!r}; feature layers are {', '.join(model.feature_layers)}")
    upload = await read_single_image(request, plane.settings.max_image_bytes)
    tensor = await plane.image(upload.data)
    result = await plane.infer(model, tensor, model.output_names)
    if params.format is MapFormat.png:
        chosen = params.layer or model.feature_layers[0]
        png = await plane.off_loop(imaging.feature_grid_png, result[chosen][0])
        return Response(
            png, media_type="image/png", headers={"Content-Disposition": f'inline; filename="{chosen}.png"'}
        )
    buffer = io.BytesIO()
    np.savez_compressed(buffer, input=tensor[0], **{name: values[0] for name, values in result.items()})
    return Response(
        buffer.getvalue(),
        media_type="application/octet-stream",
        headers={"Content-Disposition": 'attachment; filename="feature-maps.npz"'},
    )


NOT_FOUND = {"model": ErrorBody, "description": "Unknown model or version; or several models and no default"}

# At their short paths these serve the default model; see MODEL_PATHS for the same by model and version.
SHORT_ENDPOINTS = [
    Endpoint(
        "/v1/predict",
        predict,
        summary="Classify one image",
        description="Upload one image (PNG, JPEG, WebP, GIF, BMP, TIFF; any size or colour) as multipart field "
        "`file`, or as the raw body with an `image/*` content type.",
        params=PredictParams,
        request_body=SINGLE_IMAGE_BODY,
        responses={200: {"model": Prediction}, 404: NOT_FOUND, **ERRORS},
        tags=["classify"],
    ),
    Endpoint(
        "/v1/predict/batch",
        predict_batch,
        summary="Classify many images in one request",
        description="Repeat multipart field `files` (up to the configured maximum, default 256), or send one "
        ".npy/.npz array [N, 28, 28] or [N, 28, 28, 1] (uint8, or float in [0, 1]) as `files` or as the body. "
        "Results come in input order; an image that fails gets its own `error` and the others still succeed.",
        params=BatchParams,
        request_body=BATCH_BODY,
        responses={200: {"model": BatchPrediction}, 404: NOT_FOUND, **ERRORS},
        tags=["classify"],
    ),
    Endpoint(
        "/v1/feature-maps",
        feature_maps,
        summary="Feature maps of one image, as a picture or as arrays",
        description="`format=png` returns a grid of one conv layer's channels (each normalised on its own); "
        "`format=npz` returns every feature map, the embedding, the probabilities and the preprocessed 28×28 "
        "input.",
        params=FeatureMapParams,
        request_body=SINGLE_IMAGE_BODY,
        responses={
            200: {
                "content": {"image/png": {}, "application/octet-stream": {}},
                "description": "PNG grid or .npz",
            },
            404: {
                "model": ErrorBody,
                "description": "Unknown layer, model or version; or several models and no default",
            },
            **ERRORS,
        },
        tags=["classify"],
    ),
]
MODEL_PATHS = {
    "/v1/models/{name}": "the model `name`, its highest loaded version",
    "/v1/models/{name}/versions/{version}": "that version of the model `name`",
}


def by_model(endpoint: Endpoint) -> list[Endpoint]:
    """The same endpoint (one handler, reading the path's name and version) for any loaded model."""
    return [
        dataclasses.replace(
            endpoint,
            path=prefix + endpoint.path.removeprefix("/v1"),
            summary=f"{endpoint.summary}, by {'model' if '{version}' not in prefix else 'model version'}",
            description=f"As `{endpoint.path}` (which serves the default model), served by {what}. "
            + endpoint.description,
        )
        for prefix, what in MODEL_PATHS.items()
    ]


ENDPOINTS = [*SHORT_ENDPOINTS, *(e for short in SHORT_ENDPOINTS for e in by_model(short))]


# ------------------------------------------------------------------------------------------ models

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList, summary="The models being served, each at its highest version")
async def list_models(plane: DataPlaneDep) -> dict[str, Any]:
    return {"models": [plane.metadata(name) for name in plane.model_names()]}


@router.get(
    "/models/{name}",
    response_model=ModelInfo,
    summary="One model at its highest loaded version: classes, input, outputs, versions loaded, providers, metrics",
    responses={404: {"model": ErrorBody, "description": "Unknown model"}},
)
async def get_model(name: str, plane: DataPlaneDep) -> dict[str, Any]:
    return plane.metadata(name)


@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelInfo,
    summary="One loaded version of a model",
    responses={404: {"model": ErrorBody, "description": "Unknown model or version"}},
)
async def get_model_version(name: str, version: str, plane: DataPlaneDep) -> dict[str, Any]:
    return plane.metadata(name, version)
