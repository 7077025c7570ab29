"""`tuneforge`: the command line, assembled from sub-apps.

    tuneforge serve                 start the API (a local start upgrades the database first)
    tuneforge db upgrade            bring the database to the current schema
    tuneforge token create ...      make an API token
    tuneforge study submit FILE     check and submit a study spec; also list/show/cancel/delete
    tuneforge train / pretrain      the trainer's own commands (trainer/cli.py)
    tuneforge worker / up           a worker agent; the server plus a local worker (workers.py)
    tuneforge study watch ID        follow a study until it ends (workers.py)

To add a command group, write a Typer app in this package and `app.add_typer` it below.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated

import typer

from service.cli.admin import db_app, token_app
from service.cli.common import handle_errors, quiet_logs, settings_or_fail
from service.cli.studies import study_app
from service.cli.workers import register as register_worker_commands

app = typer.Typer(
    name="tuneforge",
    help="TuneForge: hyperparameter tuning for fine-tuning pretrained PyTorch models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(db_app, name="db")
app.add_typer(token_app, name="token")
app.add_typer(study_app, name="study")
register_worker_commands(app, study_app)


@app.command()
@handle_errors
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Run the API server. A local start (TUNEFORGE_ENVIRONMENT=local or SQLite) upgrades the
    database and writes an admin token for the CLI first."""
    import uvicorn

    from service.api.app import create_app
    from service.migrate import local_setup

    quiet_logs()
    settings = settings_or_fail()
    if settings.environment == "local" or settings.is_sqlite:
        written = local_setup(settings)
        if written is not None:
            typer.echo(f"wrote an admin token to {written} (the CLI uses it automatically)")
    typer.echo(f"TuneForge on http://{host}:{port}  (API docs: http://{host}:{port}/docs)")
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)


def _mount_trainer_commands() -> None:
    # The trainer's `train` / `pretrain` (and later `worker`) live in trainer/cli.py; mount
    # its commands at the top level when that module exists. Its import errors are real
    # errors, so it is looked up first rather than imported inside a try.
    if importlib.util.find_spec("trainer.cli") is None:
        return
    from trainer.cli import app as trainer_app

    app.registered_commands.extend(trainer_app.registered_commands)
    app.registered_groups.extend(trainer_app.registered_groups)


_mount_trainer_commands()


if __name__ == "__main__":
    app()
