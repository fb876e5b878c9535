"""Open Inference Protocol (KServe V2) over HTTP/REST, with Triton's binary tensor data and
classification extensions, so that tritonclient and KServe clients work unchanged.

Inference goes through the same data plane as /v1: the same body limit, the same image preprocessing
and limits, the same batcher in front of the session. Wire details live in service/api/v2_codec.py.
"""

from __future__ import annotations

import contextlib
import functools
from math import prod
from typing import Any

import numpy as np
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from service import __version__
from service.api import v2_codec
from service.api.deps import DataPlaneDep, get_dataplane
from service.api.endpoints import Endpoint, OpenAPIResponses, Params
from service.api.schemas import ErrorBody
from service.api.uploads import read_body
from service.api.v2_codec import OutputPlan, OutputTensor
from service.dataplane import DataPlane, Upload, derived_outputs
from service.errors import BadInput, ServiceError, TooLarge
from service.memory import MemoryBudget
from service.model import Model, TensorSpec

router = APIRouter(prefix="/v2", tags=["v2"])

SERVER_NAME = "fashion-serve"
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "statistics"]
PLATFORM = "onnxruntime_onnx"

ERRORS: OpenAPIResponses = {
    404: {"model": ErrorBody, "description": "Unknown model or version"},
    503: {"model": ErrorBody, "description": "Model not ready"},
}
INFER_ERRORS: OpenAPIResponses = {
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
# Outputs of at most this many values are encoded on the event loop (the probabilities of a few images):
# less work than the hop to a worker thread.
INLINE_OUTPUT_VALUES = 4096
# Memory that writing one output value takes at its peak: as JSON, a Python float in a list (32 bytes) and its
# text (up to ~16); as binary data, its bytes and the body they are joined into.
JSON_BYTES_PER_VALUE = 48
BINARY_BYTES_PER_VALUE = 8


# ------------------------------------------------------------------------------ server and health


@router.get("", summary="Server metadata: name, version, protocol extensions")
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


@router.get("/health/live", summary="The server is up")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="The model is ready for inference", responses={503: ERRORS[503]})
async def ready(plane: DataPlaneDep) -> dict[str, bool]:
    plane.readiness()  # the default model ready; with no default, at least one model
    return {"ready": True}


# ---------------------------------------------------------------------------------------- models


def _metadata(model: Model, versions: list[str]) -> dict[str, Any]:
    def tensor(spec: TensorSpec) -> dict[str, Any]:
        # The card writes -1 for the batch dimension, as V2 does.
        return {"name": spec.name, "datatype": v2_codec.datatype_of(spec.dtype), "shape": list(spec.shape)}

    return {
        "name": model.name,
        "versions": versions,  # those loaded, highest first
        "platform": PLATFORM,
        "inputs": [tensor(model.card.input)],
        # The graph's outputs, then those computed from them: OOD score and flag, Grad-CAM (DataPlane.outputs).
        "outputs": [tensor(o) for o in (*model.card.outputs, *derived_outputs(model))],
    }


@router.get("/models/{name}", summary="Model metadata: inputs and outputs", responses=ERRORS)
async def model_metadata(name: str, plane: DataPlaneDep) -> dict[str, Any]:
    return _metadata(plane.model(name, ready=False), plane.versions(name))


@router.get("/models/{name}/versions/{version}", summary="Model metadata of one version", responses=ERRORS)
async def model_version_metadata(name: str, version: str, plane: DataPlaneDep) -> dict[str, Any]:
    return _metadata(plane.model(name, version, ready=False), plane.versions(name))


@router.get("/models/{name}/ready", summary="The model is ready", responses=ERRORS)
async def model_ready(name: str, plane: DataPlaneDep) -> dict[str, Any]:
    return {"name": plane.model(name).name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready", summary="The model version is ready", responses=ERRORS)
async def model_version_ready(name: str, version: str, plane: DataPlaneDep) -> dict[str, Any]:
    return {"name": plane.model(name, version).name, "ready": True}


# ------------------------------------------------------------------------------------- inference


async def infer(request: Request, _: Params) -> Response:
    plane = get_dataplane(request)
    model = plane.model(request.path_params["name"], request.path_params.get("version"))
    settings = plane.settings
    # The body is parsed here, not by FastAPI: protocol errors are 400 {"error"}, never a 422.
    body = await read_body(request, settings.max_request_bytes)
    headers = request.headers
    encoding = headers.get("content-encoding")
    # Parsing JSON tensors and decoding images take CPU in proportion to the request: a worker thread,
    # unless the body is small and not compressed (a compressed body may inflate to the request limit).
    inline = len(body) <= settings.inline_decode_max_bytes and encoding in (None, "identity")
    request_id, plans, tensor, files = await plane.off_loop(
        _parse, body, encoding, headers.get("inference-header-content-length"), model, plane, not inline, inline=inline
    )
    if files is not None:
        batch = await plane.images(files)
        if (failure := batch.first_failure()) is not None:
            # Same status as /v1 gives the same file (400 undecodable, 413 too big, 415 not an image type).
            raise ServiceError(f"input {model.input_name!r}: {failure.message}", failure.status_code)
        tensor = batch.tensor
    wanted = {plan.name for plan in plans}
    result = await plane.outputs(model, tensor, [n for n in _available(model) if n in wanted])
    small = sum(result[n].size for n in wanted) <= INLINE_OUTPUT_VALUES
    budget = None if small else plane.budget  # small: on the event loop, where a budget wait would block it
    content, header_length = await plane.off_loop(_encode, model, request_id, plans, result, budget, inline=small)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(header_length)},
    )


def _available(model: Model) -> list[str]:
    """The outputs a request may name: the graph's, then the derived ones."""
    return [*model.output_names, *(spec.name for spec in derived_outputs(model))]


def _parse(
    body: bytes, encoding: str | None, header_length: str | None, model: Model, plane: DataPlane, budgeted: bool
) -> tuple[str | None, list[OutputPlan], np.ndarray, list[Upload] | None]:
    """Body -> (request id, what to return, the model's float32 [N, 28, 28, 1] batch or, for BYTES,
    the image files to decode). The memory that inflating and parsing take is held from the data plane's
    budget while this runs (the resulting batch is small; BYTES files are slices of the body, already held)."""
    budget = plane.budget if budgeted else None  # not on the event loop: a budget wait would block it
    with contextlib.ExitStack() as held:
        reserve: v2_codec.Reserve | None = None
        if budget is not None:
            reservation = held.enter_context(budget.reserve(0, "this request"))
            reserve = functools.partial(reservation.grow, what="parsing this inference request", wait_s=budget.wait_s)
        return _parse_held(body, encoding, header_length, model, plane, reserve)


def _parse_held(
    body: bytes,
    encoding: str | None,
    header_length: str | None,
    model: Model,
    plane: DataPlane,
    reserve: v2_codec.Reserve | None,
) -> tuple[str | None, list[OutputPlan], np.ndarray, list[Upload] | None]:
    settings = plane.settings
    # A body that is all JSON inflates at most to the JSON limit; one with binary tensors to the body limit.
    limit = settings.max_json_bytes if header_length is None else settings.max_request_bytes
    body = v2_codec.decode_content(body, encoding, limit, reserve)
    values_per_row = prod(model.card.input.shape[1:])
    parsed = v2_codec.parse_request(
        body,
        header_length,
        settings.max_json_bytes,
        v2_codec.max_json_tokens(settings.max_batch_images, values_per_row),
        reserve,
    )
    plans = v2_codec.plan_outputs(parsed.header, _available(model), model.name)  # cheap checks first

    expected = model.input_name
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

    pixels = list(model.card.input.shape[1:])  # [28, 28, 1]
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

    array = v2_codec.decode_input(tensor, raw)
    if tensor.datatype == "BYTES":
        return parsed.header.id, plans, array, [Upload(None, data) for data in array.ravel()]
    try:
        batch = plane.array(array)  # uint8 / 255, float range check
    except ServiceError as exc:
        raise ServiceError(f"{what}: {exc.message}", exc.status_code) from None
    return parsed.header.id, plans, batch, None


def _encode(
    model: Model,
    request_id: str | None,
    plans: list[OutputPlan],
    result: dict[str, np.ndarray],
    budget: MemoryBudget | None = None,
) -> tuple[bytes, int | None]:
    """The response body. With a budget, what writing it costs is held first: JSON numbers pass through Python
    floats (about JSON_BYTES_PER_VALUE each); binary tensors are copied once."""
    cost = sum(result[p.name].size * (BINARY_BYTES_PER_VALUE if p.binary else JSON_BYTES_PER_VALUE) for p in plans)
    values = sum(result[p.name].size for p in plans)
    what = f"writing this response ({values:,} output values; ask for fewer outputs, or binary_data_output)"
    with budget.reserve(cost, what) if budget is not None else contextlib.nullcontext():
        return _encode_held(model, request_id, plans, result)


def _encode_held(
    model: Model, request_id: str | None, plans: list[OutputPlan], result: dict[str, np.ndarray]
) -> tuple[bytes, int | None]:
    kinds = {o.name: o.kind for o in model.card.outputs}
    tensors = []
    for plan in plans:
        values = result[plan.name]
        if plan.classification:
            # Labels belong to the class probabilities; other outputs are ranked by index alone.
            labels = model.card.classes if kinds.get(plan.name) == "probabilities" else None
            values = v2_codec.classify(values, plan.classification, labels)
        tensors.append(OutputTensor(plan.name, values, plan.binary))
    return v2_codec.encode_response(model.name, model.version, request_id, tensors)


ENDPOINTS = [
    Endpoint(
        "/v2/models/{name}/infer",
        infer,
        summary="Inference",
        description=INFER_DOC,
        request_body=INFER_BODY,
        responses={200: {"description": "Outputs, as JSON or with binary tensor data"}, **INFER_ERRORS},
        tags=["v2"],
    ),
    Endpoint(
        "/v2/models/{name}/versions/{version}/infer",
        infer,
        summary="Inference on one model version",
        description=INFER_DOC,
        request_body=INFER_BODY,
        responses={200: {"description": "Outputs, as JSON or with binary tensor data"}, **INFER_ERRORS},
        tags=["v2"],
    ),
]
