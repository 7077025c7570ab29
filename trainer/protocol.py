"""Messages between worker agents and the service, and how a trial can end.

Shared by both sides: the service imports these schemas for its lease routes, the
agent for its HTTP calls. Plain pydantic, no web framework.
"""

from __future__ import annotations

import enum
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from trainer.config import TrialConfig


class FailureReason(enum.StrEnum):
    """Why a trial attempt did not complete."""

    OOM = "oom"
    NAN = "nan"
    TIMEOUT = "timeout"
    ERROR = "error"
    PREEMPTED = "preempted"


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


Metrics = dict[str, float]


class LeaseRequest(_Msg):
    worker_id: str = Field(min_length=1, max_length=200, description="Stable name of the agent (host:pid).")
    slot: str | None = Field(None, max_length=100, description="Slot asking for work, e.g. 'gpu0/1'.")


class LeaseGrant(_Msg):
    lease_id: str
    study_id: int
    study_name: str
    trial_number: int
    attempt: int = Field(description="1 for the first run of a trial, 2+ for retries.")
    expires_at: datetime
    heartbeat_interval_s: float
    trial_timeout_s: float | None
    config: TrialConfig
    resume_checkpoint: bool = Field(
        False, description="A checkpoint from an earlier attempt can be downloaded for this lease."
    )
    objectives: list[str] = Field(description="Metric names the study optimises, in order.")


class HeartbeatRequest(_Msg):
    step: int | None = Field(None, ge=0)


class HeartbeatResponse(_Msg):
    expires_at: datetime
    stop: bool = Field(False, description="Stop the trial now (study cancelled or trial pruned).")
    reason: str | None = None


class ReportRequest(_Msg):
    step: int = Field(ge=0, description="Optimizer step the metrics were measured at.")
    metrics: Metrics


class ReportResponse(_Msg):
    prune: bool
    expires_at: datetime


class CompleteRequest(_Msg):
    metrics: Metrics = Field(description="Final validation metrics; the objectives are read from here.")
    step: int = Field(ge=0)
    duration_s: float = Field(ge=0.0)


class FailRequest(_Msg):
    reason: FailureReason
    message: str = Field("", max_length=20_000)
    traceback: str | None = Field(None, max_length=200_000)
    step: int | None = Field(None, ge=0)


class FinishResponse(_Msg):
    trial_number: int
    state: str
