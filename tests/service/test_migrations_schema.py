"""Migrations: an empty database reaches head on both backends, the history matches the
ORM models exactly, and it never touches Optuna's tables."""

from __future__ import annotations

from pathlib import Path

import optuna
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from service.migrate import VERSION_TABLE, alembic_config, current_revision, head_revision, include_object, upgrade
from service.models import Base
from service.settings import Settings


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_upgrade_empty_database_to_head_matches_the_models(db_url: str, tmp_path: Path) -> None:
    settings = Settings(database_url=db_url, home=tmp_path)
    engine = sa.create_engine(db_url)
    try:
        assert _tables(engine) == set()
        upgrade(settings)
        upgrade(settings)  # idempotent

        tables = _tables(engine)
        assert {t.name for t in Base.metadata.sorted_tables} <= tables
        assert VERSION_TABLE in tables
        assert {"studies", "trials", "alembic_version"} <= tables  # Optuna's, by Optuna's own upgrade
        with engine.connect() as conn:
            assert current_revision(conn) == head_revision()
            context = MigrationContext.configure(
                conn,
                opts={"version_table": VERSION_TABLE, "include_object": include_object, "compare_type": True},
            )
            assert compare_metadata(context, Base.metadata) == []
            # our history did not write into Optuna's version table
            optuna_rev = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
        storage = optuna.storages.RDBStorage(db_url)  # Optuna's compatibility check passes
        assert storage.get_current_version() == storage.get_head_version() == optuna_rev
        storage.engine.dispose()
    finally:
        engine.dispose()


def test_downgrade_removes_only_tf_tables(db_url: str, tmp_path: Path) -> None:
    upgrade(Settings(database_url=db_url, home=tmp_path))
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "base")
        left = _tables(engine)
        assert not {t for t in left if t.startswith("tf_") and t != VERSION_TABLE}
        assert {"studies", "trials", "alembic_version"} <= left
    finally:
        engine.dispose()


def test_alembic_scripts_are_found_from_any_working_directory(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    assert head_revision() == "0002"
