"""The API documentation, /docs (Swagger UI) and /redoc (ReDoc), from files the service serves itself: the
copies the fastapi-offline package ships, pinned with the other dependencies. They work with no network,
and the pages fetch nothing from elsewhere (no CDN, no web fonts, no validator badge).

With an API key configured the pages and their files stay open (service.api.middleware lets GET/HEAD of
PUBLIC_PATHS through), the OpenAPI document declares the key as a security scheme, and Swagger UI's
Authorize button sends it on the requests a user tries out."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from service.errors import NotFound

DOCS, REDOC, OAUTH2_REDIRECT, OPENAPI = "/docs", "/redoc", "/docs/oauth2-redirect", "/openapi.json"
ASSETS = "/docs/assets/"
# The only files served from the package: no path from the URL ever reaches the file system.
ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
# Reachable without an API key (GET and HEAD only): the pages, their files, and the document they show.
PUBLIC_PATHS = frozenset({DOCS, REDOC, OAUTH2_REDIRECT, OPENAPI, *(ASSETS + name for name in ASSET_TYPES)})
SWAGGER_PARAMETERS = {
    "validatorUrl": None,  # Swagger UI would otherwise ask an outside validator about the document
    "persistAuthorization": False,  # a key entered under Authorize lives as long as the page
    "displayRequestDuration": True,
}
SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "The API key as `Authorization: Bearer <key>`.",
    },
    "apiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "The API key as `X-API-Key: <key>`.",
    },
}

router = APIRouter(include_in_schema=False)


# What the packaged files would still fetch from elsewhere, and what they get instead. ReDoc's sidebar shows
# its maker's logo from a CDN; an empty data: URL fails to load without a request, and ReDoc then hides the
# image itself (its onError), leaving the attribution's text.
OFFLINE_EDITS = {"redoc.standalone.js": [(b"https://cdn.redoc.ly/redoc/logo-mini.svg", b"data:,")]}


@cache
def _asset(name: str) -> bytes:
    data = resources.files("fastapi_offline").joinpath("static", name).read_bytes()
    for old, new in OFFLINE_EDITS.get(name, []):
        data = data.replace(old, new)
    return data


@router.get(DOCS)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=root + OPENAPI,
        title=f"{request.app.title} - Swagger UI",
        oauth2_redirect_url=root + OAUTH2_REDIRECT,
        swagger_js_url=f"{root}{ASSETS}swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS}swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS}favicon.png",
        swagger_ui_parameters=SWAGGER_PARAMETERS,
    )


@router.get(OAUTH2_REDIRECT)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get(REDOC)
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_redoc_html(
        openapi_url=root + OPENAPI,
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS}redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS}favicon.png",
        with_google_fonts=False,
    )


@router.get(ASSETS + "{name}")
async def asset(name: str) -> Response:
    if name not in ASSET_TYPES:
        raise NotFound(f"no such file: {ASSETS}{name}")
    # The files change only with the package's version: a day in the browser's cache is safe.
    return Response(_asset(name), media_type=ASSET_TYPES[name], headers={"Cache-Control": "public, max-age=86400"})


def document_security(openapi: dict[str, Any], open_paths: frozenset[str]) -> None:
    """Declare the API key in an OpenAPI document: both ways of sending it, required everywhere but on
    `open_paths` (health), so that Swagger UI shows Authorize and sends the key it is given."""
    openapi.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    openapi["security"] = [{name: []} for name in SECURITY_SCHEMES]
    for path, operations in openapi.get("paths", {}).items():
        if path in open_paths:
            for operation in operations.values():
                operation["security"] = []
