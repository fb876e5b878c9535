"""The web page at / (static files shipped in service/web/) and the one endpoint only it needs:
POST /v1/preprocess, the 28x28 input the model sees, drawn by the server so the page shows the
server's preprocessing rather than an imitation of it."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from starlette.requests import Request
from starlette.responses import Response

from service import imaging
from service.api.deps import get_dataplane
from service.api.endpoints import Endpoint, Params
from service.api.rest import ERRORS, SINGLE_IMAGE_BODY
from service.api.uploads import read_single_image
from service.errors import NotFound

router = APIRouter()

# Only these files are served: no path from the URL ever reaches the file system.
STATIC_TYPES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# Reachable without an API key (GET and HEAD only): the page asks for the key itself when the API wants one.
PUBLIC_PATHS = frozenset({"/", *(f"/web/{name}" for name in STATIC_TYPES)})
# Everything the page uses comes from this server; blob: for the thumbnails of the picked files.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The files change with the package: revalidate, never serve a stale page against a newer API.
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return resources.files("service").joinpath("web", name).read_bytes()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> Response:
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/web/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    if name not in STATIC_TYPES:
        raise NotFound(f"no such file: /web/{name}")
    return Response(_read(name), media_type=STATIC_TYPES[name], headers=SECURITY_HEADERS)


async def preprocess(request: Request, _: Params) -> Response:
    plane = get_dataplane(request)
    plane.model()  # like the other /v1 routes: 503 until the model is ready
    upload = await read_single_image(request, plane.settings.max_image_bytes)
    tensor = await plane.image(upload.data)
    png = await plane.off_loop(imaging.input_png, tensor[0])
    return Response(png, media_type="image/png", headers={"Content-Disposition": 'inline; filename="input.png"'})


ENDPOINTS = [
    Endpoint(
        "/v1/preprocess",
        preprocess,
        summary="The preprocessed 28×28 input of one image, as a PNG",
        description="Upload one image as for `/v1/predict`; returns the grayscale 28×28 PNG the model is given "
        "(trimmed, scaled, centred, light garment on black).",
        request_body=SINGLE_IMAGE_BODY,
        responses={200: {"content": {"image/png": {}}, "description": "28×28 grayscale PNG"}, **ERRORS},
        tags=["classify"],
    )
]
