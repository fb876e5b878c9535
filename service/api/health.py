"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The model has answered a warm-up inference",
    responses={
        503: {
            "description": "Not ready yet",
            "content": {"application/json": {"example": {"error": "model not ready"}}},
        }
    },
)
async def readyz(request: Request) -> Any:
    model = request.app.state.model
    if model is None or not model.ready:
        return JSONResponse({"error": "model not ready", "status": "loading"}, status_code=503)
    return {
        "status": "ready",
        "model": model.name,
        "version": model.version,
        "providers": model.providers_in_use,
        "warnings": model.provider_warnings,
    }
