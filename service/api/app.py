"""`create_app(settings)`: the FastAPI application, built from settings and nothing global.

To add a resource, write `routes/<name>.py` with a `router` and append it to
`API_ROUTERS` (mounted under /api/v1). To run something for the app's lifetime
(the lease reaper, a cache warmer), append a hook to `LIFESPAN_HOOKS`: a function
taking the `ServiceContext` and returning an async context manager; it is entered
at start-up and exited at shutdown, in order.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.types import Scope

from service.api.errors import BodySizeLimit, install_error_handlers
from service.api.routes import health, leases, studies, trials
from service.context import ServiceContext
from service.scheduler.reaper import scheduler_lifespan
from service.settings import Settings
from service.spec import StudySpec

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"

LifespanHook = Callable[[ServiceContext], AbstractAsyncContextManager[None]]
BodyLimit = Callable[[Settings, Scope], int | None]

# Mounted under API_PREFIX, in this order.
API_ROUTERS: list[APIRouter] = [studies.router, trials.router, leases.router]
# Mounted at the root (probes).
ROOT_ROUTERS: list[APIRouter] = [health.router]
# The scheduler's reaper loop and trial buffer run for the app's lifetime.
LIFESPAN_HOOKS: list[LifespanHook] = [scheduler_lifespan]
# Per-request body limits that differ from settings.max_body_bytes (e.g. checkpoint
# uploads): the first hook returning a number wins.
BODY_LIMITS: list[BodyLimit] = [leases.checkpoint_body_limit]
# Models to publish in the OpenAPI components that no route signature names.
OPENAPI_MODELS: list[type[BaseModel]] = [StudySpec]


def create_app(
    settings: Settings,
    *,
    routers: Sequence[APIRouter] | None = None,
    lifespan_hooks: Sequence[LifespanHook] | None = None,
    context: ServiceContext | None = None,
) -> FastAPI:
    """Build the app. `routers`/`lifespan_hooks` replace the module lists (tests);
    `context` lets a caller share one ServiceContext with the app."""
    ctx = context or ServiceContext.build(settings)
    hooks = list(LIFESPAN_HOOKS if lifespan_hooks is None else lifespan_hooks)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            stack.callback(ctx.close)  # registered first, so it runs after every hook exits
            for hook in hooks:
                await stack.enter_async_context(hook(ctx))
            yield

    app = FastAPI(
        title="TuneForge",
        version="0.1.0",
        summary="Hyperparameter tuning for fine-tuning pretrained PyTorch models.",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    install_error_handlers(app)

    def limit_for(scope: Scope) -> int:
        for rule in BODY_LIMITS:
            limit = rule(settings, scope)
            if limit is not None:
                return limit
        return settings.max_body_bytes

    app.add_middleware(BodySizeLimit, limit_for=limit_for)

    mounted = [("", r) for r in ROOT_ROUTERS] + [(API_PREFIX, r) for r in (API_ROUTERS if routers is None else routers)]
    app.openapi = lambda: _openapi(app, mounted)  # type: ignore[method-assign]

    for prefix, router in mounted:
        app.include_router(router, prefix=prefix)
    return app


def _openapi(app: FastAPI, mounted: Sequence[tuple[str, APIRouter]] = ()) -> dict[str, Any]:
    """FastAPI's schema plus the models that routes validate themselves (the study spec
    is taken as a plain object so that its errors match the CLI's), referenced from
    the routes' `openapi_extra` as #/components/schemas/<Model>; then the error
    responses as `service.api.errors` really sends them (see `_document_errors`)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in OPENAPI_MODELS:
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in model_schema.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components[model.__name__] = model_schema
        _document_files(schema, mounted)
        _document_errors(schema)
        app.openapi_schema = schema
    return app.openapi_schema


# The one error body (service.api.errors.problem), published so generated clients read it.
PROBLEM_SCHEMAS: dict[str, dict[str, Any]] = {
    "ProblemItem": {
        "title": "ProblemItem",
        "type": "object",
        "properties": {
            "field": {
                "anyOf": [{"type": "string"}, {"type": "null"}],
                "title": "Field",
                "description": "The input the error is about, dotted (spec.search_space.lr.low), or null.",
            },
            "reason": {"type": "string", "title": "Reason"},
        },
        "required": ["field", "reason"],
        "additionalProperties": False,
    },
    "Problem": {
        "title": "Problem",
        "description": "Every error body: one item per problem found.",
        "type": "object",
        "properties": {
            "detail": {"type": "array", "items": {"$ref": "#/components/schemas/ProblemItem"}, "minItems": 1}
        },
        "required": ["detail"],
        "additionalProperties": False,
    },
}
_STRING_HEADER = {"schema": {"type": "string"}}
# Default descriptions; a route's own `responses=` description is kept.
_ERROR_DESCRIPTIONS = {
    "401": "Missing or unknown token.",
    "403": "The token's role may not use this endpoint.",
    "404": "No such resource, or not one the caller may see.",
    "409": "The request clashes with the stored state.",
    "413": "The request body is larger than the server accepts.",
    "422": "Invalid input: each item names the field and the reason.",
    "503": "The database cannot be reached or stayed locked; retry later.",
}
_ERROR_HEADERS = {
    "401": {"WWW-Authenticate": {**_STRING_HEADER, "description": "Bearer"}},
    "503": {"Retry-After": {**_STRING_HEADER, "description": "Seconds to wait before retrying."}},
}
# Error statuses a route can answer but does not declare in its `responses=` (the service
# function raises them): (path, method) -> {status: description}.
EXTRA_ERRORS: dict[tuple[str, str], dict[str, str]] = {
    ("/api/v1/studies/{study_id}/enqueue", "post"): {
        "409": "The study is not running, or a configuration's trial number was taken meanwhile."
    },
}
# Operations that never touch the database (the liveness probe).
_NO_DATABASE = {("/healthz", "get")}
_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def _document_errors(schema: dict[str, Any]) -> None:
    """Publish the `Problem` body for every error status an operation can answer, and
    drop FastAPI's `HTTPValidationError` (its 422 shape is not what we send):

    - 422 where there is input (parameters or a body); 413 where there is a body
      (the body-size middleware); 401 and 403 where a token is required; 404 where
      the path names a resource; 503 wherever the database is read (all but /healthz);
    - 409 and any other 4xx a route declares itself get the same body.
    """
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(copy.deepcopy(PROBLEM_SCHEMAS))
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            if method not in _METHODS:
                continue
            responses: dict[str, Any] = op.setdefault("responses", {})
            for code, description in EXTRA_ERRORS.get((path, method), {}).items():
                responses.setdefault(code, {"description": description})
            params = op.get("parameters", [])
            codes: set[str] = {code for code in responses if code.startswith("4") or code.startswith("5")}
            if params or "requestBody" in op:
                codes.add("422")
            if "requestBody" in op:
                codes.add("413")
            if op.get("security"):
                codes |= {"401", "403"}
            if any(p.get("in") == "path" for p in params):
                codes.add("404")
            if (path, method) not in _NO_DATABASE:
                codes.add("503")
            for code in sorted(codes):
                declared = responses.get(code, {})
                response: dict[str, Any] = {
                    "description": declared.get("description") or _ERROR_DESCRIPTIONS.get(code, "Error."),
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
                }
                if code in _ERROR_HEADERS:
                    response["headers"] = copy.deepcopy(_ERROR_HEADERS[code])
                responses[code] = response
    if "HTTPValidationError" not in json.dumps(schema.get("paths", {})):
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)


def _document_files(schema: dict[str, Any], mounted: Sequence[tuple[str, APIRouter]]) -> None:
    """Routes answering with a FileResponse (checkpoint tars): FastAPI publishes no media type."""
    routes = [(prefix, route) for prefix, router in mounted for route in router.routes]
    for prefix, route in routes:
        if not (isinstance(route, APIRoute) and isinstance(route.response_class, type)):
            continue
        if not issubclass(route.response_class, FileResponse):
            continue
        for method in route.methods or ():
            op = schema.get("paths", {}).get(prefix + route.path_format, {}).get(method.lower())
            if op is None:
                continue
            ok = op.setdefault("responses", {}).setdefault(str(route.status_code or 200), {"description": "A file."})
            ok["content"] = {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}
