"""Liveness and readiness probes (outside /api/v1, no token: load balancers call them)."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import CtxDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "The database cannot be reached; retry later."}})
def readyz(ctx: CtxDep) -> dict[str, str]:
    """The database answers; 503 until it does. The body never says why (no host, port,
    role or driver text reaches an unauthenticated caller): the server log does."""
    ctx.db.ping()
    return {"status": "ready"}
