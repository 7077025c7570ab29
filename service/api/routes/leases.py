"""/api/v1/leases: the worker protocol (worker tokens), and a trial's checkpoint for its owner.

Thin: each route hands the `trainer.protocol` message to `service.scheduler.Scheduler`,
which raises domain errors (409 for a lease that expired or is not held, 422 for a
missing objective metric). Every call is idempotent for the lease's current holder.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Path, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.types import Scope

from service.api.deps import AdminDep, CtxDep, StudyIdPath, TrialNumberPath, UserDep, WorkerDep
from service.scheduler import get_scheduler
from service.scheduler.release import release as release_lease
from service.settings import Settings
from trainer.protocol import (
    MAX_STEP,
    CompleteRequest,
    FailRequest,
    FinishResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    LeaseGrant,
    LeaseRequest,
    ReportRequest,
    ReportResponse,
)

router = APIRouter(tags=["leases"])

_LEASE_ERRORS = {
    401: {"description": "Missing or unknown token."},
    403: {"description": "Not a worker token, or not the token that took this lease."},
    409: {"description": "The lease expired, ended, or was never granted: stop the trial, send nothing more."},
}

# The header trainer.client sends and reads (the step the checkpoint was written at).
CHECKPOINT_STEP_HEADER = "X-Checkpoint-Step"
_CHECKPOINT_PUT = re.compile(r"^/api/v1/leases/[^/]+/checkpoint$")

# Lease ids are uuid4 strings (tf_leases.id is String(36)): anything else cannot be a
# lease, and a 10 kB id should not reach the database.
LeaseIdPath = Annotated[
    str,
    Path(
        min_length=36,
        max_length=36,
        pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
        description="The lease id from the grant.",
    ),
]


def checkpoint_body_limit(settings: Settings, scope: Scope) -> int | None:
    """Checkpoint uploads are raw tars of up to max_checkpoint_bytes, not JSON bodies."""
    if scope.get("method") == "PUT" and _CHECKPOINT_PUT.match(scope.get("path", "")):
        return settings.max_checkpoint_bytes
    return None


class CheckpointStored(BaseModel):
    lease_id: str
    step: int | None
    bytes: int


@router.post(
    "/leases",
    responses={**_LEASE_ERRORS, 204: {"description": "No work right now; ask again later."}},
)
def lease(body: LeaseRequest, ctx: CtxDep, worker: WorkerDep) -> LeaseGrant:
    """Take the next trial: fair share across studies, within each study's max_parallel and budget.
    Only the token that took the lease may use it afterwards."""
    grant = get_scheduler(ctx).grant(body, worker)
    if grant is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)  # type: ignore[return-value]
    return grant


@router.post("/leases/{lease_id}/heartbeat", responses=_LEASE_ERRORS)
def heartbeat(lease_id: LeaseIdPath, body: HeartbeatRequest, ctx: CtxDep, worker: WorkerDep) -> HeartbeatResponse:
    """Extend the lease; `stop` says the study was cancelled, the trial timed out or ended."""
    return get_scheduler(ctx).heartbeat(lease_id, body, worker)


@router.post("/leases/{lease_id}/report", responses={**_LEASE_ERRORS, 422: {"description": "Objective missing."}})
def report(lease_id: LeaseIdPath, body: ReportRequest, ctx: CtxDep, worker: WorkerDep) -> ReportResponse:
    """One evaluation (a point of the learning curve); `prune` is the study pruner's decision."""
    return get_scheduler(ctx).report(lease_id, body, worker)


@router.post("/leases/{lease_id}/complete", responses={**_LEASE_ERRORS, 422: {"description": "Objective missing."}})
def complete(lease_id: LeaseIdPath, body: CompleteRequest, ctx: CtxDep, worker: WorkerDep) -> FinishResponse:
    """The trial ran to the end; its objective values are read from `metrics`."""
    return get_scheduler(ctx).complete(lease_id, body, worker)


@router.post("/leases/{lease_id}/fail", responses=_LEASE_ERRORS)
def fail(lease_id: LeaseIdPath, body: FailRequest, ctx: CtxDep, worker: WorkerDep) -> FinishResponse:
    """The attempt failed; `state` is `waiting` when a retry was scheduled, else `failed`."""
    return get_scheduler(ctx).fail(lease_id, body, worker)


@router.post(
    "/leases/{lease_id}/release",
    responses={
        401: {"description": "Missing or unknown token."},
        403: {"description": "Not an admin token."},
        404: {"description": "No such lease."},
        409: {"description": "The lease is not active any more."},
    },
)
def release(lease_id: LeaseIdPath, ctx: CtxDep, _admin: AdminDep) -> FinishResponse:
    """(admins) Take a lease back from its worker, like an expiry: the attempt fails with reason
    `released` and is retried like a preemption; the holder's next call gets 409."""
    return release_lease(get_scheduler(ctx), lease_id)


@router.put(
    "/leases/{lease_id}/checkpoint",
    responses={**_LEASE_ERRORS, 413: {"description": "Larger than max_checkpoint_bytes."}},
    openapi_extra={"requestBody": {"required": True, "content": {"application/x-tar": {"schema": {"type": "string"}}}}},
)
async def upload_checkpoint(
    lease_id: LeaseIdPath,
    request: Request,
    ctx: CtxDep,
    worker: WorkerDep,
    step: Annotated[int, Header(alias=CHECKPOINT_STEP_HEADER, ge=0, le=MAX_STEP)],
) -> CheckpointStored:
    """An uncompressed tar of the checkpoint folder, streamed to disk (never held in memory)."""
    store = get_scheduler(ctx).checkpoints
    upload = await run_in_threadpool(store.begin_upload, lease_id, step, worker)
    try:
        async for chunk in request.stream():
            # Local disk writes of one network chunk are short; a thread hop per chunk
            # would cost more than it saves.
            upload.write(chunk)
        stored = await run_in_threadpool(upload.commit)
    finally:
        upload.abort()
    return CheckpointStored(lease_id=lease_id, step=stored.step, bytes=stored.size)


def _file(path: str, step: int | None, filename: str) -> FileResponse:
    headers = {CHECKPOINT_STEP_HEADER: str(step)} if step is not None else None
    return FileResponse(path, media_type="application/x-tar", filename=filename, headers=headers)


@router.get(
    "/leases/{lease_id}/checkpoint",
    responses={**_LEASE_ERRORS, 404: {"description": "No earlier attempt uploaded a checkpoint."}},
    response_class=FileResponse,
)
def download_checkpoint(lease_id: LeaseIdPath, ctx: CtxDep, worker: WorkerDep) -> FileResponse:
    """For a retry: the last checkpoint of the trial's earlier attempts (step in X-Checkpoint-Step)."""
    found = get_scheduler(ctx).checkpoints.for_lease(lease_id, worker)
    return _file(str(found.path), found.step, "checkpoint.tar")


@router.get(
    "/studies/{study_id}/trials/{number}/checkpoint",
    tags=["trials"],
    responses={404: {"description": "No such study or trial, another user's, or no checkpoint."}},
    response_class=FileResponse,
)
def trial_checkpoint(study_id: StudyIdPath, number: TrialNumberPath, ctx: CtxDep, user: UserDep) -> FileResponse:
    """The trial's last checkpoint (a complete trial's final one), as an uncompressed tar."""
    found = get_scheduler(ctx).checkpoints.for_trial(user, study_id, number)
    return _file(str(found.path), found.step, f"study-{study_id}-trial-{number}.tar")
