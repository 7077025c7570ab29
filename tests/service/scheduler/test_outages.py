"""Riding out outages (issue 14): dropped connections, a database the API cannot reach,
results that arrive after their lease expired, and what a retried trial shows.

`DbOutage` makes the database unreachable for chosen engines without touching the
shared PostgreSQL server: every statement fails as a dropped connection does, on
SQLite and PostgreSQL alike, until the outage ends.
"""

from __future__ import annotations

from collections import Counter

import optuna
import pytest
import sqlalchemy as sa
from db_outage_helpers import DbOutage
from sched_test_helpers import expire, must_grant, optuna_trials, req, trial_row
from sqlalchemy import select

from service import trials
from service.context import ServiceContext
from service.errors import LeaseLost, Unavailable
from service.models import Lease, LeaseState, TrialState
from service.scheduler import Scheduler
from service.scheduler.reaper import pause_lease_clocks, reap_once
from trainer.protocol import CompleteRequest, FailRequest, HeartbeatRequest

OptunaState = optuna.trial.TrialState
PG_ONLY = pytest.mark.parametrize("upgraded_db_url", ["postgresql"], indirect=True)


def done(acc: float) -> CompleteRequest:
    return CompleteRequest(metrics={"accuracy": acc}, step=5, duration_s=2.0)


def _terminate_backends(ctx: ServiceContext) -> None:
    """What a PostgreSQL restart does to every pooled connection of this test database."""
    engine = sa.create_engine(ctx.settings.database_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            conn.commit()
    finally:
        engine.dispose()


@PG_ONLY
def test_dropped_connections_cost_nothing(ctx: ServiceContext, sched: Scheduler, make_study, check_counters) -> None:
    study_id = make_study(max_retries=1, max_parallel=3, n_trials=6)
    grants = [must_grant(sched, f"w{i}") for i in range(3)]
    first_ids = {g.lease_id: trial_row(ctx, study_id, g.trial_number).optuna_trial_id for g in grants}
    _terminate_backends(ctx)
    assert sched.complete(grants[0].lease_id, done(0.7)).state == "complete"
    _terminate_backends(ctx)
    expire(ctx, grants[1].lease_id)
    _terminate_backends(ctx)
    stats = reap_once(sched)  # a failing pass raises
    assert (stats.expired, stats.retried) == (1, 1)
    _terminate_backends(ctx)
    assert sched.fail(grants[2].lease_id, FailRequest(reason="oom", message="CUDA out of memory")).state == "failed"
    _terminate_backends(ctx)
    reap_once(sched)

    by_id = optuna_trials(ctx, study_id)
    completed = by_id[first_ids[grants[0].lease_id]]
    assert (completed.state, completed.values) == (OptunaState.COMPLETE, [0.7])
    expired = by_id[first_ids[grants[1].lease_id]]
    assert expired.state == OptunaState.FAIL
    assert expired.user_attrs.get("tf_failure_reason") == "expired"
    assert "tf_discarded" not in expired.user_attrs
    oom = by_id[first_ids[grants[2].lease_id]]
    assert oom.state == OptunaState.PRUNED and oom.user_attrs.get("tf_failure_reason") == "oom"
    retry = trial_row(ctx, study_id, grants[1].trial_number)
    assert (retry.state, retry.attempts) == (TrialState.WAITING, 2)
    assert by_id[retry.optuna_trial_id].state == OptunaState.RUNNING
    check_counters(study_id)


def test_late_complete_is_recorded_on_its_attempt_and_the_retry_dropped(
    ctx: ServiceContext, sched: Scheduler, make_study, check_counters
) -> None:
    study_id = make_study(max_retries=2, max_parallel=1, n_trials=2)
    old = must_grant(sched)
    first_optuna_id = trial_row(ctx, study_id, old.trial_number).optuna_trial_id
    expire(ctx)
    assert reap_once(sched).retried == 1
    retry_optuna_id = trial_row(ctx, study_id, old.trial_number).optuna_trial_id
    assert retry_optuna_id is not None

    # The worker's result arrives after the reaper took the lease back, before the retry ran.
    assert sched.complete(old.lease_id, done(0.8)).state == "complete"
    assert sched.complete(old.lease_id, done(0.8)).state == "complete"  # a repeat answers the same
    trial = trial_row(ctx, study_id, old.trial_number)
    assert (trial.state, trial.attempts, trial.values) == (TrialState.COMPLETE, 1, [0.8])
    assert (trial.failure_reason, trial.failure_message) == (None, None)
    study = check_counters(study_id)
    assert (study.n_complete, study.n_started, study.n_running, study.best_value) == (1, 1, 0, 0.8)

    # No retry runs: the next lease is the study's second trial, on its first attempt.
    nxt = must_grant(sched, "w2")
    assert nxt.trial_number != old.trial_number and nxt.attempt == 1
    with ctx.db.scope() as s:
        leases = s.execute(select(Lease.attempt, Lease.stop_reason).where(Lease.trial_id == trial.id)).all()
    assert [(r.attempt, r.stop_reason) for r in leases] == [(1, "complete")]

    by_id = optuna_trials(ctx, study_id)
    assert by_id[first_optuna_id].state == OptunaState.FAIL
    assert by_id[retry_optuna_id].state == OptunaState.FAIL and "tf_discarded" in by_id[retry_optuna_id].user_attrs
    carrier = by_id[trial.optuna_trial_id]
    assert (carrier.state, carrier.values) == (OptunaState.COMPLETE, [0.8])
    assert carrier.params == by_id[first_optuna_id].params
    assert carrier.user_attrs["tf_attempt"] == 1
    states = Counter(t.state for t in by_id.values() if t.user_attrs.get("tf_trial_number") == old.trial_number)
    assert states[OptunaState.RUNNING] == 0


def test_late_fail_is_recorded_and_decides_the_retry(
    ctx: ServiceContext, sched: Scheduler, make_study, check_counters
) -> None:
    study_id = make_study(max_retries=2, max_parallel=1, n_trials=2)
    old = must_grant(sched)
    expire(ctx)
    reap_once(sched)
    retry_optuna_id = trial_row(ctx, study_id, old.trial_number).optuna_trial_id
    # Out of memory is never retried: the late answer ends the trial and drops its retry.
    assert sched.fail(old.lease_id, FailRequest(reason="oom", message="CUDA out of memory")).state == "failed"
    trial = trial_row(ctx, study_id, old.trial_number)
    assert (trial.state, trial.attempts, trial.failure_reason) == (TrialState.FAILED, 1, "oom")
    study = check_counters(study_id)
    assert (study.n_failed, study.n_started) == (1, 1)
    by_id = optuna_trials(ctx, study_id)
    assert by_id[retry_optuna_id].state == OptunaState.FAIL
    assert by_id[trial.optuna_trial_id].state == OptunaState.PRUNED  # the sampler learns to avoid it
    assert must_grant(sched, "w2").trial_number != old.trial_number


def test_a_result_past_expiry_lands_before_the_reaper_runs(
    ctx: ServiceContext, sched: Scheduler, make_study, check_counters
) -> None:
    study_id = make_study(max_retries=1, max_parallel=1, n_trials=1)
    g = must_grant(sched)
    expire(ctx)
    with pytest.raises(LeaseLost):  # heartbeats and reports on an expired lease are still refused
        sched.heartbeat(g.lease_id, HeartbeatRequest(step=1))
    assert sched.complete(g.lease_id, done(0.6)).state == "complete"
    assert reap_once(sched).expired == 0
    study = check_counters(study_id)
    assert (study.status, study.n_complete) == ("completed", 1)


def test_lease_clocks_pause_across_a_database_outage(
    ctx: ServiceContext, sched: Scheduler, make_study, check_counters
) -> None:
    study_id = make_study(max_retries=1, max_parallel=1, n_trials=1)
    ctx.db.on_reconnect(lambda s: pause_lease_clocks(sched, s))  # what the app's lifespan registers
    g = must_grant(sched)
    outage = DbOutage(ctx.db.engine, ctx.storage.engine)  # type: ignore[attr-defined]
    with outage.active():
        with pytest.raises(Unavailable):
            reap_once(sched)
        with pytest.raises(Unavailable):
            sched.heartbeat(g.lease_id, HeartbeatRequest(step=3))
    assert ctx.db.last_failure is not None
    # Longer than a lease period passed while the database was away.
    expire_raw(ctx)
    stats = reap_once(sched)
    assert stats.expired == 0, "the lease clock stood still while the database was away"
    assert sched.heartbeat(g.lease_id, HeartbeatRequest(step=4)).stop is False
    assert sched.complete(g.lease_id, done(0.9)).state == "complete"
    with ctx.db.scope() as s:
        assert s.scalars(select(Lease.state)).all() == [LeaseState.FINISHED]
    check_counters(study_id)


def expire_raw(ctx: ServiceContext) -> None:
    """Move every active lease's expiry into the past without going through `Database.scope`
    (which would run the reconnect hook first)."""
    from datetime import UTC, datetime, timedelta

    with ctx.db.engine.begin() as conn:
        conn.execute(
            sa.update(Lease)
            .where(Lease.state == LeaseState.ACTIVE)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )


def test_a_trial_completed_on_its_retry_shows_its_own_outcome(
    ctx: ServiceContext, sched: Scheduler, make_study, principal
) -> None:
    study_id = make_study(max_retries=1, max_parallel=1, n_trials=1)
    first = must_grant(sched)
    sched.fail(first.lease_id, FailRequest(reason="preempted", message="SIGTERM at /home/me/run/work/slot-0"))
    running = trials.get_trial(ctx.db, principal, study_id, first.trial_number)
    assert running.failure_reason == "preempted"  # waiting for its retry: why it is waiting
    second = sched.grant(req("w2"))
    assert second is not None and second.attempt == 2
    running = trials.get_trial(ctx.db, principal, study_id, first.trial_number)
    assert (running.state, running.failure_reason, running.failure_message) == (TrialState.RUNNING, None, None)
    sched.complete(second.lease_id, done(0.75))

    detail = trials.get_trial(ctx.db, principal, study_id, first.trial_number)
    assert (detail.state, detail.failure_reason, detail.failure_message) == (TrialState.COMPLETE, None, None)
    assert [(a.attempt, a.worker_id, a.outcome) for a in detail.attempt_history] == [
        (1, "w1", "preempted"),
        (2, "w2", "complete"),
    ]
    listed = trials.list_trials(ctx.db, principal, study_id).data
    assert [(t.number, t.failure_reason) for t in listed] == [(first.trial_number, None)]
