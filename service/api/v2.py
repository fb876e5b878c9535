"""Open Inference Protocol (KServe V2) over HTTP/REST, with Triton's binary tensor data and
classification extensions, so that tritonclient and KServe clients work unchanged.

Inference takes the same path as /v1: the same body limit, the same image preprocessing and limits,
the same batcher in front of the one session. Wire details live in service/v2_types.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service import __version__, arrays, imaging, v2_types
from service.api.classify import limits
from service.api.schemas import ErrorBody
from service.api.uploads import read_body
from service.errors import BadInput, NotFound, NotReady, ServiceError, TooLarge
from service.model import Model
from service.settings import Settings
from service.v2_types import OutputPlan, OutputTensor

router = APIRouter(prefix="/v2", tags=["v2"])

SERVER_NAME = "fashion-serve"
EXTENSIONS = ["binary_tensor_data", "classification"]
PLATFORM = "onnxruntime_onnx"

ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "Unknown model or version"},
    503: {"model": ErrorBody, "description": "Model not ready"},
}
INFER_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    400: {
        "model": ErrorBody,
        "description": "Malformed request, sizes or shapes that do not add up, bad image",
    },
    413: {"model": ErrorBody, "description": "Body, image or row count over the limits"},
    415: {"model": ErrorBody, "description": "Unsupported image format or Content-Encoding"},
}
INFER_DOC = """Exactly one input, named as the model's input (see the model metadata), in one of three forms:

* `FP32` `[N, 28, 28, 1]` or `[N, 28, 28]`: the model's tensor, values in [0, 1];
* `UINT8` of the same shape: pixels 0–255, divided by 255 on the server;
* `BYTES` `[N]` or `[N, 1]`: image files (PNG, JPEG, …), preprocessed exactly as `/v1/predict` uploads.
  In JSON each element is a base64 string; as binary data each is a 4-byte little-endian length and the bytes.

`data` may be flat or nested (row-major). Outputs are chosen by name (none named: all of them); an output
with `parameters.classification: k` returns BYTES `"score:index:label"` strings, shape [N, k]. Triton's
binary tensor data extension works both ways (`Inference-Header-Content-Length`, `binary_data_size`,
`binary_data`, `binary_data_output`); gzip/deflate request bodies are accepted."""
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object"},
                "example": {
                    "id": "1",
                    "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}],
                    "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
                },
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _model(request: Request, name: str, version: str | None = None) -> Model:
    """The served model if `name` (and `version`) name it; it may not be ready yet."""
    model: Model | None = request.app.state.model
    if model is None:
        raise NotReady("model not loaded yet")
    if name != model.name:
        raise NotFound(f"unknown model {name!r}; serving {model.name!r}")
    if version is not None and version != model.version:
        raise NotFound(f"model {name!r} has no version {version!r} being served; serving version {model.version!r}")
    return model


def _ready_model(request: Request, name: str, version: str | None = None) -> Model:
    model = _model(request, name, version)
    if not model.ready:
        raise NotReady(f"model {name!r} is not ready")
    return model


# ------------------------------------------------------------------------------ server and health


@router.get("", summary="Server metadata: name, version, protocol extensions")
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


@router.get("/health/live", summary="The server is up")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="The model is ready for inference", responses={503: ERRORS[503]})
async def ready(request: Request) -> dict[str, bool]:
    model: Model | None = request.app.state.model
    if model is None or not model.ready:
        raise NotReady("model not ready")
    return {"ready": True}


# ---------------------------------------------------------------------------------------- models


def _metadata(model: Model) -> dict[str, Any]:
    def tensor(spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": spec["name"],
            "datatype": v2_types.datatype_of(spec.get("dtype", "float32")),
            "shape": list(spec["shape"]),  # the card writes -1 for the batch dimension, as V2 does
        }

    return {
        "name": model.name,
        "versions": [model.version],  # only the served version can be asked for
        "platform": PLATFORM,
        "inputs": [tensor(model.card.input)],
        "outputs": [tensor(o) for o in model.card.outputs],
    }


@router.get("/models/{name}", summary="Model metadata: inputs and outputs", responses=ERRORS)
async def model_metadata(request: Request, name: str) -> dict[str, Any]:
    return _metadata(_model(request, name))


@router.get("/models/{name}/versions/{version}", summary="Model metadata of one version", responses=ERRORS)
async def model_version_metadata(request: Request, name: str, version: str) -> dict[str, Any]:
    return _metadata(_model(request, name, version))


@router.get("/models/{name}/ready", summary="The model is ready", responses=ERRORS)
async def model_ready(request: Request, name: str) -> dict[str, Any]:
    return {"name": _ready_model(request, name).name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready", summary="The model version is ready", responses=ERRORS)
async def model_version_ready(request: Request, name: str, version: str) -> dict[str, Any]:
    return {"name": _ready_model(request, name, version).name, "ready": True}


# ------------------------------------------------------------------------------------- inference


@router.post(
    "/models/{name}/infer",
    summary="Inference",
    description=INFER_DOC,
    openapi_extra=INFER_BODY,
    responses=INFER_ERRORS,
    response_class=Response,
)
async def infer(request: Request, name: str) -> Response:
    return await _infer(request, _ready_model(request, name))


@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Inference on one model version",
    description=INFER_DOC,
    openapi_extra=INFER_BODY,
    responses=INFER_ERRORS,
    response_class=Response,
)
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await _infer(request, _ready_model(request, name, version))


async def _infer(request: Request, model: Model) -> Response:
    settings: Settings = request.app.state.settings
    # The body is parsed here, not by FastAPI: protocol errors are 400 {"error"}, never a 422.
    body = await read_body(request, settings.max_request_bytes)
    # Parsing JSON tensors, decoding images and writing JSON outputs take CPU in proportion to the
    # request: worker threads, so that the event loop (and the batcher) keep serving other requests.
    headers = request.headers
    request_id, plans, batch = await run_in_threadpool(
        _prepare,
        body,
        headers.get("content-encoding"),
        headers.get("inference-header-content-length"),
        model,
        settings,
    )
    wanted = {plan.name for plan in plans}
    result = await request.app.state.batcher.run(batch, [n for n in model.output_names if n in wanted])
    content, header_length = await run_in_threadpool(_encode, model, request_id, plans, result)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(header_length)},
    )


def _prepare(
    body: bytes, encoding: str | None, header_length: str | None, model: Model, settings: Settings
) -> tuple[str | None, list[OutputPlan], np.ndarray]:
    """Body -> (request id, what to return, the model's float32 [N, 28, 28, 1] as /v1 would make it)."""
    body = v2_types.decode_content(body, encoding, settings.max_request_bytes)
    parsed = v2_types.parse_request(body, header_length)
    plans = v2_types.plan_outputs(parsed.header, model.output_names, model.name)  # cheap checks first

    expected = model.card.input["name"]
    if len(parsed.header.inputs) != 1:
        raise BadInput(f"expected exactly one input ({expected!r}), got {len(parsed.header.inputs)}")
    tensor, raw = parsed.header.inputs[0], parsed.raw[0]
    if tensor.name != expected:
        raise BadInput(
            f"unexpected inference input {tensor.name!r} for model {model.name!r}; the input is {expected!r}"
        )
    what = f"input {expected!r}"
    if tensor.datatype not in ("FP32", "UINT8", "BYTES"):
        raise BadInput(
            f"{what} has datatype {tensor.datatype!r}; send FP32 values in [0, 1], UINT8 pixels, or BYTES image files"
        )

    pixels = list(model.card.input["shape"][1:])  # [28, 28, 1]
    if tensor.datatype == "BYTES":
        shapes = "[N] or [N, 1]"
        shape_ok = len(tensor.shape) == 1 or tensor.shape[1:] == [1]
    else:
        shapes = " or ".join("[N, " + ", ".join(map(str, dims)) + "]" for dims in (pixels, pixels[:-1]))
        shape_ok = tensor.shape[1:] in (pixels, pixels[:-1])
    if not shape_ok:
        raise BadInput(f"{what} has shape {tensor.shape}; {tensor.datatype} takes {shapes}")
    rows = tensor.shape[0]
    if rows == 0:
        raise BadInput(f"{what} holds no images (shape {tensor.shape})")
    if rows > settings.max_batch_images:
        raise TooLarge(f"{what} holds {rows} images; the limit is {settings.max_batch_images}")

    array = v2_types.decode_input(tensor, raw)
    try:
        if tensor.datatype == "BYTES":
            batch = _decode_images(list(array.ravel()), limits(settings))
        else:
            batch = arrays.to_model_batch(array, settings.max_batch_images)  # uint8 / 255, float range check
    except ServiceError as exc:
        raise ServiceError(f"{what}: {exc.message}", exc.status_code) from None
    return parsed.header.id, plans, batch


def _encode(
    model: Model, request_id: str | None, plans: list[OutputPlan], result: dict[str, np.ndarray]
) -> tuple[bytes, int | None]:
    kinds = {o["name"]: o.get("kind") for o in model.card.outputs}
    tensors = []
    for plan in plans:
        values = result[plan.name]
        if plan.classification:
            # Labels belong to the class probabilities; other outputs are ranked by index alone.
            labels = model.card.classes if kinds[plan.name] == "probabilities" else None
            values = v2_types.classify(values, plan.classification, labels)
        tensors.append(OutputTensor(plan.name, values, plan.binary))
    return v2_types.encode_response(model.name, model.version, request_id, tensors)


def _decode_images(files: list[bytes], image_limits: imaging.ImageLimits) -> np.ndarray:
    tensors = []
    for index, data in enumerate(files):
        try:
            tensors.append(imaging.preprocess(data, image_limits))
        except ServiceError as exc:
            # Same status as /v1 gives the same file (400 undecodable, 413 too big, 415 not an image type).
            raise ServiceError(f"element {index}: {exc.message}", exc.status_code) from None
    return np.stack(tensors)
