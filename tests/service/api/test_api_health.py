"""Probes, the error body shape for unknown routes, and the 503 when the database is down."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_unknown_route_has_the_common_error_shape(client: TestClient) -> None:
    r = client.get("/api/v1/nothing-here")
    assert r.status_code == 404
    assert r.json() == {"detail": [{"field": None, "reason": "Not Found"}]}


def test_readyz_is_503_when_the_database_is_down(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Port 1 on localhost refuses at once: a database that is down, without waiting.
    settings = Settings(database_url="postgresql+psycopg://postgres@127.0.0.1:1/none", home=tmp_path)
    with TestClient(create_app(settings)) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
    assert r.status_code == 503
    [item] = r.json()["detail"]
    assert "database unavailable" in item["reason"]


def test_openapi_docs_are_served(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    assert client.get("/openapi.json").json()["info"]["title"] == "TuneForge"
