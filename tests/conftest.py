"""Shared fixtures: one fresh database per test on SQLite and PostgreSQL, the app, tokens,
a live server.

- `db_url`: a fresh, EMPTY database; parametrised, ids "sqlite" and "postgresql".
- `upgraded_db_url`: the same, already at head (tf_* and Optuna's tables). It is a
  copy of a template upgraded once per session, so a test does not pay for migrations.
- `settings`: `Settings` on `upgraded_db_url`, data_roots=[tmp data dir], home=tmp.
- `ctx`: a `ServiceContext` for calling service functions directly.
- `app` / `client`: `create_app(settings)` and a TestClient around it (lifespan run);
  `app_hooks` picks its lifespan hooks (override with `[]` for no background work).
- `admin_token`, `user_token`, `other_token`, `worker_token` (plaintext) and the
  matching `*_headers` dicts. `user_token` and `other_token` belong to different owners.
- `live_server`: a real uvicorn server in a thread on a free port; its base URL.
- `row_counts`: a function counting tf_* and Optuna rows, for "nothing changed" checks.

PostgreSQL: the server URL comes from TUNEFORGE_TEST_PG_URL (default
postgresql+psycopg://postgres@127.0.0.1:5432/test); each test gets its own
database, dropped WITH (FORCE) afterwards. Without a server the postgresql cases
skip, except under CI=true, where they fail: CI must never pass by skipping them.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from service import auth
from service.context import ServiceContext
from service.migrate import upgrade
from service.models import Role
from service.settings import Settings

PG_ENV = "TUNEFORGE_TEST_PG_URL"
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pg_server_url() -> sa.URL:
    raw = os.environ.get(PG_ENV) or PG_DEFAULT
    url = make_url(raw)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")  # psycopg2 is not a dependency
    return url


class _PgAdmin:
    """Creates and drops per-test databases on the PostgreSQL server."""

    def __init__(self, url: sa.URL) -> None:
        self.url = url
        self.engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})

    def create(self, name: str, template: str | None = None) -> str:
        tmpl = f' TEMPLATE "{template}"' if template else ""
        with self.engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"{tmpl}'))
        return self.url.set(database=name).render_as_string(hide_password=False)

    def drop(self, name: str) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[_PgAdmin]:
    url = _pg_server_url()
    admin = _PgAdmin(url)
    try:
        with admin.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        admin.engine.dispose()
        message = f"PostgreSQL unreachable at {url.render_as_string()} ({PG_ENV}): {exc.orig}"
        if _in_ci():
            pytest.fail(f"CI=true requires PostgreSQL; {message}", pytrace=False)
        pytest.skip(message)
    yield admin
    admin.engine.dispose()


def _fresh_name(kind: str) -> str:
    return f"tf_{kind}_{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tuneforge.db'}"
        return
    admin: _PgAdmin = request.getfixturevalue("pg_admin")
    name = _fresh_name("test")
    url = admin.create(name)
    yield url
    admin.drop(name)


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    upgrade(Settings(database_url=f"sqlite:///{path}"))
    # every connection is closed now, so the WAL is checkpointed into the main file
    return path


class _PgPool:
    """Databases cloned from the template ahead of time by one background thread and
    dropped by another: creating or dropping a PostgreSQL database costs about half a
    second to a second (fsync), which then overlaps with the tests instead of adding up."""

    def __init__(self, admin: _PgAdmin, template: str, ahead: int = 2) -> None:
        self.admin = admin
        self.template = template
        self.to_create: queue.Queue[str | None] = queue.Queue()
        self.to_drop: queue.Queue[str | None] = queue.Queue()
        self.ready: queue.Queue[str | BaseException] = queue.Queue()
        self.threads = [
            threading.Thread(target=self._creator, name="pg-test-db-create", daemon=True),
            threading.Thread(target=self._dropper, name="pg-test-db-drop", daemon=True),
        ]
        for thread in self.threads:
            thread.start()
        for _ in range(ahead):
            self.to_create.put(_fresh_name("test"))

    def _creator(self) -> None:
        while (name := self.to_create.get()) is not None:
            try:
                self.admin.create(name, template=self.template)
                self.ready.put(name)
            except sa.exc.DBAPIError as exc:  # handed to the test that waits for this database
                self.ready.put(exc)

    def _dropper(self) -> None:
        while (name := self.to_drop.get()) is not None:
            try:
                self.admin.drop(name)
            except sa.exc.DBAPIError as exc:
                print(f"could not drop test database {name}: {exc}")

    def take(self) -> str:
        self.to_create.put(_fresh_name("test"))  # keep the pool topped up
        got = self.ready.get(timeout=120)
        if isinstance(got, BaseException):
            raise got
        return self.admin.url.set(database=got).render_as_string(hide_password=False)

    def give_back(self, url: str) -> None:
        name = make_url(url).database
        assert name is not None
        self.to_drop.put(name)

    def close(self) -> None:
        self.to_create.put(None)
        self.threads[0].join(timeout=120)
        while not self.ready.empty():
            got = self.ready.get()
            if isinstance(got, str):
                self.to_drop.put(got)
        self.to_drop.put(None)
        self.threads[1].join(timeout=300)


@pytest.fixture(scope="session")
def _pg_pool(pg_admin: _PgAdmin) -> Iterator[_PgPool]:
    template = _fresh_name("tmpl")
    url = pg_admin.create(template)
    upgrade(Settings(database_url=url))  # disposes its engines: the template has no sessions left
    pool = _PgPool(pg_admin, template)
    yield pool
    pool.close()
    pg_admin.drop(template)


@pytest.fixture(params=BACKENDS)
def upgraded_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database at head on each backend (a copy of a session template)."""
    if request.param == "sqlite":
        path = tmp_path / "tuneforge.db"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    pool: _PgPool = request.getfixturevalue("_pg_pool")
    url = pool.take()
    yield url
    pool.give_back(url)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture
def settings(upgraded_db_url: str, data_root: Path, tmp_path: Path) -> Settings:
    home = tmp_path / "home"
    return Settings(
        environment="local",
        database_url=upgraded_db_url,
        data_roots=[data_root],
        home=home,
        artifact_dir=home / "artifacts",
    )


@pytest.fixture
def ctx(settings: Settings) -> Iterator[ServiceContext]:
    context = ServiceContext.build(settings)
    yield context
    context.close()


@pytest.fixture
def app_hooks() -> list[Any] | None:
    """Lifespan hooks of the `app` fixture: None means the app's own (`LIFESPAN_HOOKS`, e.g.
    the scheduler's background filler). Override it in a test module with `[]` for an app
    with no background work, where a test counts rows."""
    return None


@pytest.fixture
def app(settings: Settings, ctx: ServiceContext, app_hooks: list[Any] | None):  # type: ignore[no-untyped-def]
    from service.api.app import create_app

    return create_app(settings, context=ctx, lifespan_hooks=app_hooks)


@pytest.fixture
def client(app):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    # raise_server_exceptions=False: a 500 is asserted as a response, like a real client sees it
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def admin_token(ctx: ServiceContext) -> str:
    return auth.create_token(ctx.db, "root", Role.ADMIN, owner="root")


@pytest.fixture
def user_token(ctx: ServiceContext) -> str:
    return auth.create_token(ctx.db, "alice", Role.USER, owner="alice")


@pytest.fixture
def other_token(ctx: ServiceContext) -> str:
    return auth.create_token(ctx.db, "bob", Role.USER, owner="bob")


@pytest.fixture
def worker_token(ctx: ServiceContext) -> str:
    return auth.create_token(ctx.db, "gpu-node-1", Role.WORKER, owner="ops")


@pytest.fixture
def admin_headers(admin_token: str) -> dict[str, str]:
    return bearer(admin_token)


@pytest.fixture
def user_headers(user_token: str) -> dict[str, str]:
    return bearer(user_token)


@pytest.fixture
def other_headers(other_token: str) -> dict[str, str]:
    return bearer(other_token)


@pytest.fixture
def worker_headers(worker_token: str) -> dict[str, str]:
    return bearer(worker_token)


@pytest.fixture
def row_counts(ctx: ServiceContext) -> Callable[[], dict[str, int]]:
    """Counts of the rows a rejected request must not touch (ours and Optuna's)."""
    tables = ["tf_studies", "tf_trials", "tf_tokens", "studies", "trials"]

    def count() -> dict[str, int]:
        with ctx.db.engine.connect() as conn:
            return {t: conn.execute(sa.text(f"SELECT COUNT(*) FROM {t}")).scalar_one() for t in tables}

    return count


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture
def live_server(app) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """Serve `app` with uvicorn in a thread on a free port; yields the base URL."""
    import uvicorn

    sock = _free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()
