"""What every command shares: the one-line error convention, server/token options, the client.

Errors never show a traceback: bad input prints `error: <field>: <reason>` on stderr
and exits 2; a server that cannot be reached prints what to do and exits 1.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer
from pydantic import ValidationError

from service.errors import DomainError, Invalid, Unavailable
from service.settings import Settings
from trainer.client import DEFAULT_SERVER, SERVER_ENV, TOKEN_ENV, ClientError, ServerUnavailable, TuneForgeClient

P = ParamSpec("P")
R = TypeVar("R")

EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 1

ServerOpt = Annotated[
    str, typer.Option("--server", envvar=SERVER_ENV, help="TuneForge server URL.", show_default=True)
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar=TOKEN_ENV,
        help="API token. Default: $TUNEFORGE_TOKEN, then the local admin token file.",
        show_default=False,
    ),
]
DEFAULT_SERVER_URL = DEFAULT_SERVER


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    # typer.echo, not Rich: Rich would wrap a long message over several lines.
    # One line even when a driver's message spans several.
    typer.echo("error: " + " ".join(message.split()), err=True)
    raise typer.Exit(code)


def _one_line(items: list[tuple[str | None, str]]) -> str:
    field, reason = items[0]
    text = f"{field}: {reason}" if field else reason
    if len(items) > 1:
        others = ", ".join(str(f) for f, _ in items[1:4] if f)
        text += f" (and {len(items) - 1} more problem{'s' if len(items) > 2 else ''}{': ' + others if others else ''})"
    return " ".join(text.split())


def settings_or_fail() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = "TUNEFORGE_" + "_".join(str(p) for p in err["loc"]).upper()
        fail(f"{field}: {err['msg']}")


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the errors a command can meet into one line on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            hint = ""
            if exc.status_code == 401:
                hint = " (pass --token, set TUNEFORGE_TOKEN, or run `tuneforge db upgrade` locally for an admin token)"
            fail(_one_line(exc.items) + hint)
        except ServerUnavailable as exc:
            fail(f"{exc}. Start it with `tuneforge serve`, or point --server at it", EXIT_UNAVAILABLE)
        except Unavailable as exc:
            fail(f"{exc.message}. Check TUNEFORGE_DATABASE_URL and that the database is running", EXIT_UNAVAILABLE)
        except Invalid as exc:
            fail(_one_line(list(exc.items)))
        except DomainError as exc:
            fail(f"{exc.field}: {exc.message}" if exc.field else exc.message)

    return wrapper


def make_client(server: str, token: str | None) -> TuneForgeClient:
    return TuneForgeClient(server, token)


def quiet_logs() -> None:
    # Alembic and Optuna log at INFO; a CLI prints only what the user asked for.
    for name in ("alembic", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)


def as_text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
