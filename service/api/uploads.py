"""Reading request bodies under the size limits: raw bodies and multipart uploads."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import UploadFile

from service.errors import BadInput, TooLarge, UnsupportedMedia

RAW_IMAGE_TYPES = ("image/", "application/octet-stream")


@dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes
    content_type: str | None = None


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise BadInput("invalid Content-Length header") from None
        if length > limit:
            raise TooLarge(f"request body is {length} bytes; the limit is {limit}")


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing it as soon as it passes `limit` (chunked bodies included)."""
    _check_declared_length(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_files(request: Request, field: str, limit: int, max_files: int, per_file_limit: int) -> list[Upload]:
    """All files in multipart field `field`."""
    _check_declared_length(request, limit)
    form = await request.form(max_files=max_files + 1, max_fields=max_files + 16)
    uploads = []
    for item in form.getlist(field):
        if not isinstance(item, UploadFile):
            raise BadInput(f"multipart field {field!r} must be a file, not a text value")
        if item.size is not None and item.size > per_file_limit:
            raise TooLarge(f"{item.filename or field}: {item.size} bytes; the limit is {per_file_limit}")
        uploads.append(Upload(item.filename, await item.read(), item.content_type))
    if len(uploads) > max_files:
        raise TooLarge(f"{len(uploads)} files in one request; the limit is {max_files}")
    if not uploads:
        present = ", ".join(sorted(set(form.keys()))) or "none"
        raise BadInput(f"multipart field {field!r} is missing (fields sent: {present})")
    return uploads


async def read_single_image(request: Request, limit: int) -> Upload:
    """One image: multipart field `file`, or the raw body with an image/* content type."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        uploads = await read_files(request, "file", limit, max_files=1, per_file_limit=limit)
        return uploads[0]
    if content_type.startswith(RAW_IMAGE_TYPES):
        return Upload(None, await read_body(request, limit), content_type)
    raise UnsupportedMedia(
        f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data with a field "
        "'file', or the image itself as the body with an image/* content type"
    )
