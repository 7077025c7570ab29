"""Dependencies as `Annotated` aliases, so a route states what it needs in its signature:

    def get_study(study_id: int, ctx: CtxDep, user: UserDep) -> StudyDetail: ...

`UserDep` admits admin and user tokens, `WorkerDep` worker (and admin) tokens,
`AdminDep` admins only; `require_roles(...)` builds any other combination.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service import auth
from service.auth import Principal
from service.context import ServiceContext
from service.db import Database
from service.models import Role
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
