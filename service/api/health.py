"""Liveness, readiness and Prometheus metrics: the routes orchestrators and scrapers call."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from service.api.deps import DataPlaneDep, MetricsDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The default model (or, with none, a model) has answered a warm-up inference",
    responses={
        503: {
            "description": "Not ready yet",
            "content": {"application/json": {"example": {"error": "model not ready"}}},
        }
    },
)
async def readyz(plane: DataPlaneDep) -> Any:
    # 503 {"error": "model not ready"} until the default model (with no default, any model) is ready. The body
    # names the default model's version and providers, and every model's loaded versions.
    return plane.readiness()


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
)
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
