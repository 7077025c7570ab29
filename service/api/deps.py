"""Dependencies as `Annotated` aliases, so a route states what it needs in its signature:

    def get_study(study_id: int, ctx: CtxDep, user: UserDep) -> StudyDetail: ...

`UserDep` admits admin and user tokens, `WorkerDep` worker (and admin) tokens,
`AdminDep` admins only; `require_roles(...)` builds any other combination.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service import auth
from service.auth import Principal
from service.context import ServiceContext
from service.db import Database
from service.models import Role
from service.schemas import MAX_DB_INT, MAX_PAGE
from service.settings import Settings


def get_ctx(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


CtxDep = Annotated[ServiceContext, Depends(get_ctx)]


def get_db(ctx: CtxDep) -> Database:
    return ctx.db


def get_settings(ctx: CtxDep) -> Settings:
    return ctx.settings


DbDep = Annotated[Database, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

# auto_error=False: a missing header reaches `current_principal`, which raises the
# domain Unauthorized, so the 401 has the same body and WWW-Authenticate as any other.
_bearer = HTTPBearer(auto_error=False, description="A token from `tuneforge token create` (prefix tf_).")


def current_principal(
    ctx: CtxDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    if ctx.settings.auth_disabled:
        return auth.ANONYMOUS_ADMIN
    return auth.authenticate(ctx.db, credentials.credentials if credentials else None)


PrincipalDep = Annotated[Principal, Depends(current_principal)]


def require_roles(*roles: Role) -> Callable[[Principal], Principal]:
    """A dependency admitting only tokens with one of `roles` (403 otherwise)."""

    def _check(principal: PrincipalDep) -> Principal:
        return auth.require_role(principal, *roles)

    return _check


UserDep = Annotated[Principal, Depends(require_roles(Role.ADMIN, Role.USER))]
WorkerDep = Annotated[Principal, Depends(require_roles(Role.WORKER, Role.ADMIN))]
AdminDep = Annotated[Principal, Depends(require_roles(Role.ADMIN))]


# Path and query parameters shared by routes, bounded so that no number reaches the
# database that its integer columns cannot hold.
StudyIdPath = Annotated[int, Path(ge=1, le=MAX_DB_INT, description="Study id.")]
TrialNumberPath = Annotated[int, Path(ge=0, le=MAX_DB_INT, description="Trial number within the study.")]
LimitQuery = Annotated[int, Query(ge=1, le=MAX_PAGE, description="Page size.")]
OffsetQuery = Annotated[int, Query(ge=0, le=MAX_DB_INT, description="Rows to skip.")]


class StrictJSONRequest(Request):
    """A request whose JSON body must be standard JSON: Python's parser also takes NaN and
    Infinity, which no spec or configuration may hold."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            text = (await self.body()).decode("utf-8", errors="replace")

            def reject(name: str) -> Any:
                where = max(text.find(name), 0)
                raise json.JSONDecodeError(f"{name} is not valid JSON; use a finite number", text, where)

            self._json = json.loads(text, parse_constant=reject)
        return self._json


class StrictJSONRoute(APIRoute):
    """Route class for routers whose bodies are specs or configurations (NaN/Infinity -> 422)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
