"""The routes that read a request body, as plain Starlette endpoints, documented from the same
parameter model their one parser validates.

FastAPI's per-request machinery (dependency solving, parameter validation, its exit stacks) costs more
than decoding and classifying a 28×28 image, so the routes that do that work skip it: each is a
Starlette `Route` with one handler, `handler(request, params)`, whose query parameters come from one
pydantic model, parsed by `Endpoint.parse` (FastAPI's rules and 422 body) and written into the OpenAPI
document by `Endpoint.operation`. Errors raised inside reach the app's one exception handler as any
route's do, in tests and in production alike.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

OpenAPIResponses = dict[int | str, dict[str, Any]]


class Params(BaseModel):
    """An endpoint's query parameters: one field each, with its default and description. Unknown
    parameters are ignored, as FastAPI does."""

    model_config = ConfigDict(extra="ignore")


Handler = Callable[[Request, Any], Awaitable[Response]]


@dataclass
class Endpoint:
    path: str
    handler: Handler
    summary: str
    description: str = ""
    params: type[BaseModel] = Params
    request_body: dict[str, Any] | None = None  # the OpenAPI requestBody object
    responses: OpenAPIResponses = field(default_factory=dict)  # status -> {"model": ..., "description": ...}
    tags: list[str] = field(default_factory=list)
    methods: tuple[str, ...] = ("POST",)
    defaults: BaseModel = field(init=False)

    def __post_init__(self) -> None:
        self.defaults = self.params()  # the usual request has no query string: validated once

    def parse(self, request: Request) -> Any:
        """The query parameters, validated by the params model; a RequestValidationError (422) names each
        problem as FastAPI would (`loc` starting with "query")."""
        if not request.scope.get("query_string"):
            return self.defaults
        query = request.query_params
        try:
            return self.params.model_validate({name: query[name] for name in self.params.model_fields if name in query})
        except ValidationError as exc:
            raise RequestValidationError(
                [{**e, "loc": ("query", *e["loc"])} for e in exc.errors(include_url=False)]
            ) from None

    def route(self) -> Route:
        return _Route(self)

    # --------------------------------------------------------------------------------------- OpenAPI

    def operation(self, components: dict[str, Any], common: OpenAPIResponses) -> dict[str, Any]:
        """This endpoint's OpenAPI operation; schemas it refers to are added to `components`."""
        parameters: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string", "title": name.title()}}
            for name in re.findall(r"{(\w+)}", self.path)
        ]
        schema = self.params.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.get("$defs", {}))
        for name, prop in schema.get("properties", {}).items():
            description = prop.pop("description", None)
            parameter = {"name": name, "in": "query", "required": False, "schema": prop}
            parameters.append(parameter | ({"description": description} if description else {}))
        responses: dict[str, Any] = {}
        for status, spec in {**common, **self.responses}.items():
            entry = {k: v for k, v in spec.items() if k != "model"}
            entry.setdefault("description", "Successful Response" if status == 200 else "Error")
            if "model" in spec:
                # A JSON model, and any other content the entry lists (a PNG the same route can answer with).
                schema = {"schema": _reference(spec["model"], components)}
                entry["content"] = {"application/json": schema, **spec.get("content", {})}
            responses[str(status)] = entry
        operation: dict[str, Any] = {
            "tags": self.tags,
            "summary": self.summary,
            "description": self.description,
            "operationId": f"{self.handler.__name__}_{re.sub(r'[^a-z0-9]+', '_', self.path.lower()).strip('_')}",
            "parameters": parameters,
            "responses": dict(sorted(responses.items())),
        }
        if self.request_body is not None:
            operation["requestBody"] = self.request_body
        return {k: v for k, v in operation.items() if v or k == "responses"}


class _Route(Route):
    """A Starlette route whose ASGI app calls the endpoint directly. Exceptions reach the app's handlers
    through Starlette's exception middleware, as every route's do; the per-route exception wrapper
    Starlette adds around function endpoints would only repeat that lookup on every request."""

    def __init__(self, endpoint: Endpoint) -> None:
        name = endpoint.handler.__name__
        super().__init__(endpoint.path, endpoint.handler, methods=list(endpoint.methods), name=name)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            # FastAPI's router records the matched route only for its own route class; metrics and logs
            # label requests by it (bounded label values: the path template, not the path).
            scope["route"] = self
            request = Request(scope, receive, send)
            response = await endpoint.handler(request, endpoint.parse(request))
            await response(scope, receive, send)

        self.app = app


def _reference(model: type[BaseModel], components: dict[str, Any]) -> dict[str, str]:
    _, schema = models_json_schema([(model, "serialization")], ref_template="#/components/schemas/{model}")
    components.update(schema.get("$defs", {}))
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def document(openapi: dict[str, Any], endpoints: list[Endpoint], common: OpenAPIResponses) -> None:
    """Add the endpoints' operations to an OpenAPI document (FastAPI's, which documents its own routes)."""
    components = openapi.setdefault("components", {}).setdefault("schemas", {})
    paths = openapi.setdefault("paths", {})
    for endpoint in endpoints:
        for method in endpoint.methods:
            paths.setdefault(endpoint.path, {})[method.lower()] = endpoint.operation(components, common)
