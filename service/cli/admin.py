"""Server-side commands that talk to the database directly: `db upgrade`, `token ...`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from service import auth
from service.cli.common import handle_errors, quiet_logs, settings_or_fail
from service.db import Database
from service.migrate import local_setup, upgrade

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens (run on the server host: needs database access).", no_args_is_help=True)


@db_app.command("upgrade")
@handle_errors
def db_upgrade() -> None:
    """Bring the tf_* tables and Optuna's tables to the current version (safe to repeat)."""
    quiet_logs()
    settings = settings_or_fail()
    if settings.environment == "local":
        written = local_setup(settings)
        if written is not None:
            typer.echo(f"wrote an admin token to {written} (the CLI uses it automatically)")
    else:
        upgrade(settings)
    typer.echo("database is up to date")


@token_app.command("create")
@handle_errors
def token_create(
    name: Annotated[str, typer.Option(help="Who or what the token is for, e.g. alice or gpu-node-1.")],
    role: Annotated[str, typer.Option(help="admin, user or worker.")] = "user",
    owner: Annotated[
        str | None, typer.Option(help="Name of the NEW user the token belongs to (must be free). Default: the name.")
    ] = None,
    user: Annotated[
        str | None, typer.Option(help="An EXISTING user who gets another token (their studies stay theirs).")
    ] = None,
) -> None:
    """Create a token and print it once (only its hash is stored).

    Without --user the token gets a new user, and a name that is taken is refused:
    a token never lands on someone else's studies by picking their name.
    """
    quiet_logs()
    settings = settings_or_fail()
    role_value = auth.parse_role(role)
    db = Database(settings)
    try:
        token = auth.create_token(db, name, role_value, owner=owner, user=user)
    finally:
        db.dispose()
    typer.echo(token)
    holder = user or owner or name
    typer.echo(f"{role_value.value} token {name!r} of user {holder!r}: keep it now, it cannot be shown again", err=True)


@token_app.command("list")
@handle_errors
def token_list() -> None:
    """Tokens by id (never their values)."""
    settings = settings_or_fail()
    db = Database(settings)
    try:
        tokens = auth.list_tokens(db)
    finally:
        db.dispose()
    table = Table("id", "name", "user", "user id", "role", "revoked")
    for t in tokens:
        table.add_row(str(t.id), t.name, t.owner, str(t.user_id), t.role.value, "yes" if t.revoked else "")
    Console().print(table)


@token_app.command("revoke")
@handle_errors
def token_revoke(token_id: Annotated[int, typer.Argument(help="Id from `tuneforge token list`.")]) -> None:
    """Revoke a token: requests with it get 401 from now on."""
    settings = settings_or_fail()
    db = Database(settings)
    try:
        auth.revoke_token(db, token_id)
    finally:
        db.dispose()
    typer.echo(f"revoked token {token_id}")


