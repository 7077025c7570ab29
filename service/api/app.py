"""`create_app(settings)`: the FastAPI application, built from settings and nothing global.

To add a resource, write `routes/<name>.py` with a `router` and append it to
`API_ROUTERS` (mounted under /api/v1). To run something for the app's lifetime
(the lease reaper, a cache warmer), append a hook to `LIFESPAN_HOOKS`: a function
taking the `ServiceContext` and returning an async context manager; it is entered
at start-up and exited at shutdown, in order.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
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

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    for router in ROOT_ROUTERS:
        app.include_router(router)
    for router in API_ROUTERS if routers is None else routers:
        app.include_router(router, prefix=API_PREFIX)
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the models that routes validate themselves (the study spec
    is taken as a plain object so that its errors match the CLI's), referenced from
    the routes' `openapi_extra` as #/components/schemas/<Model>."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in OPENAPI_MODELS:
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in model_schema.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components[model.__name__] = model_schema
        app.openapi_schema = schema
    return app.openapi_schema
