"""Applying tf_* outcomes to Optuna's storage, after the tf_* transaction committed.

The tf_* tables are the source of truth; Optuna's trial is brought in line after each
commit (Optuna writes through its own engine, so it cannot share our transaction,
and on SQLite a second writer inside our write transaction would wait on our own
lock). Every function here is idempotent: a repeated call from the worker, or the
reaper's repair sweep after a crash between commit and sync, applies it again safely.

How each tf outcome looks in Optuna:

| tf trial | Optuna trial |
| --- | --- |
| complete | COMPLETE with the objective values |
| pruned | PRUNED (the pruner's decision) |
| failed / retried: error, timeout, preempted, lost lease | FAIL |
| failed: oom, nan | PRUNED with a violated constraint (see below) |

OOM and NaN are properties of the config, so the sampler must learn to avoid that
region. Optuna 5's TPESampler only reads COMPLETE and PRUNED trials (plus RUNNING
ones for the constant liar): a FAIL trial is invisible to it, and its
`constraints_func` (deprecated in 5.0) is only evaluated for COMPLETE/PRUNED trials
too. So such a trial gets the violated constraint `tf_constraint` = 1.0
(`optuna_bridge.record_constraint`, Optuna 5's `Trial.set_constraint` key) and is
told PRUNED: TPE's `_split_trials` checks feasibility before state, so it lands among
the infeasible (bad) trials; MedianPruner & co. ignore it (they read COMPLETE trials
only). Completed trials carry no constraint, which GP and NSGA-II require (the same
constraints on every COMPLETE trial). The user attribute `tf_failure_reason` says
why it ended.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from service.scheduler.warm import WarmStudy
from trainer.protocol import FailureReason

log = logging.getLogger(__name__)

# Reasons that say "this config cannot run": recorded as a constraint, never retried.
CONSTRAINT_REASONS = frozenset({FailureReason.OOM.value, FailureReason.NAN.value})


def _frozen(warm: WarmStudy, optuna_trial_id: int) -> FrozenTrial:
    return warm.study._storage.get_trial(optuna_trial_id)


def _tell(warm: WarmStudy, trial: FrozenTrial | int, values: Sequence[float] | None, state: TrialState) -> None:
    """Study.tell by trial number or frozen trial; a no-op on a finished trial."""
    number = trial if isinstance(trial, int) else trial.number
    try:
        warm.study.tell(number, values, state=state, skip_if_finished=True)
    except UpdateFinishedTrialError:
        # Finished between tell's check and its write (another process's sync): same result.
        log.debug("optuna trial %s of %s already finished", number, warm.optuna_name)
    warm.trial_finished()


def ensure_running(warm: WarmStudy, optuna_trial_id: int) -> None:
    """Pop an enqueued (WAITING) Optuna trial and record its fixed params.

    Enqueued configurations (`studies.enqueue`, warm start) are tf rows pointing at a
    WAITING Optuna trial. Whoever runs it first pops it: `ask()` in the buffer, or the
    grant that claimed its row. Optuna's state change to RUNNING succeeds only from
    WAITING (False for a trial that already runs, as a pre-asked one does), so this
    costs one short transaction when there is nothing to do.
    """
    storage = warm.study._storage
    try:
        popped = storage.set_trial_state_values(optuna_trial_id, state=TrialState.RUNNING)
    except UpdateFinishedTrialError:
        return  # told already (a repaired crash): nothing to pop
    if popped:
        from service.optuna_bridge import suggest_params

        # Define-by-run over the trial's fixed params: stores each param with the
        # distribution it would have been sampled from (conditional knobs included).
        suggest_params(optuna.Trial(warm.study, optuna_trial_id), warm.spec)


def _number(warm: WarmStudy, optuna_trial_id: int) -> int:
    # Cached by the warm study's storage for every trial it has seen: usually no query.
    storage = warm.study._storage
    cached = getattr(storage, "_trial_id_to_study_id_and_number", {}).get(optuna_trial_id)
    return cached[1] if cached is not None else storage.get_trial_number_from_id(optuna_trial_id)


def tell_complete(warm: WarmStudy, optuna_trial_id: int, values: Sequence[float]) -> None:
    try:
        _tell(warm, _number(warm, optuna_trial_id), list(values), TrialState.COMPLETE)
    except ValueError:
        # "Cannot tell a WAITING trial": an enqueued trial that nobody popped (a grant that
        # died before popping it). Pop it with its params, then tell.
        ensure_running(warm, optuna_trial_id)
        _tell(warm, _number(warm, optuna_trial_id), list(values), TrialState.COMPLETE)


def tell_pruned(warm: WarmStudy, optuna_trial_id: int) -> None:
    _tell(warm, _number(warm, optuna_trial_id), None, TrialState.PRUNED)


def tell_failed(warm: WarmStudy, optuna_trial_id: int, reason: str, message: str | None = None) -> None:
    from service.optuna_bridge import record_constraint

    frozen = _frozen(warm, optuna_trial_id)
    if frozen.state.is_finished():
        return
    storage = warm.study._storage
    storage.set_trial_user_attr(optuna_trial_id, "tf_failure_reason", reason)
    if message:
        storage.set_trial_user_attr(optuna_trial_id, "tf_failure_message", message[:500])
    if reason in CONSTRAINT_REASONS and not warm.multi_objective:
        if "tf_constraint" not in frozen.constraints:
            record_constraint(storage, optuna_trial_id, 1.0)
        _tell(warm, frozen, None, TrialState.PRUNED)
    else:
        _tell(warm, frozen, None, TrialState.FAIL)


def discard(warm: WarmStudy, optuna_trial_id: int, why: str) -> None:
    """FAIL an Optuna trial that never ran (a pre-asked trial the budget no longer allows,
    an orphan left by a crash), saying why in a user attribute."""
    frozen = _frozen(warm, optuna_trial_id)
    if frozen.state.is_finished():
        return
    warm.study._storage.set_trial_user_attr(optuna_trial_id, "tf_discarded", why)
    _tell(warm, frozen, None, TrialState.FAIL)


def create_retry(
    warm: WarmStudy,
    *,
    tf_number: int,
    attempt: int,
    previous_optuna_trial_id: int | None,
    params: dict[str, Any],
) -> int:
    """A new RUNNING Optuna trial with the same params as the failed attempt.

    Created directly from a template rather than `enqueue_trial` + `ask()`: an enqueued
    WAITING trial is popped by whichever process asks next (including an ask meant for
    a fresh trial), while this one belongs to its tf row from the start. The constant
    liar sees it as RUNNING, which it is about to be.
    """
    storage = warm.study._storage
    if previous_optuna_trial_id is not None:
        previous = storage.get_trial(previous_optuna_trial_id)
        opt_params, dists = previous.params, previous.distributions
    else:
        from service.optuna_bridge import distributions

        dists = distributions(warm.spec, params)
        opt_params = {name: params[name] for name in dists}
    template = optuna.trial.create_trial(
        state=TrialState.RUNNING,
        params=opt_params,
        distributions=dists,
        user_attrs={"tf_trial_number": tf_number, "tf_attempt": attempt},
    )
    return storage.create_new_trial(warm.study._study_id, template_trial=template)
