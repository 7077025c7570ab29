"""Probes, the error body shape for unknown routes, and the 503 when the database is down."""

from __future__ import annotations

from collections.abc import Callable

import pytest
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


def _raise_wrapped(outer: Exception, cause: BaseException) -> None:
    raise outer from cause


@pytest.mark.parametrize(
    ("kind", "status"),
    [("optuna-dropped-connection", 503), ("pool-exhausted", 503), ("interface", 503), ("optuna-bad-data", 500)],
)
def test_database_trouble_under_optuna_is_a_503_and_bugs_stay_500(  # type: ignore[no-untyped-def]
    settings: Settings, kind: str, status: int, caplog
) -> None:
    """Optuna's storage wraps every SQLAlchemy error in its own type: a dropped connection
    (a database restart mid-report) must reach the worker as a retryable 503, never a 500,
    while invalid data stays a 500 (a bug). The driver's text never reaches the body."""
    from fastapi import APIRouter
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import DataError, InterfaceError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from service.api.app import API_ROUTERS

    failures: dict[str, Callable[[], None]] = {
        "optuna-dropped-connection": lambda: _raise_wrapped(
            StorageInternalError("commit failed"), OperationalError("SELECT 1", {}, Exception("host db-7 gone"))
        ),
        "pool-exhausted": lambda: _raise_wrapped(PoolTimeout("QueuePool limit of size 5 reached"), ValueError()),
        "interface": lambda: _raise_wrapped(
            InterfaceError("SELECT 1", {}, Exception("host db-7 closed")), ValueError()
        ),
        "optuna-bad-data": lambda: _raise_wrapped(
            StorageInternalError("commit failed"), DataError("INSERT", {}, Exception("value too long"))
        ),
    }
    boom = APIRouter()

    @boom.get("/db-trouble")
    def trouble() -> None:
        failures[kind]()

    app = create_app(settings, routers=[*API_ROUTERS, boom], lifespan_hooks=[])
    with TestClient(app, raise_server_exceptions=False) as c, caplog.at_level("WARNING"):
        r = c.get("/api/v1/db-trouble")
    assert r.status_code == status
    assert "db-7" not in r.text and "QueuePool" not in r.text and "too long" not in r.text
    if status == 503:
        assert r.headers["Retry-After"]
        assert r.json()["detail"][0]["field"] is None


@pytest.mark.parametrize("error", ["interface", "invalidated", "pool"])
def test_database_scope_turns_lost_connections_into_unavailable(ctx, error: str) -> None:  # type: ignore[no-untyped-def]
    """Not every driver reports a dropped connection as an OperationalError."""
    from sqlalchemy.exc import DBAPIError, InterfaceError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from service.errors import Unavailable

    def fail(_s: object) -> None:
        if error == "interface":
            raise InterfaceError("SELECT 1", {}, Exception("connection already closed"))
        if error == "invalidated":
            raise DBAPIError("SELECT 1", {}, Exception("server closed the connection"), connection_invalidated=True)
        raise PoolTimeout("QueuePool limit reached")

    before = ctx.db.last_failure
    with pytest.raises(Unavailable):
        ctx.db.run(fail)
    if error != "pool":
        assert ctx.db.last_failure is not None and ctx.db.last_failure != before
