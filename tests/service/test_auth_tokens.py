"""Tokens: only hashes stored, roles enforced, revocation, the local admin token file."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service import auth
from service.api.app import create_app
from service.context import ServiceContext
from service.errors import Forbidden, Invalid, Unauthorized
from service.models import Role
from service.settings import Settings


def test_only_the_hash_is_stored(ctx: ServiceContext) -> None:
    token = auth.create_token(ctx.db, "alice", Role.USER)
    assert token.startswith("tf_") and len(token) > 40
    with ctx.db.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM tf_tokens")).mappings().all()
    assert len(rows) == 1
    assert rows[0]["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert all(token not in str(value) for value in rows[0].values())
    principal = auth.lookup(ctx.db, token)
    assert principal is not None and (principal.owner, principal.role) == ("alice", Role.USER)


def test_tokens_are_unique(ctx: ServiceContext) -> None:
    assert auth.create_token(ctx.db, "a", "user") != auth.create_token(ctx.db, "a", "user", user="a")


def test_revoked_token_is_refused(ctx: ServiceContext) -> None:
    token = auth.create_token(ctx.db, "bob", Role.USER)
    [info] = auth.list_tokens(ctx.db)
    auth.revoke_token(ctx.db, info.id)
    assert auth.lookup(ctx.db, token) is None
    with pytest.raises(Unauthorized):
        auth.authenticate(ctx.db, token)
    assert auth.list_tokens(ctx.db)[0].revoked


@pytest.mark.parametrize(
    ("name", "role", "field"), [("", "user", "name"), ("x", "root", "role"), ("y" * 101, "user", "name")]
)
def test_bad_token_requests_name_the_field(ctx: ServiceContext, name: str, role: str, field: str) -> None:
    with pytest.raises(Invalid) as err:
        auth.create_token(ctx.db, name, role)
    assert err.value.field == field


def test_require_role() -> None:
    worker = auth.Principal(token_id=1, name="w", owner="ops", role=Role.WORKER)
    assert auth.require_role(worker, Role.WORKER) is worker
    with pytest.raises(Forbidden):
        auth.require_role(worker, Role.ADMIN, Role.USER)


def test_revoked_token_gets_401_from_the_api(client: TestClient, ctx: ServiceContext, user_token: str) -> None:
    headers = {"Authorization": f"Bearer {user_token}"}
    assert client.get("/api/v1/studies", headers=headers).status_code == 200
    auth.revoke_token(ctx.db, auth.list_tokens(ctx.db)[0].id)
    assert client.get("/api/v1/studies", headers=headers).status_code == 401


def test_local_setup_writes_an_admin_token_file_once(ctx: ServiceContext, settings: Settings) -> None:
    path = auth.ensure_local_admin(ctx.db, settings)
    assert path == settings.admin_token_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    principal = auth.lookup(ctx.db, token)
    assert principal is not None and principal.is_admin
    assert auth.ensure_local_admin(ctx.db, settings) is None  # the file works: left alone
    assert path.read_text().strip() == token

    path.write_text("tf_stale\n")  # a file from another database: replaced
    assert auth.ensure_local_admin(ctx.db, settings) == path
    assert auth.lookup(ctx.db, path.read_text().strip()) is not None


def test_production_never_writes_a_token_file(ctx: ServiceContext, settings: Settings) -> None:
    production = settings.model_copy(update={"environment": "production"})
    assert auth.ensure_local_admin(ctx.db, production) is None
    assert not production.admin_token_file.exists()


def test_auth_disabled_acts_as_a_local_admin(settings: Settings, tmp_path: Path) -> None:
    open_settings = settings.model_copy(update={"auth_disabled": True})
    with TestClient(create_app(open_settings, lifespan_hooks=[])) as c:
        assert c.get("/api/v1/studies").status_code == 200


def test_auth_disabled_is_refused_in_production() -> None:
    with pytest.raises(ValueError, match="AUTH_DISABLED"):
        Settings(environment="production", auth_disabled=True)
