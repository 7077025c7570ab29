"""The service's own tables (`tf_*`). Optuna's tables live beside them, untouched.

Dashboard and list endpoints read these indexed tables, never Optuna's private ones.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as strings (no native PG enum types), so adding a state is a code change only.
    return Enum(cls, name=name, native_enum=False, length=20, values_callable=lambda e: [m.value for m in e])


class Role(enum.StrEnum):
    ADMIN = "admin"
    USER = "user"
    WORKER = "worker"


class StudyStatus(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    # The scheduler could not handle the study any more (a stored value it cannot use):
    # set by `service.scheduler.quarantine` so one bad study never stops the others.
    FAILED = "failed"


class TrialState(enum.StrEnum):
    WAITING = "waiting"  # enqueued (warm start or a retry), not leased yet
    RUNNING = "running"
    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAILED)


class LeaseState(enum.StrEnum):
    ACTIVE = "active"
    FINISHED = "finished"  # the holder completed or failed the trial
    EXPIRED = "expired"  # the reaper took it back


class User(Base):
    """Who owns studies and holds tokens. Ownership is this integer id, never a name: a
    name typed into `token create` cannot land on someone else's identity, because a
    new token gets a new user unless an existing one is named explicitly."""

    __tablename__ = "tf_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Token(Base):
    __tablename__ = "tf_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    user_id: Mapped[int] = mapped_column(ForeignKey("tf_users.id", name="fk_tf_tokens_user_id"), index=True)
    role: Mapped[Role] = mapped_column(_enum(Role, "tf_role"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    user: Mapped[User] = relationship()


class Study(Base):
    __tablename__ = "tf_studies"
    __table_args__ = (
        UniqueConstraint("owner_id", "name", name="uq_tf_studies_owner_name"),
        Index("ix_tf_studies_status", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    owner_id: Mapped[int] = mapped_column(ForeignKey("tf_users.id", name="fk_tf_studies_owner_id"))
    optuna_name: Mapped[str] = mapped_column(String(200), unique=True)
    status: Mapped[StudyStatus] = mapped_column(_enum(StudyStatus, "tf_study_status"), default=StudyStatus.RUNNING)
    # Why a study stopped on its own (status failed): what its owner reads first.
    status_reason: Mapped[str | None] = mapped_column(String(500))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    directions: Mapped[list[Any]] = mapped_column(JSON)
    # Metric names the study optimises, in the order of `directions` (what leases tell workers).
    objectives: Mapped[list[Any]] = mapped_column(JSON, default=list)
    n_trials: Mapped[int | None] = mapped_column(Integer)
    max_parallel: Mapped[int] = mapped_column(Integer, default=1)
    max_retries: Mapped[int] = mapped_column(Integer, default=0)
    timeout_s: Mapped[float | None] = mapped_column(Float)
    trial_timeout_s: Mapped[float | None] = mapped_column(Float)
    # Counters kept in step with trial transitions, so list pages never count rows.
    n_started: Mapped[int] = mapped_column(Integer, default=0)
    n_running: Mapped[int] = mapped_column(Integer, default=0)
    n_complete: Mapped[int] = mapped_column(Integer, default=0)
    n_pruned: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)
    best_trial_number: Mapped[int | None] = mapped_column(Integer)
    best_value: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    trials: Mapped[list[Trial]] = relationship(
        back_populates="study", cascade="all, delete-orphan", passive_deletes=True
    )
    # Lazy on purpose: the scheduler locks study rows FOR UPDATE, and a joined load would
    # lock the owner's user row too, serialising every grant of that user's studies.
    owner_user: Mapped[User] = relationship()

    @property
    def owner(self) -> str:
        """The owner's name, for output (`StudyPublic.owner`); checks compare `owner_id`."""
        return self.owner_user.name


class Trial(Base):
    """One configuration of a study. Retries are new attempts of the same row; each
    attempt is its own Optuna trial (the failed one stays FAIL in Optuna)."""

    __tablename__ = "tf_trials"
    __table_args__ = (
        UniqueConstraint("study_id", "number", name="uq_tf_trials_study_number"),
        Index("ix_tf_trials_study_state", "study_id", "state"),
        Index("ix_tf_trials_study_value", "study_id", "value"),
        # The trials page sorts by duration too; without this a big study sorts in memory.
        Index("ix_tf_trials_study_duration", "study_id", "duration_s"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("tf_studies.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[TrialState] = mapped_column(_enum(TrialState, "tf_trial_state"), default=TrialState.WAITING)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    optuna_trial_id: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    values: Mapped[list[Any] | None] = mapped_column(JSON)
    value: Mapped[float | None] = mapped_column(Float)  # first objective, indexed for sorting
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    last_step: Mapped[int | None] = mapped_column(Integer)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    failure_reason: Mapped[str | None] = mapped_column(String(20))
    failure_message: Mapped[str | None] = mapped_column(Text)
    failure_traceback: Mapped[str | None] = mapped_column(Text)
    checkpoint_path: Mapped[str | None] = mapped_column(String(1000))
    checkpoint_step: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    duration_s: Mapped[float | None] = mapped_column(Float)

    study: Mapped[Study] = relationship(back_populates="trials")


class TrialReport(Base):
    """One intermediate evaluation: the learning curve, readable without Optuna."""

    __tablename__ = "tf_trial_reports"
    __table_args__ = (Index("ix_tf_trial_reports_trial_step", "trial_id", "attempt", "step", unique=True),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("tf_trials.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Lease(Base):
    __tablename__ = "tf_leases"
    __table_args__ = (
        Index("ix_tf_leases_state_expires", "state", "expires_at"),
        Index("ix_tf_leases_trial", "trial_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("tf_trials.id", ondelete="CASCADE"))
    study_id: Mapped[int] = mapped_column(ForeignKey("tf_studies.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str] = mapped_column(String(200))
    # The token that took the lease: only it may use the lease. None for leases granted
    # before migration 0002 and with auth disabled (no tokens at all).
    token_id: Mapped[int | None] = mapped_column(ForeignKey("tf_tokens.id", name="fk_tf_leases_token_id"))
    slot: Mapped[str | None] = mapped_column(String(100))
    state: Mapped[LeaseState] = mapped_column(_enum(LeaseState, "tf_lease_state"), default=LeaseState.ACTIVE)
    granted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_step: Mapped[int | None] = mapped_column(Integer)
    stop_reason: Mapped[str | None] = mapped_column(String(50))
