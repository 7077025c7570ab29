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


def test_an_internal_error_is_a_generic_500_and_logged(settings: Settings, caplog) -> None:  # type: ignore[no-untyped-def]
    from fastapi import APIRouter

    from service.api.app import API_ROUTERS

    boom = APIRouter()

    @boom.get("/boom")
    def explode() -> None:
        raise RuntimeError("secret internals")

    app = create_app(settings, routers=[*API_ROUTERS, boom], lifespan_hooks=[])
    with TestClient(app, raise_server_exceptions=False) as c, caplog.at_level("ERROR"):
        r = c.get("/api/v1/boom")
    assert r.status_code == 500
    assert r.json() == {"detail": [{"field": None, "reason": "internal server error; the server log has the details"}]}
    assert "secret" not in r.text
    assert any("internal error on GET /api/v1/boom" in rec.getMessage() and rec.exc_info for rec in caplog.records)
