"""The error bodies as published and as sent: the OpenAPI documents one `Problem` body for
every error status an operation can answer, and a database outage tells an
unauthenticated caller nothing about the deployment (the log has the driver's text)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.errors import UNAVAILABLE_REASON
from service.settings import Settings

GENERIC_503 = {"detail": [{"field": None, "reason": UNAVAILABLE_REASON}]}
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again on exit: connecting is refused


def _down_settings(tmp_path: Path, kind: str) -> tuple[Settings, list[str]]:
    """Settings whose database cannot be reached, and the words that must not leak."""
    if kind == "postgresql":
        port = _closed_port()
        url = f"postgresql+psycopg://tf_secret_role:hunter2@127.0.0.1:{port}/tf_secret_db"
        secrets = ["tf_secret_role", "hunter2", "127.0.0.1", str(port), "tf_secret_db", "psycopg", "refused"]
    else:
        missing = tmp_path / "no-such-folder" / "tf_secret_file.db"
        url = f"sqlite:///{missing}"
        secrets = ["tf_secret_file", "no-such-folder", str(tmp_path), "sqlite", "unable to open"]
    settings = Settings(database_url=url, home=tmp_path / "home", data_roots=[tmp_path])
    return settings, secrets


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_a_database_outage_leaks_nothing(tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    settings, secrets = _down_settings(tmp_path, kind)
    app = create_app(settings, lifespan_hooks=[])
    with TestClient(app, raise_server_exceptions=False) as c, caplog.at_level(logging.WARNING):
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        # Authentication reads the token table, so an API call is a 503 before any 401.
        api = c.get("/api/v1/studies", headers={"Authorization": "Bearer tf_whatever"})
    for r in (ready, api):
        assert r.status_code == 503, r.text
        assert r.json() == GENERIC_503
        assert r.headers["retry-after"] == "5"
        for word in secrets:
            assert word.lower() not in r.text.lower(), (word, r.text)
    # The operator still learns why, from the server log.
    logged = " ".join(rec.getMessage() for rec in caplog.records if rec.name == "service.api.errors")
    assert "GET /readyz" in logged
    assert ("refused" if kind == "postgresql" else "unable to open") in logged.lower()


def test_a_json_body_that_is_not_utf8_is_a_422(client: TestClient, worker_headers: dict[str, str]) -> None:
    r = client.post(
        "/api/v1/leases",
        content=b'{"worker_id": "\xff"}',
        headers={**worker_headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    [item] = r.json()["detail"]
    assert item["field"] == "body" and item["reason"].startswith("malformed JSON")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"worker_id": ' + b"9" * 5000 + b"}", "a number has too many digits"),
    ],
)
@pytest.mark.parametrize("route", ["/api/v1/leases", "/api/v1/studies"])
def test_json_bodies_python_cannot_parse_are_a_422_naming_the_limit(
    client: TestClient, admin_headers: dict[str, str], route: str, body: bytes, why: str
) -> None:
    r = client.post(route, content=body, headers={**admin_headers, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == [{"field": "body", "reason": f"malformed JSON: {why}"}]


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in schema["paths"].items() for method, op in item.items()]


def test_openapi_documents_the_error_body_everywhere(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    assert "HTTPValidationError" not in components and "ValidationError" not in components
    assert components["Problem"]["required"] == ["detail"]
    assert set(components["ProblemItem"]["properties"]) == {"field", "reason"}
    operations = _operations(schema)
    assert len(operations) >= 19
    for path, method, op in operations:
        where = f"{method.upper()} {path}"
        responses = op["responses"]
        for code, response in responses.items():
            if int(code) >= 400:
                assert response["content"] == {"application/json": {"schema": PROBLEM_REF}}, (where, code)
                assert response["description"], (where, code)
        expected = set()
        if op.get("parameters") or op.get("requestBody"):
            expected.add("422")
        if op.get("requestBody"):
            expected.add("413")
        if op.get("security"):
            expected |= {"401", "403"}
        if any(p["in"] == "path" for p in op.get("parameters", [])):
            expected.add("404")
        if path != "/healthz":
            expected.add("503")
        assert expected <= set(responses), (where, sorted(expected - set(responses)))
    paths = schema["paths"]
    assert "401" in paths["/api/v1/studies/{study_id}/trials"]["get"]["responses"]
    assert "409" in paths["/api/v1/studies/{study_id}/enqueue"]["post"]["responses"]
    assert "409" in paths["/api/v1/studies"]["post"]["responses"]
    assert "WWW-Authenticate" in paths["/api/v1/studies"]["get"]["responses"]["401"]["headers"]
    assert "Retry-After" in paths["/readyz"]["get"]["responses"]["503"]["headers"]
    tar = {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}
    assert paths["/api/v1/leases/{lease_id}/checkpoint"]["get"]["responses"]["200"]["content"] == tar
    assert paths["/api/v1/studies/{study_id}/trials/{number}/checkpoint"]["get"]["responses"]["200"]["content"] == tar


def test_errors_never_echo_a_huge_key_or_value_back(client: TestClient, user_headers: dict[str, str]) -> None:
    big = "k" * 300_000
    spec = {
        "name": "echo",
        "model": {"kind": "builtin"},
        "dataset": {"kind": "files", "train": "a.csv"},
        "objective": {"metric": "accuracy"},
        "budget": {"n_trials": 1},
        "search_space": {big: {"type": "int", "low": 1, "high": 2}},
    }
    r = client.post("/api/v1/studies", json=spec, headers=user_headers)
    assert r.status_code == 422
    assert len(r.content) < 5_000
    [item] = r.json()["detail"]
    assert item["field"].startswith("search_space.kkk") and item["field"].endswith("…")
    assert item["reason"].startswith("unknown knob 'kkk")
