"""One error base class carrying its HTTP status, and the one body every error is written as:
{"error": "..."}. Framework-free: the HTTP layer maps these to responses in one handler."""

from __future__ import annotations

from typing import Any

import orjson


class ServiceError(Exception):
    status_code = 500
    headers: dict[str, str] | None = None  # extra response headers (Retry-After), None: none

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


class Busy(ServiceError):
    """No room right now (the memory budget): 503 with Retry-After, a retry later will do."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class ModelLoadError(Exception):
    """The model or its card cannot be used; raised at startup, never during a request."""


def error_body(message: str, **extra: Any) -> bytes:
    """The service's one error shape, {"error": message, ...}, as JSON bytes."""
    return orjson.dumps({"error": message, **extra})
