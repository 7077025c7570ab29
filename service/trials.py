"""Trial queries for the list and detail endpoints. Read-only, on tf_* tables only,
paged and sorted in SQL (each sort key has a (study_id, key) index)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.auth import Principal
from service.db import Database
from service.errors import NotFound
from service.models import Lease, LeaseState, Trial, TrialReport, TrialState
from service.schemas import (
    MAX_PAGE,
    AttemptPublic,
    Report,
    SortOrder,
    TrialDetail,
    TrialPublic,
    TrialSort,
    TrialsPublic,
)
from service.studies import check_page, visible_study

_SORT_COLUMNS: dict[TrialSort, Any] = {
    TrialSort.NUMBER: Trial.number,
    TrialSort.VALUE: Trial.value,
    TrialSort.DURATION: Trial.duration_s,
}


def list_trials(
    db: Database,
    principal: Principal,
    study_id: int,
    *,
    state: TrialState | None = None,
    sort: TrialSort = TrialSort.NUMBER,
    order: SortOrder = SortOrder.ASC,
    limit: int = 50,
    offset: int = 0,
) -> TrialsPublic:
    check_page(limit, offset, MAX_PAGE)
    with db.scope() as s:
        visible_study(s, principal, study_id)
        where = [Trial.study_id == study_id]
        if state is not None:
            where.append(Trial.state == state)
        count = s.scalar(select(func.count()).select_from(Trial).where(*where)) or 0
        column = _SORT_COLUMNS[sort]
        key = column.desc() if order is SortOrder.DESC else column.asc()
        # Trials without a value or duration yet go last in either order; number breaks ties
        # so pages are stable.
        rows = s.scalars(
            select(Trial).where(*where).order_by(key.nulls_last(), Trial.number).limit(limit).offset(offset)
        ).all()
        return TrialsPublic(data=[TrialPublic.model_validate(r) for r in rows], count=count)


def get_trial(db: Database, principal: Principal, study_id: int, number: int) -> TrialDetail:
    with db.scope() as s:
        visible_study(s, principal, study_id)
        trial = _trial(s, study_id, number)
        reports = s.scalars(
            select(TrialReport)
            .where(TrialReport.trial_id == trial.id)
            .order_by(TrialReport.attempt, TrialReport.step)
        ).all()
        leases = s.execute(
            select(Lease.attempt, Lease.worker_id, Lease.granted_at, Lease.last_step, Lease.state, Lease.stop_reason)
            .where(Lease.trial_id == trial.id)
            .order_by(Lease.attempt, Lease.granted_at)
        ).all()
        base = TrialPublic.model_validate(trial).model_dump()
        return TrialDetail(
            **base,
            metrics=trial.metrics,
            last_step=trial.last_step,
            failure_message=trial.failure_message,
            checkpoint_step=trial.checkpoint_step,
            reports=[Report.model_validate(r) for r in reports],
            attempt_history=[
                AttemptPublic(
                    attempt=row.attempt,
                    worker_id=row.worker_id,
                    started_at=row.granted_at,
                    last_step=row.last_step,
                    outcome=None if row.state == LeaseState.ACTIVE else row.stop_reason,
                )
                for row in leases
            ],
        )


def _trial(s: Session, study_id: int, number: int) -> Trial:
    trial = s.scalars(select(Trial).where(Trial.study_id == study_id, Trial.number == number)).first()
    if trial is None:
        raise NotFound(f"study {study_id} has no trial number {number}", field="number")
    return trial
