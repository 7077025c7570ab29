"""Bad input never gets a 500, always names the field and the reason, and changes nothing.

Every case runs on SQLite and PostgreSQL and compares the rows of tf_* and Optuna's
tables before and after the rejected request.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_test_helpers import API, create, params
from fastapi.testclient import TestClient

Spec = Callable[..., dict[str, Any]]
Counts = Callable[[], dict[str, int]]


@pytest.fixture
def unchanged(row_counts: Counts, user_headers: dict[str, str], other_headers: dict[str, str]) -> Iterator[None]:
    """Assert that the test's requests left every counted table as it was (tokens made first)."""
    before = row_counts()
    yield
    assert row_counts() == before


def problems(response: httpx.Response, status: int) -> list[tuple[str | None, str]]:
    assert response.status_code == status, response.text
    items = response.json()["detail"]
    assert items and all(set(item) == {"field", "reason"} and item["reason"] for item in items)
    return [(item["field"], item["reason"]) for item in items]


def _set(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    node = data
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return data


# (id, change to a valid spec, field the 422 must name, words the reason must contain)
SPEC_CASES: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], str, str]] = [
    ("unknown top-level field", lambda d: {**d, "colour": "blue"}, "colour", "unknown field"),
    (
        "unknown nested field",
        lambda d: _set(d, "search_space.learning_rate.lo", 1e-5),
        "search_space.learning_rate.lo",
        "unknown field",
    ),
    ("wrong type", lambda d: _set(d, "budget.n_trials", "ten"), "budget.n_trials", "integer"),
    ("wrong type of section", lambda d: {**d, "search_space": [1, 2]}, "search_space", "dictionary"),
    ("low >= high", lambda d: _set(d, "search_space.num_layers.low", 7), "search_space.num_layers", ""),
    (
        "log range with low <= 0",
        lambda d: _set(d, "search_space.learning_rate.low", 0),
        "search_space.learning_rate.low",
        "log",
    ),
    (
        "unknown knob",
        lambda d: _set(d, "search_space.warp_factor", {"type": "int", "low": 1, "high": 9}),
        "search_space.warp_factor",
        "unknown",
    ),
    ("unknown sampler", lambda d: _set(d, "sampler.name", "annealing"), "sampler.name", ""),
    ("unknown pruner", lambda d: _set(d, "pruner.name", "guillotine"), "pruner.name", ""),
    (
        "empty choices",
        lambda d: _set(d, "search_space.batch_size.choices", []),
        "search_space.batch_size.choices",
        "at least 1",
    ),
    ("n_trials = 0", lambda d: _set(d, "budget.n_trials", 0), "budget.n_trials", "greater than or equal to 1"),
    ("n_trials < 0", lambda d: _set(d, "budget.n_trials", -3), "budget.n_trials", "greater than or equal to 1"),
    ("unknown model name", lambda d: _set(d, "model.name", "gpt-17"), "model.name", "unknown"),
    ("missing name", lambda d: {k: v for k, v in d.items() if k != "name"}, "name", "required"),
]

HUGE = 10**400  # beyond 64 bits: float() and the databases overflow on it
DROPOUT = {"type": "float", "low": 0.0, "high": 0.5}


def _grid(d: dict[str, Any]) -> dict[str, Any]:
    d["search_space"] = {"dropout": {**DROPOUT, "step": 5e-324}}
    d["sampler"] = {"name": "grid"}
    return d


# Values that used to be stored and then broke every lease or ask of the study (issue 7).
HOSTILE_CASES: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], str, str]] = [
    ("timeout 1e300", lambda d: _set(d, "budget.timeout_s", 1e300), "budget.timeout_s", "less than or equal"),
    ("trial timeout 1e300", lambda d: _set(d, "budget.trial_timeout_s", 1e300), "budget.trial_timeout_s", "less"),
    ("max_steps huge", lambda d: {**d, "run": {"max_steps": 10**12}}, "run.max_steps", "less than or equal"),
    ("eval_every huge", lambda d: {**d, "run": {"eval_every_steps": HUGE}}, "run.eval_every_steps", "less"),
    ("run seed 2**40", lambda d: {**d, "run": {"seed": 2**40}}, "run.seed", "less than or equal"),
    ("examples huge", lambda d: {**d, "data": {"max_train_examples": HUGE}}, "data.max_train_examples", "less"),
    (
        "n_ei_candidates 3e6",
        lambda d: _set(d, "sampler.options", {"n_ei_candidates": 3_000_000}),
        "sampler.options.n_ei_candidates",
        "in [1, 1000]",
    ),
    (
        "unknown sampler option",
        lambda d: _set(d, "sampler.options", {"prior_wieght": 1.0}),
        "sampler.options.prior_wieght",
        "accepted options: n_startup_trials",
    ),
    (
        "percentile 150",
        lambda d: {**d, "pruner": {"name": "percentile", "options": {"percentile": 150}}},
        "pruner.options.percentile",
        "in [0.0, 100.0]",
    ),
    (
        "nsga2 population 10**7",
        lambda d: _set(d, "sampler", {"name": "nsga2", "options": {"population_size": 10**7}}),
        "sampler.options.population_size",
        "in [2, 1000]",
    ),
    (
        "float step 5e-324",
        lambda d: _set(d, "search_space.dropout", {**DROPOUT, "step": 5e-324}),
        "search_space.dropout.step",
        "too fine",
    ),
    ("float step 5e-324 on a grid", _grid, "search_space.dropout.step", "too fine"),
    ("int high 10**400", lambda d: _set(d, "search_space.num_layers.high", HUGE), "search_space.num_layers.high", ""),
    ("int step 10**400", lambda d: _set(d, "search_space.num_layers.step", HUGE), "search_space.num_layers.step", ""),
    (
        "huge int choice",
        lambda d: _set(d, "search_space.batch_size.choices", [16, HUGE]),
        "search_space.batch_size.choices.1",
        "64 bits",
    ),
    ("huge fixed int", lambda d: {**d, "fixed": {"epochs": HUGE}}, "fixed.epochs", "64 bits"),
    ("huge sampler seed", lambda d: _set(d, "sampler.seed", HUGE), "sampler.seed", "less than or equal"),
    ("negative sampler seed", lambda d: _set(d, "sampler.seed", -1), "sampler.seed", "greater than or equal"),
    ("huge sampler option", lambda d: _set(d, "sampler.options", {"n_startup_trials": HUGE}), "sampler.options", ""),
    (
        "range overflowing to inf",
        lambda d: _set(d, "search_space.dropout", {**DROPOUT, "low": -1e308, "high": 1e308}),
        "search_space.dropout",
        "outside the limits",
    ),
    (
        "float beyond the knob",
        lambda d: _set(d, "search_space.dropout", {**DROPOUT, "high": 5.0}),
        "search_space.dropout.high",
        "outside the limits",
    ),
    ("NUL in description", lambda d: {**d, "description": "a\x00b"}, "description", "NUL"),
    (
        "NUL in a path",
        lambda d: {**d, "dataset": {"kind": "files", "train": "train\x00.csv"}},
        "dataset.train",
        "NUL",
    ),
    ("NUL in a choice", lambda d: _set(d, "fixed", {"optimizer": "adam\x00"}), "fixed.optimizer", "NUL"),
    ("long path", lambda d: {**d, "dataset": {"kind": "files", "train": "x" * 5000}}, "dataset.train", "at most"),
    ("n_best 10**6", lambda d: {**d, "warm_start_from": {"study": "a", "n_best": 10**6}}, "warm_start_from.n_best", ""),
    ("huge warm start id", lambda d: {**d, "warm_start_from": {"study": HUGE}}, "warm_start_from.study", ""),
    (
        "long option list",
        lambda d: _set(d, "sampler.options", {"n_startup_trials": list(range(2000))}),
        "sampler.options.n_startup_trials",
        "limited",
    ),
]


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [c[1:] for c in SPEC_CASES + HOSTILE_CASES],
    ids=[c[0] for c in SPEC_CASES + HOSTILE_CASES],
)
def test_bad_spec_is_422_naming_the_field(
    client: TestClient,
    user_headers: dict[str, str],
    minilm_spec_data: Spec,
    unchanged: None,
    change: Callable[[dict[str, Any]], dict[str, Any]],
    field: str,
    words: str,
) -> None:
    items = problems(client.post(API, json=change(minilm_spec_data()), headers=user_headers), 422)
    named = [(f, r) for f, r in items if f == field or (f or "").startswith(field + ".")]
    assert named, items
    assert words.lower() in named[0][1].lower(), items


def test_malformed_json_is_422_saying_where(client: TestClient, user_headers: dict[str, str], unchanged: None) -> None:
    headers = {**user_headers, "Content-Type": "application/json"}
    [(field, reason)] = problems(client.post(API, content=b'{"name": "x",', headers=headers), 422)
    assert field == "body" and "malformed JSON" in reason


@pytest.mark.parametrize("body", [b"[1, 2]", b'"a string"', b""], ids=["array", "string", "empty"])
def test_a_body_that_is_not_an_object_is_422(
    client: TestClient, user_headers: dict[str, str], unchanged: None, body: bytes
) -> None:
    headers = {**user_headers, "Content-Type": "application/json"}
    [(field, _reason)] = problems(client.post(API, content=body, headers=headers), 422)
    assert field == "body"


@pytest.fixture
def outside(tmp_path: Path, data_root: Path) -> Path:
    secret = tmp_path / "outside" / "secret.csv"
    secret.parent.mkdir()
    secret.write_text("text,label\nx,1\n", encoding="utf-8")
    os.symlink(secret, data_root / "link.csv")
    return secret


@pytest.mark.parametrize(
    "train",
    ["../outside/secret.csv", "ABSOLUTE", "link.csv", "/etc/passwd"],
    ids=["dot-dot", "absolute", "symlink-out", "etc-passwd"],
)
def test_a_path_outside_the_data_roots_is_refused(
    client: TestClient,
    user_headers: dict[str, str],
    minilm_spec_data: Spec,
    outside: Path,
    unchanged: None,
    train: str,
) -> None:
    train = str(outside) if train == "ABSOLUTE" else train
    spec = minilm_spec_data(dataset={"kind": "files", "train": train})
    [(field, reason)] = problems(client.post(API, json=spec, headers=user_headers), 422)
    assert field == "dataset.train" and "outside the data roots" in reason


def test_missing_token_is_401_with_www_authenticate(
    client: TestClient, minilm_spec_data: Spec, unchanged: None
) -> None:
    r = client.post(API, json=minilm_spec_data())
    [(field, reason)] = problems(r, 401)
    assert field == "authorization" and "bearer" in reason.lower()
    assert r.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "header",
    ["Bearer tf_not-a-real-token", "Bearer something-else", "Basic dXNlcjpwYXNz", "tf_no-scheme"],
    ids=["unknown", "no-prefix", "basic", "no-scheme"],
)
def test_wrong_token_is_401(client: TestClient, minilm_spec_data: Spec, unchanged: None, header: str) -> None:
    r = client.post(API, json=minilm_spec_data(), headers={"Authorization": header})
    [(field, _)] = problems(r, 401)
    assert field == "authorization"
    assert client.get(API, headers={"Authorization": header}).status_code == 401


def test_another_users_study_is_404_everywhere(
    client: TestClient,
    user_headers: dict[str, str],
    other_headers: dict[str, str],
    minilm_spec_data: Spec,
    row_counts: Counts,
) -> None:
    theirs = create(client, other_headers, minilm_spec_data())
    before = row_counts()
    base = f"{API}/{theirs['id']}"
    for method, path, body in [
        ("GET", base, None),
        ("POST", f"{base}/cancel", None),
        ("DELETE", base, None),
        ("GET", f"{base}/best", None),
        ("GET", f"{base}/trials", None),
        ("GET", f"{base}/trials/0", None),
        ("POST", f"{base}/enqueue", {"configurations": [params(1e-4)]}),
    ]:
        r = client.request(method, path, json=body, headers=user_headers)
        [(field, reason)] = problems(r, 404)
        assert field == "study_id" and "not found" in reason, (method, path)
    assert row_counts() == before
    # ...and it is still there for its owner
    assert client.get(base, headers=other_headers).json()["status"] == "running"


def test_unknown_study_id_is_404(client: TestClient, user_headers: dict[str, str], unchanged: None) -> None:
    [(field, _)] = problems(client.get(f"{API}/999", headers=user_headers), 404)
    assert field == "study_id"
    [(field, _)] = problems(client.get(f"{API}/not-a-number", headers=user_headers), 422)
    assert field == "study_id"


def test_duplicate_name_is_409(
    client: TestClient, user_headers: dict[str, str], minilm_spec_data: Spec, row_counts: Counts
) -> None:
    create(client, user_headers, minilm_spec_data())
    before = row_counts()
    [(field, reason)] = problems(client.post(API, json=minilm_spec_data(), headers=user_headers), 409)
    assert field == "name" and "already" in reason
    assert row_counts() == before


def test_body_over_the_limit_is_413(
    client: TestClient, user_headers: dict[str, str], minilm_spec_data: Spec, unchanged: None
) -> None:
    spec = minilm_spec_data(description="x" * 1_100_000)
    [(field, reason)] = problems(client.post(API, json=spec, headers=user_headers), 413)
    assert field == "body" and "larger than" in reason


def test_streamed_body_over_the_limit_is_413(client: TestClient, user_headers: dict[str, str], unchanged: None) -> None:
    """A chunked body declares no length: the bytes are counted as they arrive."""

    def chunks() -> Iterator[bytes]:
        yield b'{"name": "x", "description": "'
        for _ in range(120):
            yield b"y" * 10_000
        yield b'"}'

    headers = {**user_headers, "Content-Type": "application/json"}
    r = client.post(API, content=chunks(), headers=headers)
    assert "content-length" not in {k.lower() for k in r.request.headers}
    [(field, _)] = problems(r, 413)
    assert field == "body"


def test_bad_enqueue_names_the_configuration_and_knob(
    client: TestClient, user_headers: dict[str, str], minilm_spec_data: Spec, row_counts: Counts
) -> None:
    study = create(client, user_headers, minilm_spec_data())
    before = row_counts()
    url = f"{API}/{study['id']}/enqueue"
    cases = [
        ({"configurations": [params(1e-4), params(1e-4, depth=5)]}, "configurations.1.unfreeze_depth", "cannot exceed"),
        ({"configurations": [{**params(1e-4), "warp": 1}]}, "configurations.0.warp", "unknown knob"),
        ({"configurations": [params(5.0)]}, "configurations.0.learning_rate", "not in"),
        ({"configurations": []}, "configurations", "at least 1"),
        ({"configs": [params(1e-4)]}, "configs", "unknown field"),
        # beyond 64 bits: float() raised OverflowError, a 500
        ({"configurations": [{**params(1e-4), "num_layers": HUGE}]}, "configurations.0.num_layers", "not in"),
        ({"configurations": [params(HUGE)]}, "configurations.0.learning_rate", "a huge integer is not in"),
        ({"configurations": [params(1e-4, bs=HUGE)]}, "configurations.0.batch_size", "not in"),
        ({"configurations": [params(1e-4, bs=[16] * 10_000)]}, "configurations.0.batch_size", "..."),
    ]
    for body, field, words in cases:
        items = problems(client.post(url, json=body, headers=user_headers), 422)
        assert any(f == field and words in r for f, r in items), (body, items)
    # 1e400 is valid JSON that Python reads as inf
    text = json.dumps({"configurations": [params(1e-4)]}).replace("0.0001", "1e400")
    headers = {**user_headers, "Content-Type": "application/json"}
    items = problems(client.post(url, content=text, headers=headers), 422)
    assert [f for f, _ in items] == ["configurations.0.learning_rate"], items
    assert row_counts() == before


@pytest.mark.parametrize(
    ("path", "query", "field"),
    [
        ("", {"limit": 0}, "limit"),
        ("", {"limit": 1000}, "limit"),
        ("", {"offset": -1}, "offset"),
        ("", {"status": "sleeping"}, "status"),
        ("/1/trials", {"sort": "colour"}, "sort"),
        ("/1/trials", {"state": "bored"}, "state"),
        ("/1/trials", {"order": "up"}, "order"),
    ],
)
def test_bad_query_parameters_are_422(
    client: TestClient, user_headers: dict[str, str], path: str, query: dict[str, Any], field: str
) -> None:
    [(named, _)] = problems(client.get(f"{API}{path}", params=query, headers=user_headers), 422)
    assert named == field


def test_worker_token_is_403_on_user_endpoints(
    client: TestClient, worker_headers: dict[str, str], minilm_spec_data: Spec, unchanged: None
) -> None:
    for method, path, body in [("POST", API, minilm_spec_data()), ("GET", API, None), ("GET", f"{API}/1", None)]:
        [(field, reason)] = problems(client.request(method, path, json=body, headers=worker_headers), 403)
        assert field == "authorization" and "worker" in reason


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(
    client: TestClient, user_headers: dict[str, str], minilm_spec_data: Spec, unchanged: None, constant: str
) -> None:
    """Python's parser would take them; a range or a budget must never hold one."""
    text = json.dumps(minilm_spec_data()).replace('"low": 1e-05', f'"low": {constant}')
    assert constant in text
    headers = {**user_headers, "Content-Type": "application/json"}
    [(field, reason)] = problems(client.post(API, content=text, headers=headers), 422)
    assert field == "body" and f"{constant.lstrip('-')} is not valid JSON" in reason


@pytest.mark.parametrize(
    "path",
    ["/99999999999999999999", "/2147483648", "/0", "/1/trials/99999999999", "/1/trials/-1", "?offset=99999999999999"],
)
def test_numbers_a_database_cannot_hold_are_422(
    client: TestClient, user_headers: dict[str, str], unchanged: None, path: str
) -> None:
    [(field, _)] = problems(client.get(f"{API}{path}", headers=user_headers), 422)
    assert field in ("study_id", "number", "offset")


def test_enqueue_into_a_study_whose_stored_spec_no_longer_validates_is_409(
    client: TestClient, user_headers: dict[str, str], minilm_spec_data: Spec, row_counts: Counts, ctx: Any
) -> None:
    """A spec stored before a bound existed (timeout_s: 1e300) is the study's fault, not a 500."""
    from sqlalchemy import update

    from service.models import Study

    study = create(client, user_headers, minilm_spec_data())
    poisoned = {**minilm_spec_data(), "budget": {"n_trials": 10, "timeout_s": 1e300}}
    with ctx.db.scope() as s:
        s.execute(update(Study).where(Study.id == study["id"]).values(spec=poisoned))
    before = row_counts()
    r = client.post(f"{API}/{study['id']}/enqueue", json={"configurations": [params(1e-4)]}, headers=user_headers)
    [(field, reason)] = problems(r, 409)
    assert field == "study_id" and "budget.timeout_s" in reason
    assert row_counts() == before
