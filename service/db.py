"""Engine, sessions and the one transactional scope every write goes through.

Like Optuna's `_rdb/storage.py`: each unit of work is one `with db.scope() as s:`
block that commits on success, rolls back on error and translates database
errors into domain errors. `db.run(fn)` re-runs a whole unit of work when
PostgreSQL reports a deadlock or serialization failure, or SQLite stays locked.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from service.errors import Unavailable
from service.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# PostgreSQL SQLSTATEs worth retrying: serialization_failure, deadlock_detected.
_RETRY_SQLSTATES = {"40001", "40P01"}


def engine_kwargs(url: str, *, pool_size: int, max_overflow: int) -> dict[str, Any]:
    """`create_engine` options for our engine and Optuna's storage alike: both must ride
    out a database restart the same way (pre-ping replaces connections the server
    dropped) and, on SQLite, queue for the write lock instead of failing at once."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 30, "check_same_thread": False}, "pool_pre_ping": True}
    return {"pool_size": pool_size, "max_overflow": max_overflow, "pool_pre_ping": True, "pool_recycle": 1800}


def install_pragmas(engine: Engine) -> None:
    """SQLite pragmas on every new connection of `engine` (a no-op on other databases)."""
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)


def make_engine(settings: Settings) -> Engine:
    url = settings.database_url
    engine = create_engine(
        url, **engine_kwargs(url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow)
    )
    install_pragmas(engine)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers run beside the one writer; the busy timeout makes writers
    # queue instead of failing at once with "database is locked".
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _is_retryable(exc: DBAPIError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate in _RETRY_SQLSTATES:
        return True
    return isinstance(exc, OperationalError) and "database is locked" in str(exc.orig)


class Database:
    """Owns the engine and the session factory for one `Settings`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._lock = threading.Lock()
        self.retried = 0  # deadlocks / lock timeouts retried, for benchmarks and tests
        # When (time.monotonic()) a contact with the database last failed for want of a
        # connection; None if never. The scheduler pauses lease clocks across such gaps.
        self.last_failure: float | None = None
        self._reconnect_hooks: list[Callable[[Session], None]] = []
        self._reconnect_pending = False
        self._reconnect_lock = threading.Lock()

    def on_reconnect(self, hook: Callable[[Session], None]) -> None:
        """Run `hook` in its own transaction before the first unit of work after the
        database was unreachable, and before the next unit of work from now on (whoever
        registers it has just come up, which is an outage as far as it knows). A failed
        hook stays pending and its error goes to the caller of that unit of work."""
        with self._reconnect_lock:
            self._reconnect_hooks.append(hook)
            self._reconnect_pending = True

    def _note_failure(self) -> None:
        self.last_failure = time.monotonic()
        if self._reconnect_hooks:
            self._reconnect_pending = True

    def _run_reconnect_hooks(self) -> None:
        with self._reconnect_lock:
            if not self._reconnect_pending:
                return  # another thread ran them while this one waited
            with self._transaction() as session:
                for hook in self._reconnect_hooks:
                    hook(session)
            self._reconnect_pending = False

    @contextmanager
    def scope(self) -> Iterator[Session]:
        """One transaction: commit on success, roll back on any error."""
        if self._reconnect_pending:
            self._run_reconnect_hooks()
        with self._transaction() as session:
            yield session

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        """A session committed at the end; database errors become domain errors."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except OperationalError as exc:
            session.rollback()
            if _is_retryable(exc):
                raise
            self._note_failure()
            raise Unavailable(f"database unavailable: {exc.orig}") from exc
        except DBAPIError as exc:
            session.rollback()
            if not (exc.connection_invalidated or isinstance(exc, InterfaceError)):
                raise
            # The connection broke under us (not an OperationalError on every driver).
            self._note_failure()
            raise Unavailable(f"database unavailable: {exc.orig}") from exc
        except PoolTimeout as exc:
            session.rollback()
            raise Unavailable(f"no free database connection: {exc}") from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def run(self, fn: Callable[[Session], T], attempts: int = 8) -> T:
        """Run `fn` in a scope, re-running it on deadlocks with jittered backoff."""
        for attempt in range(1, attempts + 1):
            try:
                with self.scope() as session:
                    return fn(session)
            except DBAPIError as exc:
                if not _is_retryable(exc) or attempt == attempts:
                    if _is_retryable(exc):
                        raise Unavailable("database stayed locked; try again") from exc
                    raise
                with self._lock:
                    self.retried += 1
                time.sleep(random.uniform(0.005, 0.05) * attempt)
        raise AssertionError("unreachable")

    def ping(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except DBAPIError as exc:
            self._note_failure()
            raise Unavailable(f"database unavailable: {exc.orig}") from exc
        except PoolTimeout as exc:
            raise Unavailable(f"no free database connection: {exc}") from exc

    def dispose(self) -> None:
        self.engine.dispose()
