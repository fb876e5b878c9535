"""One error base class carrying its HTTP status; one handler turns it into {"error": "..."}."""

from __future__ import annotations


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
