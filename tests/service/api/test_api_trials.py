"""Trial list (paging, sorting, state filter) and detail, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from api_test_helpers import API, create, params, record_trial
from fastapi.testclient import TestClient

from service.context import ServiceContext
from service.models import TrialState

Spec = Callable[..., dict[str, Any]]


@pytest.fixture
def study(
    client: TestClient, user_headers: dict[str, str], minilm_spec_data: Spec, ctx: ServiceContext
) -> dict[str, Any]:
    study = create(client, user_headers, minilm_spec_data())
    sid = study["id"]
    record_trial(
        ctx, sid, params(1e-4), [0.70], duration_s=30.0, reports=[(10, {"accuracy": 0.6}), (20, {"accuracy": 0.7})]
    )
    record_trial(ctx, sid, params(2e-4), [0.90], duration_s=10.0, worker_id="node-1:42")
    record_trial(ctx, sid, params(3e-4), state=TrialState.PRUNED, duration_s=5.0)
    record_trial(ctx, sid, params(4e-4), state=TrialState.FAILED, failure_reason="oom")
    record_trial(ctx, sid, params(5e-4), [0.80], duration_s=20.0)
    return study


def numbers(client: TestClient, headers: dict[str, str], study_id: int, **query: Any) -> list[int]:
    r = client.get(f"{API}/{study_id}/trials", params=query, headers=headers)
    assert r.status_code == 200, r.text
    return [t["number"] for t in r.json()["data"]]


def test_sorts_by_number_value_and_duration(
    client: TestClient, user_headers: dict[str, str], study: dict[str, Any]
) -> None:
    sid = study["id"]
    assert numbers(client, user_headers, sid) == [0, 1, 2, 3, 4]
    assert numbers(client, user_headers, sid, order="desc") == [4, 3, 2, 1, 0]
    # trials without a value (pruned, failed) go last in either order
    assert numbers(client, user_headers, sid, sort="value", order="desc") == [1, 4, 0, 2, 3]
    assert numbers(client, user_headers, sid, sort="value") == [0, 4, 1, 2, 3]
    assert numbers(client, user_headers, sid, sort="duration") == [2, 1, 4, 0, 3]


def test_pages_and_filters_by_state(client: TestClient, user_headers: dict[str, str], study: dict[str, Any]) -> None:
    sid = study["id"]
    page = client.get(f"{API}/{sid}/trials", params={"limit": 2, "offset": 2}, headers=user_headers).json()
    assert page["count"] == 5 and [t["number"] for t in page["data"]] == [2, 3]
    assert numbers(client, user_headers, sid, state="complete") == [0, 1, 4]
    complete = client.get(f"{API}/{sid}/trials", params={"state": "complete", "limit": 1}, headers=user_headers).json()
    assert complete["count"] == 3
    assert numbers(client, user_headers, sid, state="failed") == [3]
    assert numbers(client, user_headers, sid, state="running") == []


def test_detail_has_params_values_curve_and_failure(
    client: TestClient, user_headers: dict[str, str], study: dict[str, Any]
) -> None:
    sid = study["id"]
    first = client.get(f"{API}/{sid}/trials/0", headers=user_headers).json()
    assert first["state"] == "complete" and first["values"] == [0.7] and first["params"] == params(1e-4)
    assert [(r["attempt"], r["step"], r["metrics"]) for r in first["reports"]] == [
        (1, 10, {"accuracy": 0.6}),
        (1, 20, {"accuracy": 0.7}),
    ]
    assert first["attempts"] == 1 and first["duration_s"] == 30.0
    assert client.get(f"{API}/{sid}/trials/1", headers=user_headers).json()["worker_id"] == "node-1:42"
    failed = client.get(f"{API}/{sid}/trials/3", headers=user_headers).json()
    assert failed["state"] == "failed" and failed["failure_reason"] == "oom" and failed["value"] is None


def test_unknown_trial_number_is_404(client: TestClient, user_headers: dict[str, str], study: dict[str, Any]) -> None:
    r = client.get(f"{API}/{study['id']}/trials/99", headers=user_headers)
    assert r.status_code == 404 and r.json()["detail"][0]["field"] == "number"


def test_counts_and_best_follow_the_trials(
    client: TestClient, user_headers: dict[str, str], study: dict[str, Any]
) -> None:
    detail = client.get(f"{API}/{study['id']}", headers=user_headers).json()
    assert detail["counts"] == {"waiting": 0, "running": 0, "complete": 3, "pruned": 1, "failed": 1}
    assert detail["best_trial"]["number"] == 1
