"""Many simulated agents against a real uvicorn server: exact budgets, complete records,
no 5xx, and an API restart in the middle of a study that loses and duplicates nothing."""

from __future__ import annotations

import copy
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).parent))
from lease_e2e_helpers import REPORTS, LiveApi, SimAgent  # noqa: E402

from service.context import ServiceContext  # noqa: E402
from service.models import Study, StudyStatus, Trial, TrialReport, TrialState  # noqa: E402
from service.settings import Settings  # noqa: E402
from trainer.client import TuneForgeClient  # noqa: E402

pytestmark = pytest.mark.slow

SPEC = {
    "name": "many-workers",
    "model": {"kind": "named", "name": "all-minilm-l6-v2"},
    "dataset": {"kind": "named", "name": "tweets-sentiment"},
    "objective": {"metric": "accuracy", "direction": "maximize"},
    "search_space": {
        "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
        "batch_size": {"type": "categorical", "choices": [16, 32, 64]},
        "num_layers": {"type": "int", "low": 2, "high": 6},
        "unfreeze_depth": {"type": "int", "low": 0, "high": 6},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    },
    "sampler": {"name": "tpe", "seed": 1},
    "pruner": {"name": "median", "options": {"n_startup_trials": 5, "n_warmup_steps": 2}},
    "budget": {"n_trials": 200, "max_parallel": 16, "max_retries": 2},
}


@pytest.fixture
def e2e_settings(settings: Settings) -> Settings:
    # Short leases, so a lease lost in a restart comes back within the test.
    return settings.model_copy(update={"lease_timeout_s": 5.0, "reaper_interval_s": 0.5})


def _run_study(
    api: LiveApi,
    user_token: str,
    worker_token: str,
    *,
    agents: int,
    n_trials: int,
    retries: int = 4,
    restart_after: int | None = None,
) -> tuple[int, list[SimAgent], float]:
    spec = copy.deepcopy(SPEC)
    spec["budget"] = {**spec["budget"], "n_trials": n_trials, "max_parallel": agents}
    with TuneForgeClient(api.url, token=user_token) as user:
        study_id = int(user.create_study(spec)["id"])
        stop = threading.Event()
        fleet = [SimAgent(api.url, worker_token, f"agent-{i}", stop, retries=retries) for i in range(agents)]
        started = time.monotonic()
        for agent in fleet:
            agent.start()
        restarted = restart_after is None
        deadline = started + 600
        try:
            while time.monotonic() < deadline:
                study = user.get_study(study_id)
                if study["status"] != "running":
                    break
                if not restarted and study["n_complete"] + study["n_pruned"] >= (restart_after or 0):
                    api.stop()  # in-flight calls finish; agents then see connection errors and retry
                    time.sleep(1.0)
                    api.start()
                    restarted = True
                time.sleep(0.2)
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            for agent in fleet:
                agent.join(timeout=60)
    return study_id, fleet, elapsed


def _check_study(ctx: ServiceContext, study_id: int, n_trials: int) -> dict[str, int]:
    with ctx.db.scope() as s:
        study = s.get(Study, study_id)
        assert study is not None
        trials = s.scalars(select(Trial).where(Trial.study_id == study_id)).all()
        reports = Counter(
            (r.trial_id, r.attempt)
            for r in s.scalars(select(TrialReport).join(Trial).where(Trial.study_id == study_id)).all()
        )
        optuna_name = study.optuna_name
    assert study.status == StudyStatus.COMPLETED
    states = Counter(t.state for t in trials)
    assert len(trials) == n_trials and sum(states.values()) == n_trials, states
    assert all(t.state.finished for t in trials), states
    assert len({t.number for t in trials}) == n_trials
    assert study.n_started == n_trials
    assert (study.n_complete, study.n_pruned, study.n_failed) == (
        states[TrialState.COMPLETE],
        states[TrialState.PRUNED],
        states[TrialState.FAILED],
    )
    storage = optuna.storages.RDBStorage(ctx.settings.database_url)
    try:
        optuna_trials = {t._trial_id: t for t in storage.get_all_trials(storage.get_study_id_from_name(optuna_name))}
    finally:
        storage.engine.dispose()
    # Every COMPLETE trial has its params, values and whole learning curve, here and in Optuna.
    for t in trials:
        if t.state != TrialState.COMPLETE:
            continue
        assert len(t.params) == 5 and t.values is not None and t.value is not None
        assert reports[(t.id, t.attempts)] == REPORTS
        frozen = optuna_trials[t.optuna_trial_id]
        assert frozen.state == optuna.trial.TrialState.COMPLETE
        assert frozen.params == t.params and frozen.values == t.values
        assert sorted(frozen.intermediate_values) == list(range(1, REPORTS + 1))
    # Nothing is left running in Optuna: every asked trial ran or was told why not.
    assert not [t for t in optuna_trials.values() if not t.state.is_finished()]
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value or 0)
    assert (study.best_trial_number, study.best_value) == (best.number, best.value)
    return {state.value: n for state, n in states.items()}


@pytest.mark.parametrize(
    ("upgraded_db_url", "agents", "n_trials"),
    [("postgresql", 16, 200), ("sqlite", 8, 60)],
    indirect=["upgraded_db_url"],
)
def test_many_agents_run_a_study_exactly(
    ctx: ServiceContext, e2e_settings: Settings, user_token: str, worker_token: str, agents: int, n_trials: int
) -> None:
    api = LiveApi(e2e_settings)
    api.start()
    try:
        study_id, fleet, elapsed = _run_study(api, user_token, worker_token, agents=agents, n_trials=n_trials)
    finally:
        api.stop()
    assert not [a.errors for a in fleet if a.errors]
    states = _check_study(ctx, study_id, n_trials)
    server_errors = sum(a.server_errors for a in fleet)
    assert server_errors == 0
    assert sum(a.completed + a.pruned for a in fleet) == n_trials
    print(
        f"\n{agents} agents, {n_trials} trials in {elapsed:.1f}s ({n_trials / elapsed:.1f} trials/s), "
        f"states {states}, HTTP {dict(sorted(Counter(sum((Counter(a.status) for a in fleet), Counter())).items()))}, "
        f"retried deadlocks/locks: {api.retried}"
    )


@pytest.mark.parametrize("upgraded_db_url", ["postgresql"], indirect=True)
def test_api_restart_mid_study_loses_nothing(
    ctx: ServiceContext, e2e_settings: Settings, user_token: str, worker_token: str
) -> None:
    api = LiveApi(e2e_settings)
    api.start()
    n_trials = 80
    try:
        study_id, fleet, _ = _run_study(
            api, user_token, worker_token, agents=8, n_trials=n_trials, retries=40, restart_after=30
        )
    finally:
        api.stop()
    assert len(api.contexts) == 2  # it did restart
    assert not [a.errors for a in fleet if a.errors]
    states = _check_study(ctx, study_id, n_trials)
    # Calls cut off by the restart were retried by the clients, not lost: every trial finished
    # once, and any lease that lapsed meanwhile was retried by the reaper under its number.
    assert sum(a.completed + a.pruned for a in fleet) + sum(a.lost for a in fleet) >= n_trials
    print(f"\nrestart: states {states}, leases lost to the restart: {sum(a.lost for a in fleet)}")
