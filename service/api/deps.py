"""Dependencies as Annotated aliases, overridable in tests."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import NotReady
from service.model import Model
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_model(request: Request) -> Model:
    model: Model | None = request.app.state.model
    if model is None or not model.ready:
        raise NotReady("model not ready")
    return model


SettingsDep = Annotated[Settings, Depends(get_settings)]
ModelDep = Annotated[Model, Depends(get_model)]
