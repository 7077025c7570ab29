"""Helpers for API tests: create studies through the API, record finished trials the way
the scheduler does (an Optuna trial plus its tf_trials row, same number)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from optuna.trial import TrialState as OptunaState
from optuna.trial import create_trial

from service import optuna_bridge
from service.context import ServiceContext
from service.models import Study, Trial, TrialReport, TrialState
from service.spec import StudySpec

API = "/api/v1/studies"


def create(client: TestClient, headers: dict[str, str], spec: dict[str, Any]) -> dict[str, Any]:
    r = client.post(API, json=spec, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def params(lr: float, bs: int = 32, layers: int = 4, depth: int = 2) -> dict[str, Any]:
    """A configuration of the `minilm_spec_data` search space."""
    return {"learning_rate": lr, "batch_size": bs, "num_layers": layers, "unfreeze_depth": depth}


_OPTUNA_STATE = {
    TrialState.COMPLETE: OptunaState.COMPLETE,
    TrialState.PRUNED: OptunaState.PRUNED,
    TrialState.FAILED: OptunaState.FAIL,
    TrialState.RUNNING: OptunaState.RUNNING,
}


def record_trial(
    ctx: ServiceContext,
    study_id: int,
    trial_params: dict[str, Any],
    values: list[float] | None = None,
    *,
    state: TrialState = TrialState.COMPLETE,
    duration_s: float | None = None,
    reports: list[tuple[int, dict[str, float]]] = (),  # type: ignore[assignment]
    failure_reason: str | None = None,
    worker_id: str | None = None,
) -> int:
    """One trial as the scheduler leaves it; returns its number."""
    with ctx.db.scope() as s:
        study = s.get(Study, study_id)
        assert study is not None
        spec = StudySpec.model_validate(study.spec)
        optuna_name = study.optuna_name
    storage = ctx.storage
    optuna_id = storage.get_study_id_from_name(optuna_name)
    template = create_trial(
        state=_OPTUNA_STATE[state],
        params=trial_params,
        distributions=optuna_bridge.distributions(spec, trial_params),
        values=values if state is TrialState.COMPLETE else None,
    )
    trial_id = storage.create_new_trial(optuna_id, template_trial=template)
    number = storage.get_trial_number_from_id(trial_id)
    with ctx.db.scope() as s:
        row = Trial(
            study_id=study_id,
            number=number,
            state=state,
            params=trial_params,
            optuna_trial_id=trial_id,
            values=values,
            value=values[0] if values else None,
            attempts=1,
            duration_s=duration_s,
            failure_reason=failure_reason,
            worker_id=worker_id,
        )
        s.add(row)
        s.flush()
        for step, metrics in reports:
            s.add(TrialReport(trial_id=row.id, attempt=1, step=step, metrics=metrics))
    return number
