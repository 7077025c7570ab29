"""/api/v1/studies: submit, list, show, cancel, delete, enqueue, best."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Response, status

from service import studies
from service.api.deps import CtxDep, LimitQuery, OffsetQuery, StrictJSONRoute, StudyIdPath, UserDep
from service.models import StudyStatus
from service.schemas import (
    BestTrials,
    EnqueueRequest,
    EnqueueResult,
    StudiesPublic,
    StudyCreated,
    StudyDetail,
)

router = APIRouter(prefix="/studies", tags=["studies"], route_class=StrictJSONRoute)

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or unknown token."},
    403: {"description": "The token's role may not use this endpoint (worker tokens)."},
    404: {"description": "No such study, or another user's."},
}


# The body is taken as a plain JSON object and validated by the service, so its errors
# name fields exactly as the CLI's local check does; the docs still show the StudySpec
# schema (registered in components by create_app).
_SPEC_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/StudySpec"}}},
    }
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={**_ERRORS, 409: {"description": "Duplicate name."}},
    openapi_extra=_SPEC_BODY,
)
def create_study(
    spec: Annotated[dict[str, Any], Body(include_in_schema=False)], ctx: CtxDep, user: UserDep
) -> StudyCreated:
    """Validate a study spec and start the study (a tf_studies row and an Optuna study)."""
    return studies.create_study(ctx, user, spec)


@router.get("", responses=_ERRORS)
def list_studies(
    ctx: CtxDep,
    user: UserDep,
    status: StudyStatus | None = None,
    limit: LimitQuery = 50,
    offset: OffsetQuery = 0,
) -> StudiesPublic:
    """The caller's studies (an admin's: everyone's), newest first."""
    return studies.list_studies(ctx.db, user, status=status, limit=limit, offset=offset)


@router.get("/{study_id}", responses=_ERRORS)
def get_study(study_id: StudyIdPath, ctx: CtxDep, user: UserDep) -> StudyDetail:
    """The spec, status, trial counts per state and the best trial."""
    return studies.get_study(ctx.db, user, study_id)


@router.post("/{study_id}/cancel", responses={**_ERRORS, 409: {"description": "The study is not running."}})
def cancel_study(study_id: StudyIdPath, ctx: CtxDep, user: UserDep) -> StudyDetail:
    """Stop starting trials; running trials are told to stop at their next heartbeat."""
    return studies.cancel_study(ctx.db, user, study_id)


@router.delete("/{study_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_ERRORS)
def delete_study(study_id: StudyIdPath, ctx: CtxDep, user: UserDep) -> Response:
    """Delete the study, its trials and its Optuna study."""
    studies.delete_study(ctx, user, study_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{study_id}/best", responses=_ERRORS)
def best(study_id: StudyIdPath, ctx: CtxDep, user: UserDep) -> BestTrials:
    """The best complete trial, or the Pareto front for several objectives."""
    return studies.best_trials(ctx.db, user, study_id)


@router.post("/{study_id}/enqueue", status_code=status.HTTP_201_CREATED, responses=_ERRORS)
def enqueue(study_id: StudyIdPath, body: EnqueueRequest, ctx: CtxDep, user: UserDep) -> EnqueueResult:
    """Queue configurations (searched knob -> value) to run before what the sampler proposes."""
    return studies.enqueue(ctx, user, study_id, body.configurations)
