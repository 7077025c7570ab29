"""Input and output schemas of the study and trial endpoints (plain pydantic).

Inputs forbid unknown fields; outputs are what the API returns and the service
functions build, so routes stay one line. The study spec itself is
`service.spec.StudySpec`.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from service.models import StudyStatus, TrialState

MAX_PAGE = 200
# Largest id, trial number or offset accepted: PostgreSQL's `integer`. A bigger number in
# a path or query is a 422 naming it, never a database overflow turned into a 500.
MAX_DB_INT = 2**31 - 1


def _utc(value: datetime) -> datetime:
    # SQLite stores timestamps without their zone; every timestamp we write is UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Timestamp = Annotated[datetime, AfterValidator(_utc)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class TrialSort(enum.StrEnum):
    NUMBER = "number"
    VALUE = "value"
    DURATION = "duration"


class SortOrder(enum.StrEnum):
    ASC = "asc"
    DESC = "desc"


class EnqueueRequest(_In):
    """Configurations to try next, each a mapping of searched knob -> value."""

    configurations: list[dict[str, Any]] = Field(min_length=1, max_length=100)


class TrialSummary(_Out):
    number: int
    state: TrialState
    params: dict[str, Any]
    values: list[float] | None = None
    value: float | None = None
    duration_s: float | None = None


class StateCounts(BaseModel):
    waiting: int = 0
    running: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0


class StudyPublic(_Out):
    id: int
    name: str
    owner: str
    optuna_name: str = Field(description="The Optuna study name: `optuna.load_study(study_name=..., storage=...)`.")
    status: StudyStatus
    status_reason: str | None = Field(None, description="Why the study stopped on its own (status failed).")
    directions: list[str]
    objectives: list[str]
    n_trials: int | None
    max_parallel: int
    n_started: int
    n_running: int
    n_complete: int
    n_pruned: int
    n_failed: int
    best_trial_number: int | None
    best_value: float | None
    created_at: Timestamp
    updated_at: Timestamp
    finished_at: Timestamp | None


class StudiesPublic(BaseModel):
    data: list[StudyPublic]
    count: int = Field(description="Studies matching the filter, over all pages.")


class StudyDetail(StudyPublic):
    spec: dict[str, Any]
    counts: StateCounts = Field(description="Trials per state, counted from the trial table.")
    best_trial: TrialSummary | None = Field(description="Best complete trial (first objective); null if none.")


class StudyCreated(StudyDetail):
    warm_started: int = Field(0, description="Configurations enqueued from the warm-start study.")


class BestTrials(BaseModel):
    """The best trial of a single-objective study, or the Pareto front of a multi-objective one."""

    directions: list[str]
    objectives: list[str]
    trials: list[TrialSummary]


class EnqueueResult(BaseModel):
    study_id: int
    trial_numbers: list[int]


class Report(_Out):
    attempt: int
    step: int
    metrics: dict[str, Any]
    created_at: Timestamp


class TrialPublic(_Out):
    number: int
    state: TrialState
    params: dict[str, Any]
    values: list[float] | None
    value: float | None
    attempts: int
    worker_id: str | None
    duration_s: float | None
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    failure_reason: str | None = Field(description="Why the current attempt failed; null unless it did.")


class TrialsPublic(BaseModel):
    data: list[TrialPublic]
    count: int


class AttemptPublic(BaseModel):
    """One lease of the trial: who ran the attempt and how it ended."""

    attempt: int
    worker_id: str
    started_at: Timestamp
    last_step: int | None
    outcome: str | None = Field(
        description="null while it runs; else complete, pruned, expired (lease lost) or the failure reason."
    )


class TrialDetail(TrialPublic):
    metrics: dict[str, Any] | None
    last_step: int | None
    failure_message: str | None
    checkpoint_step: int | None
    reports: list[Report] = Field(description="Intermediate evaluations (the learning curve), by attempt and step.")
    attempt_history: list[AttemptPublic] = Field(
        default_factory=list,
        description="Every attempt, oldest first. failure_reason and failure_message describe the current "
        "attempt only; earlier attempts' outcomes are here.",
    )
