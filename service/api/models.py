"""What is being served: /v1/models and /v1/models/{name}."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.api.deps import ModelDep
from service.api.schemas import ErrorBody, ModelInfo, ModelList
from service.errors import NotFound

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList, summary="The models being served")
async def list_models(model: ModelDep) -> dict[str, Any]:
    return {"models": [model.metadata()]}


@router.get(
    "/models/{name}",
    response_model=ModelInfo,
    summary="One model: classes, input, outputs, versions, providers in use, metrics",
    responses={404: {"model": ErrorBody, "description": "Unknown model"}},
)
async def get_model(name: str, model: ModelDep) -> dict[str, Any]:
    if name != model.name:
        raise NotFound(f"unknown model {name!r}; serving {model.name!r}")
    return model.metadata()
