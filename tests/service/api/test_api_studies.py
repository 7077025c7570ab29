"""The study endpoints end to end, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx
import optuna
import pytest
from api_test_helpers import API, create, params, record_trial
from fastapi.testclient import TestClient

from service import optuna_bridge
from service.context import ServiceContext
from service.errors import Unavailable

Spec = Callable[..., dict[str, Any]]


def seed_complete(ctx: ServiceContext, study_id: int, rows: list[tuple[dict[str, Any], list[float], float]]) -> None:
    for trial_params, values, duration in rows:
        record_trial(ctx, study_id, trial_params, values, duration_s=duration)


def test_create_makes_a_row_and_an_optuna_study(
    client: TestClient, user_headers: dict[str, str], minilm_spec_data: Spec, settings: Any
) -> None:
    study = create(client, user_headers, minilm_spec_data())
    assert study["name"] == "minilm-tweets"
    assert study["owner"] == "alice"
    assert study["status"] == "running"
    assert study["directions"] == ["maximize"] and study["objectives"] == ["accuracy"]
    assert study["counts"] == {"waiting": 0, "running": 0, "complete": 0, "pruned": 0, "failed": 0}
    assert study["best_trial"] is None
    assert study["created_at"].endswith(("Z", "+00:00"))
    assert study["spec"]["pruner"]["name"] == "successive_halving"

    # Plain Optuna can load it from the same database.
    loaded = optuna.load_study(study_name=study["optuna_name"], storage=settings.database_url)
    assert loaded.directions == [optuna.study.StudyDirection.MAXIMIZE]


def test_list_pages_and_filters_by_status(
    client: TestClient, user_headers: dict[str, str], minilm_spec_data: Spec
) -> None:
    ids = [create(client, user_headers, minilm_spec_data(name=f"s{i}"))["id"] for i in range(3)]
    client.post(f"{API}/{ids[0]}/cancel", headers=user_headers).raise_for_status()

    page = client.get(API, params={"limit": 2}, headers=user_headers).json()
    assert page["count"] == 3 and [s["id"] for s in page["data"]] == [ids[2], ids[1]]  # newest first
    page = client.get(API, params={"limit": 2, "offset": 2}, headers=user_headers).json()
    assert [s["id"] for s in page["data"]] == [ids[0]]

    running = client.get(API, params={"status": "running"}, headers=user_headers).json()
    assert running["count"] == 2 and {s["id"] for s in running["data"]} == set(ids[1:])
    cancelled = client.get(API, params={"status": "cancelled"}, headers=user_headers).json()
    assert [s["id"] for s in cancelled["data"]] == [ids[0]]


def test_users_see_their_own_studies_and_admins_see_all(
    client: TestClient,
    user_headers: dict[str, str],
    other_headers: dict[str, str],
    admin_headers: dict[str, str],
    minilm_spec_data: Spec,
) -> None:
    mine = create(client, user_headers, minilm_spec_data())
    # The same name is fine for another owner.
    theirs = create(client, other_headers, minilm_spec_data())
    assert [s["id"] for s in client.get(API, headers=user_headers).json()["data"]] == [mine["id"]]
    assert [s["id"] for s in client.get(API, headers=other_headers).json()["data"]] == [theirs["id"]]
    assert client.get(API, headers=admin_headers).json()["count"] == 2
    assert client.get(f"{API}/{theirs['id']}", headers=admin_headers).status_code == 200


def test_detail_counts_trials_and_names_the_best(
    client: TestClient, user_headers: dict[str, str], minilm_spec_data: Spec, ctx: ServiceContext
) -> None:
    study = create(client, user_headers, minilm_spec_data())
    seed_complete(
        ctx, study["id"], [(params(1e-4), [0.7], 10.0), (params(2e-4), [0.9], 12.0), (params(3e-4), [0.8], 9.0)]
    )
    client.post(f"{API}/{study['id']}/enqueue", json={"configurations": [params(5e-5)]}, headers=user_headers)

    detail = client.get(f"{API}/{study['id']}", headers=user_headers).json()
    assert detail["counts"] == {"waiting": 1, "running": 0, "complete": 3, "pruned": 0, "failed": 0}
    assert detail["best_trial"]["value"] == 0.9 and detail["best_trial"]["params"]["learning_rate"] == 2e-4

    best = client.get(f"{API}/{study['id']}/best", headers=user_headers).json()
    assert [t["value"] for t in best["trials"]] == [0.9]


def test_best_is_the_pareto_front_for_several_objectives(
    client: TestClient, user_headers: dict[str, str], minilm_spec_data: Spec, ctx: ServiceContext
) -> None:
    spec = minilm_spec_data(
        objectives=[{"metric": "accuracy"}, {"metric": "loss"}],  # maximise, minimise
        pruner={"name": "none"},
    )
    study = create(client, user_headers, spec)
    assert study["directions"] == ["maximize", "minimize"]
    seed_complete(
        ctx,
        study["id"],
        [
            (params(1e-4), [0.90, 0.50], 1.0),  # front
            (params(2e-4), [0.80, 0.30], 1.0),  # front
            (params(3e-4), [0.70, 0.40], 1.0),  # dominated by the second
            (params(4e-4), [0.90, 0.60], 1.0),  # dominated by the first
        ],
    )
    best = client.get(f"{API}/{study['id']}/best", headers=user_headers).json()
    assert sorted(tuple(t["values"]) for t in best["trials"]) == [(0.8, 0.3), (0.9, 0.5)]
    assert client.get(f"{API}/{study['id']}", headers=user_headers).json()["best_trial"] is None


def test_cancel_is_a_guarded_transition(
    client: TestClient, user_headers: dict[str, str], minilm_spec_data: Spec
) -> None:
    study = create(client, user_headers, minilm_spec_data())
    r = client.post(f"{API}/{study['id']}/cancel", headers=user_headers)
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    again = client.post(f"{API}/{study['id']}/cancel", headers=user_headers)
    assert again.status_code == 409
    assert again.json()["detail"][0]["field"] == "study_id"
    enqueue = client.post(f"{API}/{study['id']}/enqueue", json={"configurations": [params(1e-4)]}, headers=user_headers)
    assert enqueue.status_code == 409


def test_delete_removes_trials_and_the_optuna_study(
    client: TestClient,
    user_headers: dict[str, str],
    minilm_spec_data: Spec,
    ctx: ServiceContext,
    row_counts: Callable[[], dict[str, int]],
    settings: Any,
) -> None:
    before = row_counts()
    study = create(client, user_headers, minilm_spec_data())
    seed_complete(ctx, study["id"], [(params(1e-4), [0.7], 1.0)])
    client.post(f"{API}/{study['id']}/enqueue", json={"configurations": [params(5e-5)]}, headers=user_headers)

    assert client.delete(f"{API}/{study['id']}", headers=user_headers).status_code == 204
    assert client.get(f"{API}/{study['id']}", headers=user_headers).status_code == 404
    assert row_counts() == before
    assert optuna.get_all_study_names(storage=settings.database_url) == []


def test_enqueued_configurations_are_what_ask_returns_first(
    client: TestClient, user_headers: dict[str, str], minilm_spec_data: Spec, settings: Any
) -> None:
    study = create(client, user_headers, minilm_spec_data())
    configs = [params(1e-4, 16, 3, 1), params(2e-4, 64, 6, 6)]
    r = client.post(f"{API}/{study['id']}/enqueue", json={"configurations": configs}, headers=user_headers)
    assert r.status_code == 201, r.text
    assert r.json()["trial_numbers"] == [0, 1]

    trials = client.get(f"{API}/{study['id']}/trials", headers=user_headers).json()
    assert [(t["number"], t["state"], t["params"]) for t in trials["data"]] == [
        (0, "waiting", configs[0]),
        (1, "waiting", configs[1]),
    ]
    # The scheduler's ask() pops the queue in order, with the enqueued values fixed.
    optuna_study = optuna.load_study(study_name=study["optuna_name"], storage=settings.database_url)
    trial = optuna_study.ask()
    assert trial.number == 0
    assert trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True) == 1e-4


def test_warm_start_enqueues_the_best_configurations_of_another_study(
    client: TestClient, user_headers: dict[str, str], minilm_spec_data: Spec, ctx: ServiceContext
) -> None:
    source = create(client, user_headers, minilm_spec_data(name="first"))
    seed_complete(
        ctx,
        source["id"],
        [
            (params(1e-4), [0.70], 1.0),
            (params(2e-4), [0.90], 1.0),
            (params(3e-4), [0.80], 1.0),
            (params(4e-4), [0.1], 1.0),
        ],
    )
    spec = minilm_spec_data(name="second", warm_start_from={"study": "first", "n_best": 2})
    second = create(client, user_headers, spec)
    assert second["warm_started"] == 2
    assert second["counts"]["waiting"] == 2
    queued = client.get(f"{API}/{second['id']}/trials", headers=user_headers).json()["data"]
    assert [t["params"]["learning_rate"] for t in queued] == [2e-4, 3e-4]

    by_id = create(client, user_headers, minilm_spec_data(name="third", warm_start_from={"study": source["id"]}))
    assert by_id["warm_started"] == 4


def test_warm_start_from_another_users_study_is_not_found(
    client: TestClient, user_headers: dict[str, str], other_headers: dict[str, str], minilm_spec_data: Spec
) -> None:
    theirs = create(client, other_headers, minilm_spec_data(name="theirs"))
    for study in (theirs["id"], 99_999_999_999, "theirs"):
        r = client.post(API, json=minilm_spec_data(warm_start_from={"study": study}), headers=user_headers)
        assert r.status_code == 404 and r.json()["detail"][0]["field"] == "warm_start_from.study"


def test_a_failed_create_leaves_nothing_behind(
    client: TestClient,
    user_headers: dict[str, str],
    minilm_spec_data: Spec,
    row_counts: Callable[[], dict[str, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Optuna study is made before the row; when the row's transaction fails, the
    Optuna study must be deleted again."""
    user_headers_ = user_headers  # create the token before counting rows
    before = row_counts()

    def broken(_spec: Any) -> list[str]:
        raise Unavailable("database went away")

    monkeypatch.setattr(optuna_bridge, "objective_metrics", broken)
    r = client.post(API, json=minilm_spec_data(), headers=user_headers_)
    assert r.status_code == 503
    assert row_counts() == before


def test_concurrent_creates_of_one_name_leave_one_study(
    live_server: str, user_headers: dict[str, str], minilm_spec_data: Spec, settings: Any
) -> None:
    """Both requests may pass the name check; the loser's Optuna study must go again."""
    statuses: list[int] = []

    def submit() -> None:
        r = httpx.post(f"{live_server}{API}", json=minilm_spec_data(), headers=user_headers, timeout=60)
        statuses.append(r.status_code)

    threads = [threading.Thread(target=submit) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [201, 409, 409]
    assert len(optuna.get_all_study_names(storage=settings.database_url)) == 1
