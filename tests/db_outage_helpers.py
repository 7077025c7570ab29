"""A database outage inside one process: the shared PostgreSQL server (or the SQLite
file) stays up for every other test, while the engines given here fail every statement
the way a dropped connection does. Used by the outage tests and `bench/db_outage.py`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event


class DbOutage:
    """While `down`, every statement on the given engines fails with the driver's
    OperationalError, as on a connection the server dropped."""

    def __init__(self, *engines: sa.Engine) -> None:
        self.down = False
        for engine in engines:
            error = engine.dialect.dbapi.OperationalError  # type: ignore[union-attr]
            for name in ("do_execute", "do_execute_no_params", "do_executemany"):
                event.listen(engine, name, self._guard(error))

    def _guard(self, error: type[Exception]) -> Any:
        def guard(*_args: Any) -> None:
            if self.down:
                raise error("server closed the connection unexpectedly (simulated outage)")

        return guard

    @contextmanager
    def active(self) -> Iterator[None]:
        self.down = True
        try:
            yield
        finally:
            self.down = False
