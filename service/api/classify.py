"""The friendly REST API: /v1/predict, /v1/predict/batch, /v1/feature-maps."""

from __future__ import annotations

import io
from enum import StrEnum
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from service import arrays, imaging
from service.api.deps import ModelDep, SettingsDep
from service.api.schemas import BatchItem, BatchPrediction, ErrorBody, Prediction
from service.api.uploads import Upload, read_body, read_files, read_single_image
from service.errors import BadInput, NotFound, ServiceError, UnsupportedMedia
from service.model import Model
from service.settings import Settings

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


def limits(settings: Settings) -> imaging.ImageLimits:
    return imaging.ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)


def class_scores(model: Model, probabilities: np.ndarray, top_k: int) -> dict[str, Any]:
    order = np.argsort(-probabilities, kind="stable")[:top_k]
    best = int(order[0])
    classes = model.card.classes
    return {
        "label": classes[best],
        "class_id": best,
        "probabilities": probabilities.tolist(),
        "top_k": [{"label": classes[i], "class_id": int(i), "probability": float(probabilities[i])} for i in order],
    }


async def _preprocess(upload: Upload, settings: Settings) -> np.ndarray:
    tensor = await run_in_threadpool(imaging.preprocess, upload.data, limits(settings))
    return tensor[None]


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
) -> dict[str, Any]:
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
    return body


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
async def predict_batch(request: Request, model: ModelDep, settings: SettingsDep, top_k: TopK = 3) -> dict[str, Any]:
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

    items: list[dict[str, Any]] = []
    probabilities = (
        (await request.app.state.batcher.run(tensors, ["probabilities"]))["probabilities"] if len(tensors) else None
    )
    row = 0
    for index, filename in enumerate(names):
        if index in failures:
            error = failures[index]
            items.append({"index": index, "filename": filename, "error": error.message, "status": error.status_code})
            continue
        assert probabilities is not None
        items.append({"index": index, "filename": filename, **class_scores(model, probabilities[row], top_k)})
        row += 1
    return {
        "model": model.name,
        "model_version": model.version,
        "count": len(items),
        "failed": len(failures),
        "results": [BatchItem(**item) for item in items],
    }


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
