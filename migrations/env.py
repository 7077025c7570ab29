"""Alembic environment for the `tf_*` tables.

Run through `service.migrate`, which hands over an open connection in
`config.attributes["connection"]`; nothing here reads the CWD or an alembic.ini.
Optuna's tables share the database and have their own Alembic history (and their
own `alembic_version` table), so this history keeps to `tf_*` names and records
itself in `tf_alembic_version`.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection, create_engine

from service.migrate import VERSION_TABLE, include_object
from service.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_object=include_object,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection: Any = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("run migrations through `tuneforge db upgrade` (service.migrate.upgrade)")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            _configure(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported; run `tuneforge db upgrade`")
run_migrations_online()
