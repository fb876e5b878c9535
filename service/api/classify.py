"""The friendly REST API: /v1/predict, /v1/predict/batch, /v1/feature-maps."""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Coroutine
from enum import StrEnum
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from service import arrays, imaging
from service.api.deps import ModelDep, SettingsDep, get_model, get_settings
from service.api.schemas import BatchPrediction, ErrorBody, Prediction
from service.api.uploads import Upload, read_body, read_files, read_single_image
from service.errors import BadInput, NotFound, ServiceError, UnsupportedMedia
from service.model import Model
from service.settings import Settings

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class DirectPath:
    """Pure ASGI, the innermost of the app's middleware: POST /v1/predict and /v1/predict/batch go straight
    to their direct handlers, which read their two query parameters themselves (same pydantic rules, same
    422 body) and look the model up directly. That skips Starlette's exception middleware, FastAPI's exit
    stack, the walk through the route table, dependency solving and parameter validation: together they
    cost more per request than decoding and classifying a 28×28 image (bench/RESULTS.md). The routes stay
    declared, so OpenAPI documents them from their signatures; while the app has dependency overrides
    (tests), FastAPI serves them as usual, and both give the same bytes (tests/test_batching.py)."""

    def __init__(self, app: ASGIApp, service: FastAPI) -> None:
        self.app = app
        self.service = service
        self.handlers: dict[str, Handler] = {"/v1/predict": _predict_direct, "/v1/predict/batch": _predict_batch_direct}
        # The router's own route objects (the module is fully imported by the time an app is built).
        self.routes: dict[str, BaseRoute] = {
            r.path: r for r in router.routes if isinstance(r, APIRoute) and r.path in self.handlers
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.handlers.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST" or self.service.dependency_overrides:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.routes[scope["path"]]  # as the router would set it: metrics label by route
        request = Request(scope, receive)
        try:
            response = await handler(request)
        except (ServiceError, RequestValidationError) as exc:  # the app's own handlers, as the router would call
            answer = next(h for c in type(exc).__mro__ if (h := self.service.exception_handlers.get(c)) is not None)
            response = await answer(request, exc)  # type: ignore[misc]  # ours are all async
        await response(scope, receive, send)


def query_params(request: Request, adapters: dict[str, tuple[TypeAdapter[Any], Any]]) -> dict[str, Any]:
    """Query parameters validated as FastAPI would (same pydantic rules, same 422 error shape)."""
    if not request.scope.get("query_string"):  # the usual case: parsing an empty query string still costs
        return {name: default for name, (_, default) in adapters.items()}
    values, errors = {}, []
    query = request.query_params
    for name, (adapter, default) in adapters.items():
        raw = query.get(name)
        if raw is None:
            values[name] = default
            continue
        try:
            values[name] = adapter.validate_python(raw)
        except ValidationError as exc:
            errors += [{**e, "loc": ("query", name, *e["loc"])} for e in exc.errors(include_url=False)]
    if errors:
        raise RequestValidationError(errors)
    return values


router = APIRouter(prefix="/v1", tags=["classify"])

ERRORS: dict[int | str, dict[str, Any]] = {
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
    "requestBody": {
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
}
BATCH_BODY = {
    "requestBody": {
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
}

TopK = Annotated[int, Query(ge=1, le=10, description="How many of the best classes to list.")]
TOP_K: tuple[TypeAdapter[Any], Any] = (TypeAdapter(TopK), 3)
FLAG: tuple[TypeAdapter[Any], Any] = (TypeAdapter(bool), False)


def limits(settings: Settings) -> imaging.ImageLimits:
    return imaging.ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)


def dumps(body: dict[str, Any]) -> bytes:
    """Compact JSON: orjson writes the same values as json.dumps (floats in their shortest round-trip
    form) about 20x faster, a seventh of the event loop's work per /v1/predict (bench/RESULTS.md)."""
    return orjson.dumps(body)


def json_response(body: dict[str, Any]) -> Response:
    """A pre-serialised body: skips re-validating our own output against the response model (which
    stays declared for the OpenAPI document) and jsonable_encoder, the slowest steps of a request."""
    return Response(dumps(body), media_type="application/json")


def class_scores_rows(model: Model, probabilities: np.ndarray, top_k: int) -> list[dict[str, Any]]:
    """Label, class id, probabilities and the top k for every row of [N, classes] probabilities.

    Values go through float32 -> Python float (exact), as `float(probabilities[i])` would."""
    orders = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k].tolist()
    classes = model.card.classes
    return [
        {
            "label": classes[order[0]],
            "class_id": order[0],
            "probabilities": row,
            "top_k": [{"label": classes[i], "class_id": i, "probability": row[i]} for i in order],
        }
        for row, order in zip(probabilities.tolist(), orders, strict=True)
    ]


def class_scores(model: Model, probabilities: np.ndarray, top_k: int) -> dict[str, Any]:
    return class_scores_rows(model, probabilities[None], top_k)[0]


# A PNG this small decodes in tens of microseconds: less than the hop to a worker thread and back.
# Anything else (bigger, or another format) is decoded off the event loop.
INLINE_PNG_BYTES = 16 * 1024
INLINE_PNG_PIXELS = 64 * 64


def decodes_inline(data: bytes) -> bool:
    """A small PNG, judged by its IHDR header (width, height) before anything is decoded."""
    if not INLINE_PNG_BYTES >= len(data) >= 24 or not data.startswith(imaging.PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width * height <= INLINE_PNG_PIXELS


async def _preprocess(upload: Upload, settings: Settings) -> np.ndarray:
    if decodes_inline(upload.data):
        return imaging.preprocess(upload.data, limits(settings))[None]
    tensor = await run_in_threadpool(imaging.preprocess, upload.data, limits(settings))
    return tensor[None]


async def _predict_direct(request: Request) -> Response:
    model, settings = get_model(request), get_settings(request)  # 503 before 422, as FastAPI orders them
    params = query_params(request, {"top_k": TOP_K, "feature_maps": FLAG})
    return await predict(request, model, settings, **params)


@router.post(
    "/predict",
    response_model=Prediction,
    response_model_exclude_none=True,
    summary="Classify one image",
    description="Upload one image (PNG, JPEG, WebP, GIF, BMP, TIFF; any size or colour) as multipart field "
    "`file`, or as the raw body with an `image/*` content type.",
    openapi_extra=SINGLE_IMAGE_BODY,
    responses=ERRORS,
)
async def predict(
    request: Request, model: ModelDep, settings: SettingsDep, top_k: TopK = 3, feature_maps: bool = False
) -> Response:
    upload = await read_single_image(request, settings.max_image_bytes)
    batch = await _preprocess(upload, settings)
    outputs = model.output_names if feature_maps else ["probabilities"]
    result = await request.app.state.batcher.run(batch, outputs)
    body: dict[str, Any] = {"model": model.name, "model_version": model.version}
    body |= class_scores(model, result["probabilities"][0], top_k)
    if feature_maps:
        body["feature_maps"] = {
            layer: {"shape": list(result[layer].shape[1:]), "data": result[layer][0].tolist()}
            for layer in model.feature_layers
        }
        body["embedding"] = result["embedding"][0].tolist()
    return json_response(body)


class MapFormat(StrEnum):
    png = "png"
    npz = "npz"


@router.post(
    "/feature-maps",
    summary="Feature maps of one image, as a picture or as arrays",
    description="`format=png` returns a grid of one conv layer's channels (each normalised on its own); "
    "`format=npz` returns every feature map, the embedding, the probabilities and the preprocessed 28×28 input.",
    openapi_extra=SINGLE_IMAGE_BODY,
    responses={
        200: {
            "content": {"image/png": {}, "application/octet-stream": {}},
            "description": "PNG grid or .npz",
        },
        404: {"model": ErrorBody, "description": "Unknown layer"},
        **ERRORS,
    },
    response_class=Response,
)
async def feature_maps(
    request: Request,
    model: ModelDep,
    settings: SettingsDep,
    layer: Annotated[str | None, Query(description="Conv layer to draw (png); default the first.")] = None,
    format: MapFormat = MapFormat.png,  # noqa: A002 - the public query parameter's name
) -> Response:
    if layer is not None and layer not in model.feature_layers:
        raise NotFound(f"unknown layer {layer!r}; feature layers are {', '.join(model.feature_layers)}")
    upload = await read_single_image(request, settings.max_image_bytes)
    batch = await _preprocess(upload, settings)
    result = await request.app.state.batcher.run(batch, model.output_names)
    if format is MapFormat.png:
        chosen = layer or model.feature_layers[0]
        png = await run_in_threadpool(imaging.feature_grid_png, result[chosen][0])
        return Response(
            png, media_type="image/png", headers={"Content-Disposition": f'inline; filename="{chosen}.png"'}
        )
    buffer = io.BytesIO()
    np.savez_compressed(buffer, input=batch[0], **{name: values[0] for name, values in result.items()})
    return Response(
        buffer.getvalue(),
        media_type="application/octet-stream",
        headers={"Content-Disposition": 'attachment; filename="feature-maps.npz"'},
    )


async def _predict_batch_direct(request: Request) -> Response:
    model, settings = get_model(request), get_settings(request)
    return await predict_batch(request, model, settings, **query_params(request, {"top_k": TOP_K}))


@router.post(
    "/predict/batch",
    response_model=BatchPrediction,
    response_model_exclude_none=True,
    summary="Classify many images in one request",
    description="Repeat multipart field `files` (up to the configured maximum, default 256), or send one "
    ".npy/.npz array [N, 28, 28] or [N, 28, 28, 1] (uint8, or float in [0, 1]) as `files` or as the body. "
    "Results come in input order; an image that fails gets its own `error` and the others still succeed.",
    openapi_extra=BATCH_BODY,
    responses=ERRORS,
)
async def predict_batch(request: Request, model: ModelDep, settings: SettingsDep, top_k: TopK = 3) -> Response:
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        uploads = await read_files(
            request, "files", settings.max_request_bytes, settings.max_batch_images, settings.max_image_bytes
        )
    elif content_type.startswith(("application/x-npy", "application/x-npz", "application/octet-stream")):
        uploads = [Upload(None, await read_body(request, settings.max_request_bytes))]
    else:
        raise UnsupportedMedia(
            f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data with repeated "
            "field 'files', or a .npy/.npz array as application/x-npy"
        )

    if len(uploads) == 1 and arrays.is_array_file(uploads[0].data, uploads[0].filename):
        tensors = await run_in_threadpool(arrays.load_array_file, uploads[0].data, settings.max_batch_images)
        names: list[str | None] = [uploads[0].filename] * len(tensors)
        failures: dict[int, ServiceError] = {}
    else:
        tensors, failures = await run_in_threadpool(_preprocess_all, uploads, limits(settings))
        names = [u.filename for u in uploads]

    probabilities = (
        (await request.app.state.batcher.run(tensors, ["probabilities"]))["probabilities"] if len(tensors) else None
    )
    scores = iter(class_scores_rows(model, probabilities, top_k) if probabilities is not None else [])
    items: list[dict[str, Any]] = []
    for index, filename in enumerate(names):
        # Keys in the response model's order; a missing filename is left out, as exclude_none did.
        item: dict[str, Any] = {"index": index} if filename is None else {"index": index, "filename": filename}
        if index in failures:
            error = failures[index]
            item |= {"error": error.message, "status": error.status_code}
        else:
            item |= next(scores)
        items.append(item)
    return json_response(
        {
            "model": model.name,
            "model_version": model.version,
            "count": len(items),
            "failed": len(failures),
            "results": items,
        }
    )


def _preprocess_all(
    uploads: list[Upload], image_limits: imaging.ImageLimits
) -> tuple[np.ndarray, dict[int, ServiceError]]:
    tensors, failures = [], {}
    for index, upload in enumerate(uploads):
        try:
            if arrays.is_array_file(upload.data, upload.filename):
                raise BadInput("send an array file on its own, not among images")
            tensors.append(imaging.preprocess(upload.data, image_limits))
        except ServiceError as exc:
            failures[index] = exc
    batch = np.stack(tensors) if tensors else np.zeros((0, 28, 28, 1), np.float32)
    return batch, failures
