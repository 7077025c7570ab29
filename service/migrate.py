"""Bring a database to head: the `tf_*` tables (our Alembic history) and Optuna's tables
(Optuna's own upgrade). Called by `tuneforge db upgrade`, by `tuneforge serve` on a
local start, and by tests; idempotent, so running it twice changes nothing.

The Alembic config is built in code with `script_location` taken from the package
path, so it works from any CWD and from a non-editable install (`migrations/` is a
package shipped beside `service/`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from optuna.storages import RDBStorage
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from service.db import make_engine
from service.errors import Unavailable
from service.settings import Settings

log = logging.getLogger(__name__)

VERSION_TABLE = "tf_alembic_version"
TABLE_PREFIX = "tf_"
# Any fixed 64-bit number: PostgreSQL advisory lock that serialises concurrent upgrades
# (several API replicas or a compose `migrate` job starting together).
_PG_LOCK_KEY = 7_346_021_118


def migrations_dir() -> Path:
    # `migrations/` sits beside `service/` both in a checkout and in site-packages.
    path = Path(__file__).resolve().parent.parent / "migrations"
    if not (path / "env.py").is_file():
        raise RuntimeError(f"Alembic scripts not found at {path}; reinstall tuneforge")
    return path


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Autogenerate sees only `tf_*` tables, never Optuna's tables living beside them."""
    if type_ == "table":
        return bool(name and name.startswith(TABLE_PREFIX))
    table = getattr(obj, "table", None)
    return table is None or str(table.name).startswith(TABLE_PREFIX)


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(settings: Settings) -> None:
    """Upgrade the `tf_*` tables and Optuna's tables to head."""
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
                conn.commit()
            elif conn.dialect.name == "sqlite":
                # Batch migrations rebuild a table (copy, drop, rename); with foreign keys
                # enforced, dropping the old tf_studies would cascade-delete every trial and
                # lease. Set before any transaction (a no-op inside one); this engine is
                # disposed below, so no connection keeps it.
                conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
                conn.commit()
            try:
                command.upgrade(alembic_config(conn), "head")
                conn.commit()
                _upgrade_optuna(settings.database_url)
            finally:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                    conn.commit()
    except DBAPIError as exc:
        raise Unavailable(f"cannot upgrade the database: {exc.orig}") from exc
    finally:
        engine.dispose()


def _upgrade_optuna(url: str) -> None:
    # Constructing RDBStorage creates Optuna's tables on an empty database and stamps
    # its own Alembic version; an older Optuna schema is then upgraded in place.
    # The compatibility check is skipped because that is exactly what we fix here.
    storage = RDBStorage(url, skip_compatibility_check=True)
    try:
        if storage.get_current_version() != storage.get_head_version():
            log.info("upgrading Optuna's tables to %s", storage.get_head_version())
            storage.upgrade()
    finally:
        storage.engine.dispose()


def local_setup(settings: Settings) -> Path | None:
    """Upgrade, then on a local install make sure a usable admin token sits in
    `settings.admin_token_file`. Returns that file if a token was written now."""
    from service.auth import ensure_local_admin  # auth needs the tables upgraded first
    from service.db import Database

    upgrade(settings)
    if settings.environment != "local":
        return None
    db = Database(settings)
    try:
        return ensure_local_admin(db, settings)
    finally:
        db.dispose()
