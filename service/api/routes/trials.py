"""/api/v1/studies/{study_id}/trials: the trial table and one trial's detail."""

from __future__ import annotations

from fastapi import APIRouter

from service import trials
from service.api.deps import DbDep, LimitQuery, OffsetQuery, StudyIdPath, TrialNumberPath, UserDep
from service.models import TrialState
from service.schemas import SortOrder, TrialDetail, TrialSort, TrialsPublic

router = APIRouter(prefix="/studies/{study_id}/trials", tags=["trials"])


@router.get("")
def list_trials(
    study_id: StudyIdPath,
    db: DbDep,
    user: UserDep,
    state: TrialState | None = None,
    sort: TrialSort = TrialSort.NUMBER,
    order: SortOrder = SortOrder.ASC,
    limit: LimitQuery = 50,
    offset: OffsetQuery = 0,
) -> TrialsPublic:
    """A page of trials, sorted by number, value or duration; trials without one sort last."""
    return trials.list_trials(db, user, study_id, state=state, sort=sort, order=order, limit=limit, offset=offset)


@router.get("/{number}", responses={404: {"description": "No such study or trial."}})
def get_trial(study_id: StudyIdPath, number: TrialNumberPath, db: DbDep, user: UserDep) -> TrialDetail:
    """Params, values, the learning curve, attempts, worker, timings and why it failed."""
    return trials.get_trial(db, user, study_id, number)
