"""`tuneforge study ...`: talk to a running server through the HTTP client."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from service.cli.common import (
    DEFAULT_SERVER_URL,
    ServerOpt,
    TokenOpt,
    _one_line,
    as_text,
    fail,
    handle_errors,
    make_client,
)
from service.spec import load_spec_file, validation_messages

study_app = typer.Typer(help="Submit and watch studies (talks to a running server).", no_args_is_help=True)
console = Console()

STATES = ("waiting", "running", "complete", "pruned", "failed")


def _non_finite(value: Any, path: str = "") -> str | None:
    """The dotted path of the first NaN or infinity in a JSON-like value (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "spec"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


@study_app.command("submit")
@handle_errors
def submit(
    file: Annotated[Path, typer.Argument(help="Study spec, YAML or JSON.")],
    wait: Annotated[
        float, typer.Option(min=0, help="Seconds to wait for a server that is still starting.")
    ] = 0,
    server: ServerOpt = DEFAULT_SERVER_URL,
    token: TokenOpt = None,
) -> None:
    """Check a spec locally, then submit it."""
    try:
        spec = load_spec_file(file)
    except ValidationError as exc:
        fail(_one_line(list(validation_messages(exc))))
    payload = spec.model_dump(mode="json", exclude_unset=True)
    if (where := _non_finite(payload)) is not None:
        fail(f"{where}: NaN and infinity are not valid here; use a finite number")
    with make_client(server, token) as client:
        if wait:
            client.wait_ready(wait)
        study = client.create_study(payload)
    warm = f", {study['warm_started']} warm-start trials queued" if study.get("warm_started") else ""
    typer.echo(f"submitted study {study['id']} {study['name']!r}{warm}")
    typer.echo(f"watch it: tuneforge study show {study['id']}")


@study_app.command("list")
@handle_errors
def list_(
    status: Annotated[str | None, typer.Option(help="running, completed, cancelled or failed.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200)] = 50,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    server: ServerOpt = DEFAULT_SERVER_URL,
    token: TokenOpt = None,
) -> None:
    """Your studies, newest first."""
    with make_client(server, token) as client:
        page = client.list_studies(status=status, limit=limit, offset=offset)
    table = Table("id", "status", "trials", "running", "best", "owner")
    table.add_column("name", no_wrap=True)  # last, so a narrow terminal cuts the name, not the numbers
    for s in page["data"]:
        done = s["n_complete"] + s["n_pruned"] + s["n_failed"]
        table.add_row(
            str(s["id"]),
            s["status"],
            f"{done}/{s['n_trials'] if s['n_trials'] is not None else '-'}",
            str(s["n_running"]),
            as_text(s["best_value"]),
            s["owner"],
            s["name"],
        )
    console.print(table)
    shown = len(page["data"])
    if page["count"] > offset + shown:
        console.print(f"{shown} of {page['count']}; next page: --offset {offset + shown}")


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={as_text(v)}" for k, v in params.items()) or "-"


@study_app.command("show")
@handle_errors
def show(
    study_id: Annotated[int, typer.Argument(help="Study id (see `tuneforge study list`).")],
    server: ServerOpt = DEFAULT_SERVER_URL,
    token: TokenOpt = None,
) -> None:
    """Status, trial counts per state and the best trial (or the Pareto front)."""
    with make_client(server, token) as client:
        study = client.get_study(study_id)
        best = client.best(study_id)
    objectives = ", ".join(f"{o} ({d})" for o, d in zip(study["objectives"], study["directions"], strict=False))
    console.print(f"[bold]study {study['id']} {study['name']}[/bold]  {study['status']}  owner {study['owner']}")
    if study.get("status_reason"):
        console.print(f"[red]{study['status']}:[/red] {escape(study['status_reason'])}")
    console.print(f"objectives: {objectives}   budget: {as_text(study['n_trials'])} trials")
    counts = Table(*STATES, title="trials")
    counts.add_row(*(str(study["counts"].get(s, 0)) for s in STATES))
    console.print(counts)
    if not best["trials"]:
        console.print("no complete trial yet")
        return
    title = "best trial" if len(best["trials"]) == 1 else "Pareto front"
    table = Table("trial", *best["objectives"], "duration (s)", "params", title=title)
    for t in best["trials"]:
        values = t.get("values") or [t.get("value")]
        cells = [as_text(v) for v in values]
        table.add_row(str(t["number"]), *cells, as_text(t.get("duration_s")), _params_text(t["params"]))
    console.print(table)


@study_app.command("cancel")
@handle_errors
def cancel(
    study_id: Annotated[int, typer.Argument()],
    server: ServerOpt = DEFAULT_SERVER_URL,
    token: TokenOpt = None,
) -> None:
    """Stop a running study; running trials stop at their next heartbeat."""
    with make_client(server, token) as client:
        study = client.cancel_study(study_id)
    typer.echo(f"study {study['id']} {study['name']!r} is {study['status']}")


@study_app.command("delete")
@handle_errors
def delete(
    study_id: Annotated[int, typer.Argument()],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    server: ServerOpt = DEFAULT_SERVER_URL,
    token: TokenOpt = None,
) -> None:
    """Delete a study with its trials and its Optuna study."""
    if not yes and not typer.confirm(f"delete study {study_id} and all its trials?"):
        raise typer.Exit(1)
    with make_client(server, token) as client:
        client.delete_study(study_id)
    typer.echo(f"deleted study {study_id}")
