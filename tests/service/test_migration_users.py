"""Migration 0002 on a database holding 0001-era tokens, studies and leases: every owner
string becomes one user, tokens and studies keep exactly the access they had, and a
downgrade gives the names back."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from service import auth, studies
from service.db import Database
from service.errors import Conflict
from service.migrate import alembic_config, upgrade
from service.models import LeaseState, Role, StudyStatus, TrialState
from service.settings import Settings

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

TOKENS = {  # plaintext: (name, owner, role)
    "tf_admin-secret": ("local-admin", "admin", "admin"),
    "tf_alice-secret": ("alice", "alice", "user"),
    "tf_alice-laptop": ("alice-laptop", "alice", "user"),
    "tf_worker-secret": ("gpu-node-1", "ops", "worker"),
}
STUDIES = [("admin", "s"), ("alice", "s"), ("alice", "t"), ("ghost", "orphan")]  # (owner, name)


def _seed_0001(conn: sa.Connection) -> None:
    tokens = sa.table(
        "tf_tokens",
        sa.column("name", sa.String),
        sa.column("owner", sa.String),
        sa.column("role", sa.String),
        sa.column("token_hash", sa.String),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    for plaintext, (name, owner, role) in TOKENS.items():
        conn.execute(
            sa.insert(tokens).values(
                name=name, owner=owner, role=role, token_hash=auth.hash_token(plaintext), created_at=NOW
            )
        )
    study_table = sa.table(
        "tf_studies",
        *(sa.column(c, sa.String) for c in ("name", "owner", "optuna_name", "status")),
        *(sa.column(c, sa.JSON) for c in ("spec", "directions", "objectives")),
        *(
            sa.column(c, sa.Integer)
            for c in ("max_parallel", "max_retries", "n_started", "n_running", "n_complete", "n_pruned", "n_failed")
        ),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("updated_at", sa.DateTime(timezone=True)),
    )
    for owner, name in STUDIES:
        conn.execute(
            sa.insert(study_table).values(
                name=name,
                owner=owner,
                optuna_name=f"{owner}.{name}.0000",
                status=StudyStatus.RUNNING.value,
                spec={},
                directions=["maximize"],
                objectives=["accuracy"],
                max_parallel=1,
                max_retries=0,
                n_started=1,
                n_running=1,
                n_complete=0,
                n_pruned=0,
                n_failed=0,
                created_at=NOW,
                updated_at=NOW,
            )
        )
    alice_s = conn.execute(sa.text("SELECT id FROM tf_studies WHERE owner = 'alice' AND name = 's'")).scalar_one()
    conn.execute(
        sa.text(
            "INSERT INTO tf_trials (study_id, number, state, params, attempts, created_at) "
            "VALUES (:s, 0, :state, '{}', 1, :now)"
        ),
        {"s": alice_s, "state": TrialState.RUNNING.value, "now": NOW},
    )
    trial_id = conn.execute(sa.text("SELECT id FROM tf_trials")).scalar_one()
    conn.execute(
        sa.text(
            "INSERT INTO tf_leases (id, trial_id, study_id, attempt, worker_id, state, granted_at, expires_at) "
            "VALUES ('00000000-0000-4000-8000-000000000000', :t, :s, 1, 'host:1', :state, :now, :now)"
        ),
        {"t": trial_id, "s": alice_s, "state": LeaseState.ACTIVE.value, "now": NOW},
    )


def test_upgrade_from_0001_keeps_ownership(db_url: str, tmp_path: Path) -> None:
    settings = Settings(database_url=db_url, home=tmp_path)
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0001")
            _seed_0001(conn)
        upgrade(settings)

        with engine.connect() as conn:
            users = dict(conn.execute(sa.text("SELECT name, id FROM tf_users")).all())
            assert set(users) == {"admin", "alice", "ops", "ghost"}
            by_study = conn.execute(
                sa.text("SELECT s.name, u.name FROM tf_studies s JOIN tf_users u ON u.id = s.owner_id")
            ).all()
            assert sorted(by_study) == sorted((name, owner) for owner, name in STUDIES)
            lease_token = conn.execute(sa.text("SELECT token_id FROM tf_leases")).scalar_one()
            assert lease_token is None  # an old lease stays open to any worker token
            if conn.dialect.name == "sqlite":  # the table rebuilds left no dangling reference
                assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
            columns = {c["name"] for c in sa.inspect(conn).get_columns("tf_tokens")}
            assert "owner" not in columns and "user_id" in columns

        db = Database(settings)
        try:
            alice = auth.lookup(db, "tf_alice-secret")
            laptop = auth.lookup(db, "tf_alice-laptop")
            admin = auth.lookup(db, "tf_admin-secret")
            worker = auth.lookup(db, "tf_worker-secret")
            assert alice is not None and laptop is not None and admin is not None and worker is not None
            assert alice.user_id == laptop.user_id == users["alice"] and alice.owner == "alice"
            assert (admin.user_id, admin.role) == (users["admin"], Role.ADMIN)
            assert worker.user_id == users["ops"]
            seen = studies.list_studies(db, laptop)
            assert seen.count == 2 and {(s.owner, s.name) for s in seen.data} == {("alice", "s"), ("alice", "t")}
            assert studies.list_studies(db, admin).count == len(STUDIES)
            # The names are taken now: nobody can mint a token that lands on them.
            for name in ("admin", "alice", "ghost"):
                with pytest.raises(Conflict):
                    auth.create_token(db, name, Role.USER)
        finally:
            db.dispose()

        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0001")
        with engine.connect() as conn:
            back = conn.execute(sa.text("SELECT owner, name FROM tf_studies")).all()
            assert sorted(back) == sorted(STUDIES)
            owners = conn.execute(sa.text("SELECT name, owner FROM tf_tokens")).all()
            assert sorted(owners) == sorted((name, owner) for name, owner, _ in TOKENS.values())
            assert "tf_users" not in sa.inspect(conn).get_table_names()
    finally:
        engine.dispose()
