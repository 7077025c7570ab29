"""The reaper: expired leases retried from their checkpoint, exactly once across processes;
study timeouts; waiting rows of ended studies; repairs after a crash before the Optuna sync."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

import optuna
import pytest
from sched_test_helpers import expire, must_grant, optuna_trials, req, study_row, trial_row, upload
from sqlalchemy import select, update

from service import studies
from service.context import ServiceContext
from service.errors import LeaseLost
from service.models import Study, StudyStatus, Trial, TrialState
from service.scheduler import Scheduler, get_scheduler
from service.scheduler._sql import utcnow
from service.scheduler.reaper import reap_once
from service.settings import Settings
from trainer.protocol import CompleteRequest, FailRequest, HeartbeatRequest

OptunaState = optuna.trial.TrialState


def done(acc: float) -> CompleteRequest:
    return CompleteRequest(metrics={"accuracy": acc}, step=5, duration_s=2.0)


def test_expired_lease_is_retried_from_its_checkpoint(
    ctx: ServiceContext, sched: Scheduler, make_study, check_counters
) -> None:
    study_id = make_study(max_retries=1, max_parallel=1)
    first = must_grant(sched)
    upload(sched, first.lease_id, step=7)
    expire(ctx)
    stats = reap_once(sched)
    assert (stats.expired, stats.retried) == (1, 1)
    trial = trial_row(ctx, study_id, first.trial_number)
    assert (trial.state, trial.attempts, trial.failure_reason) == (TrialState.WAITING, 2, "expired")
    assert "no heartbeat" in (trial.failure_message or "")
    retry = must_grant(sched, "w2")
    assert (retry.trial_number, retry.attempt, retry.resume_checkpoint) == (first.trial_number, 2, True)
    assert retry.config == first.config
    found = sched.checkpoints.for_lease(retry.lease_id)
    assert found.step == 7 and found.path.parent.name == "attempt-1"
    assert reap_once(sched).expired == 0  # nothing more to do
    check_counters(study_id)


def test_late_complete_from_expired_lease_is_refused_and_the_retry_wins(
    ctx: ServiceContext, sched: Scheduler, make_study, check_counters
) -> None:
    study_id = make_study(max_retries=2, max_parallel=1)
    old = must_grant(sched)
    expire(ctx)
    reap_once(sched)
    # Once the retry has started, the expired attempt's result is too late (before that
    # it would be taken: test_outages.py).
    new = must_grant(sched, "w2")
    with pytest.raises(LeaseLost):
        sched.complete(old.lease_id, done(0.99))
    with pytest.raises(LeaseLost):
        sched.heartbeat(old.lease_id, HeartbeatRequest())
    assert sched.complete(new.lease_id, done(0.5)).state == "complete"
    with pytest.raises(LeaseLost):
        sched.complete(old.lease_id, done(0.99))
    trial = trial_row(ctx, study_id, old.trial_number)
    assert (trial.state, trial.values, trial.attempts) == (TrialState.COMPLETE, [0.5], 2)
    study = check_counters(study_id)
    assert (study.best_value, study.n_complete, study.n_started) == (0.5, 1, 1)
    states = Counter(t.state for t in optuna_trials(ctx, study_id).values() if t.params == trial.params)
    assert states == {OptunaState.FAIL: 1, OptunaState.COMPLETE: 1}


def test_expiry_uses_up_retries_then_fails_for_good(ctx: ServiceContext, sched: Scheduler, make_study) -> None:
    study_id = make_study(max_retries=1, max_parallel=1)
    grant = must_grant(sched)
    expire(ctx)
    reap_once(sched)
    grant = must_grant(sched)
    expire(ctx)
    stats = reap_once(sched)
    assert (stats.expired, stats.failed) == (1, 1)
    trial = trial_row(ctx, study_id, grant.trial_number)
    assert (trial.state, trial.failure_reason, trial.attempts) == (TrialState.FAILED, "expired", 2)


@pytest.mark.parametrize("upgraded_db_url", ["postgresql"], indirect=True)
def test_two_api_processes_reap_each_lease_exactly_once(
    ctx: ServiceContext, settings: Settings, make_study, check_counters
) -> None:
    study_id = make_study(max_retries=3, max_parallel=8, n_trials=8)
    first = get_scheduler(ctx)
    grants = [must_grant(first, f"w{i}") for i in range(8)]
    expire(ctx)
    # A second "API process": its own Database, Optuna storage and scheduler on the same server.
    other_ctx = ServiceContext.build(settings)
    try:
        schedulers = [first, get_scheduler(other_ctx)]
        results: list[int] = []
        barrier = threading.Barrier(4)

        def run(s: Scheduler) -> None:
            barrier.wait()
            results.append(reap_once(s).expired)

        threads = [threading.Thread(target=run, args=(s,)) for s in schedulers * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        other_ctx.close()
    assert sum(results) == 8
    with ctx.db.scope() as s:
        rows = s.execute(select(Trial.number, Trial.state, Trial.attempts).where(Trial.study_id == study_id)).all()
    by_number = {r.number: r for r in rows}
    for g in grants:
        assert (by_number[g.trial_number].state, by_number[g.trial_number].attempts) == (TrialState.WAITING, 2)
    study = check_counters(study_id)
    assert study.n_running == 0
    # One FAIL per expired attempt and one new RUNNING retry trial per tf trial: no duplicates.
    linked = Counter(t.user_attrs.get("tf_trial_number") for t in optuna_trials(ctx, study_id).values())
    assert all(linked[g.trial_number] == 1 for g in grants)
    states = Counter(t.state for t in optuna_trials(ctx, study_id).values())
    assert states[OptunaState.FAIL] == 8


def test_timeout_stops_grants_then_completes(ctx: ServiceContext, sched: Scheduler, make_study) -> None:
    study_id = make_study(n_trials=None, timeout_s=3600, max_parallel=2)
    running = must_grant(sched)
    sched.buffer.fill_one(study_id, blocking=True)  # a pre-asked trial that will never run
    with ctx.db.scope() as s:
        s.execute(update(Study).where(Study.id == study_id).values(created_at=utcnow() - timedelta(hours=2)))
    assert sched.grant(req()) is None
    stats = reap_once(sched)
    assert stats.dropped == 1 and stats.completed_studies == 0  # one trial still runs
    assert sched.complete(running.lease_id, done(0.4)).state == "complete"
    reap_once(sched)
    study = study_row(ctx, study_id)
    assert study.status == StudyStatus.COMPLETED and study.n_complete == 1
    # The pre-asked Optuna trial was told FAIL, so nothing stays RUNNING.
    assert all(t.state.is_finished() for t in optuna_trials(ctx, study_id).values())


def test_cancelled_study_winds_down_waiting_retries(
    ctx: ServiceContext, sched: Scheduler, make_study, principal, check_counters
) -> None:
    study_id = make_study(max_retries=2, max_parallel=2)
    a, b = must_grant(sched), must_grant(sched)
    sched.fail(a.lease_id, FailRequest(reason="error", message="x"))  # a retry now waits
    studies.cancel_study(ctx.db, principal, study_id)
    sched.complete(b.lease_id, done(0.6))  # a trial running at cancel time still counts
    reap_once(sched)
    assert trial_row(ctx, study_id, a.trial_number).state == TrialState.WAITING  # settling first
    with ctx.db.scope() as s:
        s.execute(update(Study).where(Study.id == study_id).values(finished_at=utcnow() - timedelta(hours=1)))
    stats = reap_once(sched)
    assert stats.failed == 1
    trial = trial_row(ctx, study_id, a.trial_number)
    assert trial.state == TrialState.FAILED and "study cancelled" in (trial.failure_message or "")
    study = check_counters(study_id)
    assert (study.status, study.n_complete, study.n_failed) == (StudyStatus.CANCELLED, 1, 1)
    assert all(t.state.is_finished() for t in optuna_trials(ctx, study_id).values())


def test_repairs_after_a_crash_before_the_optuna_sync(
    ctx: ServiceContext, sched: Scheduler, make_study, check_counters
) -> None:
    study_id = make_study(max_retries=1, max_parallel=2)
    a, b = must_grant(sched), must_grant(sched)
    # Commit the tf side only, as if the process died before telling Optuna.
    sched.db.run(lambda s: sched._finish_tx(s, a.lease_id, "complete", [0.7], complete=done(0.7)))
    sched.db.run(lambda s: sched._finish_tx(s, b.lease_id, "error", None, fail=FailRequest(reason="error")))
    reap_once(sched, repair_grace_s=0)  # sees the unattached retry once: leaves it to its process
    assert trial_row(ctx, study_id, b.trial_number).optuna_trial_id is None
    stats = reap_once(sched, repair_grace_s=0)
    assert stats.repaired >= 1
    trials = optuna_trials(ctx, study_id)
    ta, tb = trial_row(ctx, study_id, a.trial_number), trial_row(ctx, study_id, b.trial_number)
    assert trials[ta.optuna_trial_id].state == OptunaState.COMPLETE and trials[ta.optuna_trial_id].values == [0.7]
    assert tb.optuna_trial_id is not None and trials[tb.optuna_trial_id].state == OptunaState.RUNNING
    # b's first attempt, which no row holds any more, was told FAIL.
    same = [t for t in trials.values() if t.params == tb.params]
    assert Counter(t.state for t in same) == {OptunaState.FAIL: 1, OptunaState.RUNNING: 1}
    retry = must_grant(sched)
    assert (retry.trial_number, retry.attempt) == (b.trial_number, 2)
    check_counters(study_id)
