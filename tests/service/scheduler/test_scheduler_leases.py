"""Grant, heartbeat, report, complete and fail: transitions, counters, idempotency, 409s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
import pytest
from sched_test_helpers import expire, must_grant, optuna_trials, req, study_row, trial_row
from sqlalchemy import func, select

from service import studies
from service.auth import Principal
from service.context import ServiceContext
from service.errors import Conflict, Invalid, LeaseLost
from service.models import Lease, LeaseState, StudyStatus, TrialReport, TrialState
from service.scheduler import Scheduler
from trainer.protocol import CompleteRequest, FailRequest, HeartbeatRequest, ReportRequest

OptunaState = optuna.trial.TrialState


def done(acc: float = 0.8, step: int = 10) -> CompleteRequest:
    return CompleteRequest(metrics={"accuracy": acc, "loss": 1 - acc, "f1_macro": acc}, step=step, duration_s=1.5)


def test_grant_starts_a_trial(ctx: ServiceContext, sched: Scheduler, make_study: Callable[..., int], check_counters):
    study_id = make_study()
    grant = must_grant(sched)
    assert grant.study_id == study_id and grant.attempt == 1 and not grant.resume_checkpoint
    assert grant.objectives == ["accuracy"]
    assert grant.heartbeat_interval_s == pytest.approx(ctx.settings.lease_timeout_s / 3)
    trial = trial_row(ctx, study_id, grant.trial_number)
    assert trial.state == TrialState.RUNNING and trial.attempts == 1 and trial.worker_id == "w1"
    # The config carries the sampled params, and conditional knobs hold.
    hp = grant.config.hparams
    assert hp.learning_rate == trial.params["learning_rate"] and hp.batch_size == trial.params["batch_size"]
    assert hp.unfreeze_depth <= hp.num_layers
    # Optuna's trial runs with the same params (define-by-run sampled server-side).
    frozen = optuna_trials(ctx, study_id)[trial.optuna_trial_id]
    assert frozen.state == OptunaState.RUNNING and frozen.params == trial.params
    study = check_counters(study_id)
    assert (study.n_started, study.n_running) == (1, 1)


def test_no_study_no_lease(sched: Scheduler) -> None:
    assert sched.grant(req()) is None


def test_heartbeat_report_complete(ctx: ServiceContext, sched: Scheduler, make_study, check_counters) -> None:
    study_id = make_study()
    grant = must_grant(sched)
    hb = sched.heartbeat(grant.lease_id, HeartbeatRequest(step=3))
    assert not hb.stop and hb.expires_at >= grant.expires_at
    for step, acc in ((1, 0.5), (2, 0.6), (2, 0.6)):  # the repeat is idempotent
        answer = sched.report(grant.lease_id, ReportRequest(step=step, metrics={"accuracy": acc, "loss": 0.3}))
        assert not answer.prune
    first = sched.complete(grant.lease_id, done(0.8))
    assert (first.trial_number, first.state) == (grant.trial_number, "complete")
    # Repeats answer the same and change nothing.
    assert sched.complete(grant.lease_id, done(0.8)) == first
    with pytest.raises(Conflict):
        sched.fail(grant.lease_id, FailRequest(reason="error"))
    trial = trial_row(ctx, study_id, grant.trial_number)
    assert trial.state == TrialState.COMPLETE and trial.values == [0.8] and trial.value == 0.8
    assert trial.metrics["loss"] == pytest.approx(0.2) and trial.duration_s == 1.5
    with ctx.db.scope() as s:
        steps = s.scalars(select(TrialReport.step).where(TrialReport.trial_id == trial.id)).all()
    assert sorted(steps) == [1, 2]
    frozen = optuna_trials(ctx, study_id)[trial.optuna_trial_id]
    assert frozen.state == OptunaState.COMPLETE and frozen.values == [0.8]
    assert frozen.intermediate_values == {1: 0.5, 2: 0.6}
    study = check_counters(study_id)
    assert (study.n_complete, study.n_running, study.best_trial_number, study.best_value) == (
        1,
        0,
        grant.trial_number,
        0.8,
    )
    # A finished lease's heartbeat says stop.
    hb = sched.heartbeat(grant.lease_id, HeartbeatRequest())
    assert hb.stop and hb.reason == "trial finished"


def test_best_follows_direction(ctx: ServiceContext, sched: Scheduler, make_study) -> None:
    study_id = make_study(max_parallel=3)
    grants = [must_grant(sched) for _ in range(3)]
    for grant, acc in zip(grants, (0.7, 0.9, 0.8), strict=True):
        sched.complete(grant.lease_id, done(acc))
    study = study_row(ctx, study_id)
    assert (study.best_trial_number, study.best_value) == (grants[1].trial_number, 0.9)


def test_missing_objective_is_422_and_changes_nothing(
    ctx: ServiceContext, sched: Scheduler, make_study, row_counts
) -> None:
    study_id = make_study()
    grant = must_grant(sched)
    before = row_counts()
    with pytest.raises(Invalid) as err:
        sched.complete(grant.lease_id, CompleteRequest(metrics={"loss": 0.1}, step=1, duration_s=1))
    assert err.value.field == "metrics.accuracy"
    # The schema refuses NaN already; the scheduler still checks what it is handed.
    nan_done = CompleteRequest.model_construct(metrics={"accuracy": float("nan")}, step=1, duration_s=1.0)
    with pytest.raises(Invalid):
        sched.complete(grant.lease_id, nan_done)
    with pytest.raises(Invalid):
        sched.report(grant.lease_id, ReportRequest(step=1, metrics={"loss": 0.1}))
    assert row_counts() == before
    assert trial_row(ctx, study_id, grant.trial_number).state == TrialState.RUNNING


def snapshot(ctx: ServiceContext, study_id: int) -> dict[str, Any]:
    study = study_row(ctx, study_id)
    with ctx.db.scope() as s:
        leases = s.execute(select(Lease.id, Lease.state, Lease.stop_reason)).all()
        reports = s.scalar(select(func.count()).select_from(TrialReport))
    counters = (study.status, study.n_started, study.n_running, study.n_complete, study.n_failed, study.n_pruned)
    return {"counters": counters, "leases": sorted(leases), "reports": reports}


def test_expired_lease_gets_409_and_changes_nothing(ctx: ServiceContext, sched: Scheduler, make_study) -> None:
    from service.scheduler.reaper import reap_once

    study_id = make_study()
    grant = must_grant(sched)
    expire(ctx, grant.lease_id)
    # Until its retry starts, an expired lease's complete or fail is still taken
    # (test_outages.py); heartbeats and reports never are.
    reap_once(sched)
    assert must_grant(sched, "w2").trial_number == grant.trial_number
    before = snapshot(ctx, study_id)
    calls = [
        lambda: sched.heartbeat(grant.lease_id, HeartbeatRequest(step=1)),
        lambda: sched.report(grant.lease_id, ReportRequest(step=1, metrics={"accuracy": 0.5})),
        lambda: sched.complete(grant.lease_id, done()),
        lambda: sched.fail(grant.lease_id, FailRequest(reason="error")),
    ]
    for call in calls:
        with pytest.raises(LeaseLost):
            call()
    assert snapshot(ctx, study_id) == before


def test_unknown_lease_gets_409(sched: Scheduler, make_study) -> None:
    make_study()
    must_grant(sched)
    for call in (
        lambda: sched.heartbeat("not-a-lease", HeartbeatRequest()),
        lambda: sched.complete("not-a-lease", done()),
        lambda: sched.fail("not-a-lease", FailRequest(reason="oom")),
    ):
        with pytest.raises(LeaseLost):
            call()


def test_max_parallel_and_budget(ctx: ServiceContext, sched: Scheduler, make_study, check_counters) -> None:
    study_id = make_study(n_trials=3, max_parallel=2)
    a, b = must_grant(sched), must_grant(sched)
    assert sched.grant(req()) is None  # max_parallel reached
    sched.complete(a.lease_id, done())
    c = must_grant(sched)
    sched.complete(b.lease_id, done())
    assert sched.grant(req()) is None  # n_trials reached: 3 started
    assert study_row(ctx, study_id).status == StudyStatus.RUNNING
    sched.complete(c.lease_id, done())
    study = check_counters(study_id)
    assert (study.status, study.n_started, study.n_complete) == (StudyStatus.COMPLETED, 3, 3)
    assert study.finished_at is not None
    assert len({a.trial_number, b.trial_number, c.trial_number}) == 3
    assert sched.grant(req()) is None


def test_cancel_stops_heartbeats_and_grants(
    ctx: ServiceContext, sched: Scheduler, make_study, principal: Principal, check_counters
) -> None:
    study_id = make_study(n_trials=5, max_parallel=2)
    grant = must_grant(sched)
    studies.cancel_study(ctx.db, principal, study_id)
    hb = sched.heartbeat(grant.lease_id, HeartbeatRequest())
    assert hb.stop and hb.reason == "study cancelled"
    assert sched.grant(req()) is None
    # The stopped trial is not retried: the study is cancelled.
    answer = sched.fail(grant.lease_id, FailRequest(reason="preempted", message="stopped"))
    assert answer.state == "failed"
    study = check_counters(study_id)
    assert (study.status, study.n_failed, study.n_running) == (StudyStatus.CANCELLED, 1, 0)


def test_fair_share_across_studies(ctx: ServiceContext, sched: Scheduler, make_study) -> None:
    small = make_study(max_parallel=2, n_trials=20)
    big = make_study(max_parallel=4, n_trials=20)
    got = [must_grant(sched).study_id for _ in range(6)]
    # Fewest running relative to max_parallel first: both fill in proportion.
    assert got.count(small) == 2 and got.count(big) == 4
    assert got[:2] == [small, big]  # 0/2 vs 0/4: the older one first, then the emptier one
    assert sched.grant(req()) is None


def test_retry_keeps_params_until_max_retries(
    ctx: ServiceContext, sched: Scheduler, make_study, check_counters
) -> None:
    study_id = make_study(max_retries=1, max_parallel=1)
    first = must_grant(sched)
    answer = sched.fail(first.lease_id, FailRequest(reason="error", message="boom", traceback="Traceback..."))
    assert answer.state == "waiting"
    assert sched.fail(first.lease_id, FailRequest(reason="error")) == answer  # idempotent
    trial = trial_row(ctx, study_id, first.trial_number)
    assert trial.state == TrialState.WAITING and trial.attempts == 2 and trial.failure_message == "boom"
    retry = must_grant(sched)
    assert (retry.trial_number, retry.attempt) == (first.trial_number, 2)
    assert retry.config == first.config
    # The old lease is finished; it cannot touch the retry.
    with pytest.raises(Conflict):
        sched.complete(first.lease_id, done())
    final = sched.fail(retry.lease_id, FailRequest(reason="error", message="boom again", traceback="tb"))
    assert final.state == "failed"
    trial = trial_row(ctx, study_id, first.trial_number)
    assert (trial.state, trial.failure_reason, trial.failure_message, trial.failure_traceback) == (
        TrialState.FAILED,
        "error",
        "boom again",
        "tb",
    )
    study = check_counters(study_id)
    assert (study.n_started, study.n_failed) == (1, 1)
    # Two Optuna trials (one per attempt), both FAIL, same params, linked by user attrs.
    attempts = [t for t in optuna_trials(ctx, study_id).values() if t.params == trial.params]
    assert sorted(t.state for t in attempts) == [OptunaState.FAIL, OptunaState.FAIL]
    assert sorted(t.user_attrs.get("tf_attempt", 1) for t in attempts) == [1, 2]


def test_preemption_does_not_use_up_retries(ctx: ServiceContext, sched: Scheduler, make_study) -> None:
    study_id = make_study(max_retries=0, max_parallel=1)
    grant = must_grant(sched)
    for attempt in (1, 2, 3):
        assert grant.attempt == attempt
        assert sched.fail(grant.lease_id, FailRequest(reason="preempted")).state == "waiting"
        grant = must_grant(sched)
    assert sched.fail(grant.lease_id, FailRequest(reason="timeout")).state == "failed"
    assert trial_row(ctx, study_id, grant.trial_number).failure_reason == "timeout"


@pytest.mark.parametrize("reason", ["oom", "nan"])
def test_oom_and_nan_are_constraints_not_retried(
    ctx: ServiceContext, sched: Scheduler, make_study, check_counters, reason: str
) -> None:
    study_id = make_study(max_retries=3)
    grant = must_grant(sched)
    assert sched.fail(grant.lease_id, FailRequest(reason=reason, message="CUDA out of memory")).state == "failed"
    trial = trial_row(ctx, study_id, grant.trial_number)
    assert (trial.state, trial.failure_reason, trial.attempts) == (TrialState.FAILED, reason, 1)
    frozen = optuna_trials(ctx, study_id)[trial.optuna_trial_id]
    # PRUNED + violated constraint: TPE reads PRUNED trials (FAIL ones are invisible to it),
    # checks feasibility first, and files this one among the infeasible (bad) trials.
    assert frozen.state == OptunaState.PRUNED
    assert frozen.constraints == {"tf_constraint": 1.0}
    assert frozen.user_attrs["tf_failure_reason"] == reason
    from optuna.samplers._tpe.sampler import _get_infeasible_trial_score

    assert _get_infeasible_trial_score(frozen) > 0
    assert check_counters(study_id).n_failed == 1


def test_pruner_decides_at_report(ctx: ServiceContext, sched: Scheduler, make_study, check_counters) -> None:
    study_id = make_study(max_parallel=3, n_trials=10)
    # Two good complete trials so that the median pruner has something to compare with.
    for _ in range(2):
        g = must_grant(sched)
        assert not sched.report(g.lease_id, ReportRequest(step=1, metrics={"accuracy": 0.9})).prune
        sched.complete(g.lease_id, done(0.9))
    bad = must_grant(sched)
    answer = sched.report(bad.lease_id, ReportRequest(step=1, metrics={"accuracy": 0.1}))
    assert answer.prune
    trial = trial_row(ctx, study_id, bad.trial_number)
    assert trial.state == TrialState.PRUNED
    assert optuna_trials(ctx, study_id)[trial.optuna_trial_id].state == OptunaState.PRUNED
    # The holder hears about it everywhere, and nothing changes.
    assert sched.report(bad.lease_id, ReportRequest(step=1, metrics={"accuracy": 0.1})).prune
    hb = sched.heartbeat(bad.lease_id, HeartbeatRequest())
    assert hb.stop and hb.reason == "trial pruned"
    assert sched.complete(bad.lease_id, done(0.1)).state == "pruned"
    assert sched.fail(bad.lease_id, FailRequest(reason="error")).state == "pruned"
    study = check_counters(study_id)
    assert (study.n_pruned, study.n_complete, study.n_running) == (1, 2, 0)


def test_enqueued_configuration_runs_first(
    ctx: ServiceContext, sched: Scheduler, make_study, principal: Principal, check_counters
) -> None:
    study_id = make_study(max_parallel=2)
    params = {"learning_rate": 1e-4, "batch_size": 32, "num_layers": 4, "unfreeze_depth": 2}
    [number] = studies.enqueue(ctx, principal, study_id, [params]).trial_numbers
    grant = must_grant(sched)
    assert grant.trial_number == number
    assert grant.config.hparams.num_layers == 4 and grant.config.hparams.learning_rate == 1e-4
    # Its Optuna trial was popped (RUNNING) with the fixed params, so TPE can learn from it.
    trial = trial_row(ctx, study_id, number)
    frozen = optuna_trials(ctx, study_id)[trial.optuna_trial_id]
    assert frozen.state == OptunaState.RUNNING and frozen.params == params
    sched.complete(grant.lease_id, done(0.7))
    assert optuna_trials(ctx, study_id)[trial.optuna_trial_id].values == [0.7]
    check_counters(study_id)


def test_report_on_unknown_lease_is_409(sched: Scheduler) -> None:
    with pytest.raises(LeaseLost):
        sched.report("x", ReportRequest(step=0, metrics={}))


def test_lease_states_are_recorded(ctx: ServiceContext, sched: Scheduler, make_study) -> None:
    make_study(max_parallel=3)
    a, b = must_grant(sched), must_grant(sched)
    sched.complete(a.lease_id, done())
    sched.fail(b.lease_id, FailRequest(reason="oom"))
    with ctx.db.scope() as s:
        states = dict(s.execute(select(Lease.id, Lease.stop_reason)).all())
        assert {s.scalar(select(Lease.state).where(Lease.id == a.lease_id))} == {LeaseState.FINISHED}
    assert states == {a.lease_id: "complete", b.lease_id: "oom"}
