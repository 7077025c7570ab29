"""Messages between worker agents and the service, and how a trial can end.

Shared by both sides: the service imports these schemas for its lease routes, the
agent for its HTTP calls. Plain pydantic, no web framework.
"""

from __future__ import annotations

import enum
import math
import re
from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from trainer.config import TrialConfig

# The service keeps steps in 32-bit Integer columns; a bigger one would overflow the
# insert on PostgreSQL and be stored as garbage elsewhere.
MAX_STEP = 2**31 - 1
MAX_METRICS = 64
MAX_METRIC_NAME = 100
MAX_MESSAGE = 20_000
MAX_TRACEBACK = 200_000

# Lone surrogates cannot be encoded to UTF-8, so a database driver fails on them; NUL
# ends a C string (PostgreSQL refuses it in text). Names are one line: no control
# characters at all. Free text keeps tabs and line breaks.
_NAME_BAD = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
_TEXT_BAD = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def _one_line(value: str) -> str:
    if _NAME_BAD.search(value):
        raise ValueError("must not contain control characters, NUL or unpaired surrogates")
    return value


def _text(value: str) -> str:
    if _TEXT_BAD.search(value):
        raise ValueError("must not contain NUL, control characters other than tab and newline, or unpaired surrogates")
    return value


def clean_text(value: str, limit: int, *, keep_end: bool = False) -> str:
    """`value` made acceptable as free text in a message: what the server would refuse is
    replaced, and it is cut to `limit` characters (its last ones with `keep_end`, where a
    traceback says what went wrong). For the sender (an exception's text can hold
    anything), so that a failure report is never itself refused."""
    cleaned = _TEXT_BAD.sub("\ufffd", value)
    return cleaned[max(len(cleaned) - limit, 0) :] if keep_end else cleaned[:limit]


def finite_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics a report may carry: finite values under acceptable names, at most
    MAX_METRICS of them. For the sender: a diverged metric is left out rather than
    breaking the request (a non-finite loss ends the trial as `nan` on its own)."""
    kept: dict[str, float] = {}
    for name, value in metrics.items():
        if len(kept) >= MAX_METRICS:
            break
        if 0 < len(name) <= MAX_METRIC_NAME and not _NAME_BAD.search(name) and math.isfinite(value):
            kept[name] = float(value)
    return kept


Step = Annotated[int, Field(ge=0, le=MAX_STEP)]
OneLine = Annotated[str, AfterValidator(_one_line)]
Text = Annotated[str, AfterValidator(_text)]
MetricName = Annotated[str, Field(min_length=1, max_length=MAX_METRIC_NAME), AfterValidator(_one_line)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class FailureReason(enum.StrEnum):
    """Why a trial attempt did not complete."""

    OOM = "oom"
    NAN = "nan"
    TIMEOUT = "timeout"
    ERROR = "error"
    PREEMPTED = "preempted"


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


Metrics = Annotated[dict[MetricName, FiniteFloat], Field(max_length=MAX_METRICS)]


class LeaseRequest(_Msg):
    worker_id: OneLine = Field(min_length=1, max_length=200, description="Stable name of the agent (host:pid).")
    slot: OneLine | None = Field(None, max_length=100, description="Slot asking for work, e.g. 'gpu0/1'.")


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
    step: Step | None = None


class HeartbeatResponse(_Msg):
    expires_at: datetime
    stop: bool = Field(False, description="Stop the trial now (study cancelled or trial pruned).")
    reason: str | None = None


class ReportRequest(_Msg):
    step: Step = Field(description="Optimizer step the metrics were measured at.")
    metrics: Metrics


class ReportResponse(_Msg):
    prune: bool
    expires_at: datetime


class CompleteRequest(_Msg):
    metrics: Metrics = Field(description="Final validation metrics; the objectives are read from here.")
    step: Step
    duration_s: FiniteFloat = Field(ge=0.0)


class FailRequest(_Msg):
    reason: FailureReason
    message: Text = Field("", max_length=MAX_MESSAGE)
    traceback: Text | None = Field(None, max_length=MAX_TRACEBACK)
    step: Step | None = None


class FinishResponse(_Msg):
    trial_number: int
    state: str
