"""POST /v1/explain (and by model: /v1/models/{name}[/versions/{version}]/explain): why the model said
what it said about one image, as an attribution map (JSON numbers) or a heat map over the input (PNG).

HTTP only: the data plane runs the model and service/explain.py does the math."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from service import explain
from service.api.deps import get_dataplane
from service.api.endpoints import Endpoint, Params
from service.api.rest import ERRORS, NOT_FOUND, SINGLE_IMAGE_BODY, TOP_K, by_model, json_response
from service.api.schemas import ExplanationResponse
from service.api.uploads import read_single_image


class ExplainFormat(StrEnum):
    json = "json"
    png = "png"


class ExplainParams(Params):
    method: explain.Method = Field(
        explain.Method.layercam,
        description="`layercam` (the default): LayerCAM on the last conv layer, each position's activations "
        "weighted by the positive part of the exact gradient of the class's logit there; `gradcam`: Grad-CAM, "
        "the same gradient averaged over the layer (coarser: it also lights background beside the garment); "
        "both upsampled to 28×28, in logit units. `occlusion`: the mean drop of the class's probability when a "
        "patch of background covers each pixel (every occluded copy scored in one batch).",
    )
    class_id: int | None = Field(None, ge=0, description="The class to explain; default: the predicted class.")
    format: ExplainFormat = Field(
        ExplainFormat.json,
        description="`json`: the prediction and the 28×28 map as numbers; `png`: the map's positive part as a "
        "heat map over the preprocessed input, 224×224.",
    )
    patch: int = Field(explain.DEFAULT_PATCH, ge=1, le=28, description="occlusion: the patch's side in pixels.")
    stride: int = Field(explain.DEFAULT_STRIDE, ge=1, le=28, description="occlusion: pixels between patches.")
    top_k: int = TOP_K


async def explain_image(request: Request, params: ExplainParams) -> Response:
    plane = get_dataplane(request)
    path = request.path_params
    model = plane.model(path.get("name"), path.get("version"))
    upload = await read_single_image(request, plane.settings.max_image_bytes)
    tensor = await plane.image(upload.data)
    result = await plane.explain(
        model, tensor, params.method, params.class_id, params.top_k, params.patch, params.stride
    )
    if params.format is ExplainFormat.png:
        png = await plane.off_loop(explain.overlay_png, tensor[0], result.attribution)
        headers = {
            "Content-Disposition": f'inline; filename="{result.method.value}-{result.class_id}.png"',
            # The prediction travels with the picture, for clients that want both from one request.
            "X-Explained-Class": str(result.class_id),
            "X-Predicted-Class": str(result.prediction["class_id"]),
        }
        if "in_distribution" in result.prediction:
            headers["X-In-Distribution"] = "true" if result.prediction["in_distribution"] else "false"
        return Response(png, media_type="image/png", headers=headers)
    body: dict[str, Any] = {"model": model.name, "model_version": model.version}
    return json_response(body | result.prediction | {"explanation": result.body()})


DESCRIPTION = (
    "Upload one image as for `/v1/predict`. Returns its prediction (with `ood_score` and `in_distribution`) "
    "and an attribution map of the predicted class, or of `class_id`: `method=layercam` (the default) or "
    "`method=gradcam` (LayerCAM or Grad-CAM on the last conv layer, from the exact gradient computed from the "
    "graph's outputs and the exported head's weights; the class score is the logit, before the softmax) or "
    "`method=occlusion` (`patch`, `stride`). The map is 28×28 in the "
    "preprocessed input's pixel grid (see `/v1/preprocess`); `format=png` draws it over that input."
)
SHORT = Endpoint(
    "/v1/explain",
    explain_image,
    summary="Explain one prediction: LayerCAM, Grad-CAM or occlusion",
    description=DESCRIPTION,
    params=ExplainParams,
    request_body=SINGLE_IMAGE_BODY,
    responses={
        200: {
            "model": ExplanationResponse,
            "content": {"image/png": {}},
            "description": "The prediction and the map (JSON); with format=png, the heat map (PNG)",
        },
        404: {
            "model": NOT_FOUND["model"],
            "description": "Unknown model or version; or a gradient method asked of a model without a head",
        },
        **ERRORS,
    },
    tags=["classify"],
)
ENDPOINTS = [SHORT, *by_model(SHORT)]
