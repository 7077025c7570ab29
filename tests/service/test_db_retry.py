"""`Database.run` re-runs a unit of work that lost a deadlock or a lock wait, and says
"still locked" (503) when it keeps losing; any other error is not retried."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from service.context import ServiceContext
from service.errors import Unavailable
from service.models import Role, Token, User


def _two_tokens(ctx: ServiceContext) -> tuple[int, int]:
    from service import auth

    auth.create_token(ctx.db, "first", Role.USER)
    auth.create_token(ctx.db, "second", Role.USER)
    with ctx.db.scope() as s:
        ids = s.scalars(select(Token.id).order_by(Token.id)).all()
    return ids[0], ids[1]


@pytest.mark.postgres
@pytest.mark.parametrize("upgraded_db_url", ["postgresql"], indirect=True)
def test_a_real_deadlock_is_retried_and_both_units_of_work_land(ctx: ServiceContext) -> None:
    """Two transactions lock two rows in opposite orders: PostgreSQL kills one of them
    (SQLSTATE 40P01) and `run` re-runs it, so both renames are stored. (SQLite has one
    writer at a time and cannot deadlock.)"""
    assert ctx.db.engine.dialect.name == "postgresql"
    a, b = _two_tokens(ctx)
    both_hold_one = threading.Barrier(2, timeout=30)
    calls = {"x": 0, "y": 0}

    def rename(first: int, second: int, label: str) -> Any:
        def work(s: Session) -> None:
            calls[label] += 1
            s.execute(text("UPDATE tf_tokens SET name = :n WHERE id = :i"), {"n": f"{label}-1", "i": first})
            s.flush()
            if calls[label] == 1:
                both_hold_one.wait()  # only the first run meets the other: a retry runs alone
            s.execute(text("UPDATE tf_tokens SET name = :n WHERE id = :i"), {"n": f"{label}-2", "i": second})

        return work

    errors: list[BaseException] = []

    def run(first: int, second: int, label: str) -> None:
        try:
            ctx.db.run(rename(first, second, label))
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(a, b, "x")),
        threading.Thread(target=run, args=(b, a, "y")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert ctx.db.retried >= 1
    assert calls["x"] + calls["y"] >= 3  # the loser ran again
    with ctx.db.scope() as s:
        names = set(s.scalars(select(Token.name).where(Token.id.in_([a, b]))).all())
    # Whoever ran last wrote both rows.
    assert names in ({"x-1", "x-2"}, {"y-1", "y-2"})


class _Locked(Exception):
    sqlstate = "40P01"


def test_a_unit_of_work_that_stays_locked_is_a_503_after_every_attempt(ctx: ServiceContext) -> None:
    runs = 0

    def always_loses(s: Session) -> None:
        nonlocal runs
        runs += 1
        s.add(User(name=f"u{runs}"))
        s.flush()
        raise OperationalError("UPDATE tf_studies", {}, _Locked("deadlock detected"))

    before = ctx.db.retried
    with pytest.raises(Unavailable, match="stayed locked"):
        ctx.db.run(always_loses, attempts=3)
    assert runs == 3
    assert ctx.db.retried - before == 2
    with ctx.db.scope() as s:
        # every attempt was rolled back
        assert s.scalar(select(User.id).where(User.name.like("u%"))) is None


def test_sqlite_busy_is_retried_like_a_deadlock(ctx: ServiceContext) -> None:
    runs = 0

    def busy_once(s: Session) -> int:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise OperationalError("UPDATE tf_studies", {}, Exception("database is locked"))
        return 42

    assert ctx.db.run(busy_once) == 42
    assert runs == 2


def test_other_errors_are_not_retried(ctx: ServiceContext) -> None:
    runs = 0

    def conflict(_s: Session) -> None:
        nonlocal runs
        runs += 1
        raise IntegrityError("INSERT", {}, Exception("duplicate key"))

    with pytest.raises(IntegrityError):
        ctx.db.run(conflict)
    assert runs == 1
