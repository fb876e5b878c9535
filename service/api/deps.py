"""How routes reach the service's state: one accessor each, as FastAPI dependencies (Annotated
aliases, overridable in tests) and as plain functions for the plain endpoints."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import Request

from service.dataplane import DataPlane
from service.metrics import Metrics
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_dataplane(request: Request) -> DataPlane:
    return request.app.state.dataplane


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
DataPlaneDep = Annotated[DataPlane, Depends(get_dataplane)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
