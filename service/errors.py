"""One error base class carrying its HTTP status, and the one body every error is written as:
{"error": "..."}. Framework-free: the HTTP layer maps these to responses in one handler."""

from __future__ import annotations

from typing import Any

import orjson


class ServiceError(Exception):
    status_code = 500

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code


class BadInput(ServiceError):
    status_code = 400


class NotFound(ServiceError):
    status_code = 404


class TooLarge(ServiceError):
    status_code = 413


class UnsupportedMedia(ServiceError):
    status_code = 415


class NotReady(ServiceError):
    status_code = 503


class ModelLoadError(Exception):
    """The model or its card cannot be used; raised at startup, never during a request."""


def error_body(message: str, **extra: Any) -> bytes:
    """The service's one error shape, {"error": message, ...}, as JSON bytes."""
    return orjson.dumps({"error": message, **extra})
