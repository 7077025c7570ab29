"""What one running service holds: settings, the database, Optuna's storage.

`create_app(settings)` builds one `ServiceContext`; the CLI and tests can build
their own and call service functions without HTTP. Background parts (the
scheduler, the reaper) hang their state here as well, through `extras` or a new
field.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError

from service.db import Database
from service.errors import Unavailable
from service.settings import Settings

if TYPE_CHECKING:
    from optuna.storages import BaseStorage


@dataclass
class ServiceContext:
    settings: Settings
    db: Database
    extras: dict[str, Any] = field(default_factory=dict)
    _storage: BaseStorage | None = field(default=None, init=False, repr=False)
    _storage_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def build(cls, settings: Settings) -> ServiceContext:
        # Creating an engine does not connect, so this works while the database is down;
        # /readyz then says 503 until it comes up.
        return cls(settings=settings, db=Database(settings))

    @property
    def storage(self) -> BaseStorage:
        """Optuna's storage on the same database, built on first use: constructing it
        connects (Optuna checks its schema version), which must not happen at start-up
        while the database may still be down."""
        if self._storage is None:
            with self._storage_lock:
                if self._storage is None:
                    from service.optuna_bridge import make_storage

                    try:
                        self._storage = make_storage(
                            self.settings.database_url,
                            pool_size=self.settings.db_pool_size,
                            max_overflow=self.settings.db_max_overflow,
                        )
                    except DBAPIError as exc:
                        raise Unavailable(f"database unavailable: {exc.orig}") from exc
        return self._storage

    def close(self) -> None:
        storage, self._storage = self._storage, None
        engine = getattr(storage, "engine", None) or getattr(getattr(storage, "_backend", None), "engine", None)
        if engine is not None:
            engine.dispose()
        self.db.dispose()
