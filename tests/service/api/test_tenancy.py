"""Tenancy by user id: a token named like someone else gets no access to their studies,
and a new token joins an existing user only when that user is named explicitly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from api_test_helpers import API, create, params
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service import auth
from service.cli.main import app as cli_app
from service.context import ServiceContext
from service.errors import Conflict, Invalid, NotFound
from service.models import Role
from service.settings import Settings

Spec = Callable[..., dict[str, Any]]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_token_named_admin_cannot_see_or_cancel_the_local_admins_study(
    client: TestClient, ctx: ServiceContext, settings: Settings, minilm_spec_data: Spec
) -> None:
    path = auth.ensure_local_admin(ctx.db, settings)
    assert path is not None
    admin = bearer(path.read_text().strip())
    study = create(client, admin, minilm_spec_data(name="private"))
    assert study["owner"] == auth.LOCAL_ADMIN_OWNER

    # The attack as it was: `token create --name admin --role user` (owner defaulting to
    # the name) no longer lands on the admin's user, and naming it as owner neither.
    with pytest.raises(Conflict) as taken:
        auth.create_token(ctx.db, "admin", Role.USER)
    assert taken.value.field == "name" and "--user admin" in taken.value.message
    with pytest.raises(Conflict):
        auth.create_token(ctx.db, "mallory", Role.USER, owner="admin")

    # A token that is *named* admin but belongs to a new user sees nothing of the admin's.
    mallory = bearer(auth.create_token(ctx.db, "admin", Role.USER, owner="mallory"))
    sid = study["id"]
    listed = client.get(API, headers=mallory).json()
    assert listed == {"data": [], "count": 0}
    assert client.get(f"{API}/{sid}", headers=mallory).status_code == 404
    assert client.get(f"{API}/{sid}/best", headers=mallory).status_code == 404
    assert client.get(f"{API}/{sid}/trials", headers=mallory).status_code == 404
    assert client.get(f"{API}/{sid}/trials/0/checkpoint", headers=mallory).status_code == 404
    assert client.post(f"{API}/{sid}/cancel", headers=mallory).status_code == 404
    r = client.post(f"{API}/{sid}/enqueue", json={"configurations": [params(1e-4)]}, headers=mallory)
    assert r.status_code == 404
    assert client.delete(f"{API}/{sid}", headers=mallory).status_code == 404
    r = client.post(API, json=minilm_spec_data(name="copy", warm_start_from={"study": "private"}), headers=mallory)
    assert r.status_code == 404 and r.json()["detail"][0]["field"] == "warm_start_from.study"

    after = client.get(f"{API}/{sid}", headers=admin).json()
    assert after["status"] == "running" and after["owner"] == auth.LOCAL_ADMIN_OWNER
    # Mallory's own study of the same name is a different study.
    mine = create(client, mallory, minilm_spec_data(name="private"))
    assert mine["owner"] == "mallory" and mine["id"] != sid


def test_a_second_token_joins_a_user_only_when_named(ctx: ServiceContext) -> None:
    first = auth.lookup(ctx.db, auth.create_token(ctx.db, "alice", Role.USER))
    assert first is not None and first.user_id is not None
    with pytest.raises(Conflict):
        auth.create_token(ctx.db, "alice", Role.USER)
    laptop = auth.lookup(ctx.db, auth.create_token(ctx.db, "alice-laptop", Role.USER, user="alice"))
    assert laptop is not None and (laptop.user_id, laptop.owner) == (first.user_id, "alice")
    with pytest.raises(NotFound) as missing:
        auth.create_token(ctx.db, "x", Role.USER, user="nobody")
    assert missing.value.field == "user"
    with pytest.raises(Invalid):
        auth.create_token(ctx.db, "x", Role.USER, owner="x", user="alice")
    names = {(t.name, t.owner) for t in auth.list_tokens(ctx.db)}
    assert names == {("alice", "alice"), ("alice-laptop", "alice")}


def test_the_same_user_name_owns_its_studies_through_every_token(
    client: TestClient, ctx: ServiceContext, user_headers: dict[str, str], minilm_spec_data: Spec
) -> None:
    study = create(client, user_headers, minilm_spec_data(name="shared"))
    second = bearer(auth.create_token(ctx.db, "alice-ci", Role.USER, user="alice"))
    assert client.get(f"{API}/{study['id']}", headers=second).status_code == 200
    assert client.post(f"{API}/{study['id']}/cancel", headers=second).status_code == 200


def test_local_admin_is_not_handed_to_a_user_holding_a_non_admin_token(ctx: ServiceContext, settings: Settings) -> None:
    # A user "admin" made outside local setup (e.g. before migration 0002 merged names).
    auth.create_token(ctx.db, "impostor", Role.USER, owner=auth.LOCAL_ADMIN_OWNER)
    with pytest.raises(Conflict) as refused:
        auth.ensure_local_admin(ctx.db, settings)
    assert "revoke" in refused.value.message
    assert not settings.admin_token_file.exists()


def test_cli_refuses_a_taken_name_and_attaches_only_with_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "TUNEFORGE_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
        "TUNEFORGE_HOME": str(tmp_path / "home"),
        "TUNEFORGE_DATA_ROOTS": str(tmp_path),
        "TUNEFORGE_ENVIRONMENT": "local",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TUNEFORGE_TOKEN", raising=False)
    runner = CliRunner()
    assert runner.invoke(cli_app, ["db", "upgrade"]).exit_code == 0  # writes the local admin (user "admin")

    attack = runner.invoke(cli_app, ["token", "create", "--name", "admin", "--role", "user"])
    assert attack.exit_code == 2
    lines = [line for line in attack.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "'admin' exists already" in lines[0] and "--user admin" in lines[0]

    unknown = runner.invoke(cli_app, ["token", "create", "--name", "x", "--user", "nobody"])
    assert unknown.exit_code == 2 and "no user named 'nobody'" in unknown.stderr

    made = runner.invoke(cli_app, ["token", "create", "--name", "bob", "--role", "user"])
    again = runner.invoke(cli_app, ["token", "create", "--name", "bob-ci", "--role", "user", "--user", "bob"])
    assert made.exit_code == again.exit_code == 0, again.output
    listed = runner.invoke(cli_app, ["token", "list"]).stdout
    assert "bob-ci" in listed and "local-admin" in listed
