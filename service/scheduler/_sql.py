"""Small SQL helpers shared by the scheduler: write locks, guarded updates, time."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from service.models import Study


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(ts: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if ts is None or ts.tzinfo is not None:
        return ts
    return ts.replace(tzinfo=UTC)


def is_sqlite(s: Session) -> bool:
    bind = s.get_bind()
    return bind.dialect.name == "sqlite"


def begin_write(s: Session) -> None:
    """SQLite: take the database write lock at the start of the transaction.

    SQLite serialises writers but a deferred transaction only asks for the lock at its
    first write, after its reads; two grants could then both pass the max_parallel
    check. A no-op UPDATE as the first statement makes this transaction the writer
    before it reads anything (the busy timeout queues the others), like
    BEGIN IMMEDIATE. PostgreSQL uses row locks instead (`lock_study`).
    """
    if is_sqlite(s):
        s.execute(text("UPDATE tf_studies SET id = id WHERE 0"))


def lock_study(s: Session, study_id: int, *, skip_locked: bool = False) -> Study | None:
    """The study row, locked until commit (PostgreSQL `FOR UPDATE [SKIP LOCKED]`).

    None when it does not exist or, with skip_locked, another transaction holds it.
    On SQLite the caller already holds the write lock (`begin_write`).
    """
    q = select(Study).where(Study.id == study_id).execution_options(populate_existing=True)
    if not is_sqlite(s):
        q = q.with_for_update(skip_locked=skip_locked)
    return s.scalars(q).first()


def guarded_update(s: Session, model: Any, where: list[Any], values: dict[str, Any]) -> int:
    """UPDATE ... WHERE <expected state>; the rowcount says whether we won the race."""
    # A Core UPDATE on the mapped table: no ORM bulk-update machinery on the hot paths.
    stmt = update(model.__table__).where(*where).values(**values)
    return int(s.execute(stmt).rowcount or 0)  # type: ignore[attr-defined]


def timed_out(study: Any, now: datetime) -> bool:
    """The study's timeout counts from its creation."""
    if study.timeout_s is None:
        return False
    created = aware(study.created_at)
    assert created is not None
    # Compared as floats: a stored 1e300 (or inf) would overflow `timedelta`; NaN never times out.
    return (now - created).total_seconds() >= float(study.timeout_s)


def past(start: datetime, limit_s: float, now: datetime) -> bool:
    """More than `limit_s` seconds have gone by since `start` (safe for absurd limits)."""
    return (now - start).total_seconds() > float(limit_s)
