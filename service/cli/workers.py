"""`tuneforge worker`, `tuneforge up` and `tuneforge study watch`.

`worker` runs an agent against a server (GPU nodes, containers). `up` is the laptop
path: the server on local SQLite settings plus one local worker in one process tree,
with a live view of the trials. `study watch` follows one study until it ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from service.cli.common import (
    DEFAULT_SERVER_URL,
    EXIT_UNAVAILABLE,
    ServerOpt,
    TokenOpt,
    as_text,
    fail,
    handle_errors,
    make_client,
    quiet_logs,
    settings_or_fail,
)
from trainer.client import HOME_ENV, ClientError, ServerUnavailable, TuneForgeClient

if TYPE_CHECKING:
    from service.settings import Settings
    from trainer.worker.agent import Agent, TrialView

WORKER_TOKEN_ENV = "TUNEFORGE_WORKER_TOKEN"
WORKER_TOKEN_FILE = "worker-token"
EXIT_STUDY_NOT_COMPLETED = 1

console = Console(soft_wrap=True)  # plain lines stay whole in logs and pipes


def _home() -> Path:
    return Path(os.environ.get(HOME_ENV) or ".tuneforge").expanduser()


def _setup_logging(level: int = logging.INFO, *, handler: logging.Handler | None = None) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[handler] if handler is not None else None,
        force=True,
    )
    # httpx logs every request at INFO: heartbeats would drown the trial lines.
    for name in ("httpx", "httpcore", "alembic", "optuna", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------- worker


def worker(
    server: ServerOpt = DEFAULT_SERVER_URL,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar=[WORKER_TOKEN_ENV, "TUNEFORGE_TOKEN"],
            help="Worker token (`tuneforge token create --role worker`).",
            show_default=False,
        ),
    ] = None,
    gpus: Annotated[
        str, typer.Option(help="GPUs to use: 'auto' (all visible), 'none' (CPU), or a list such as 0,1.")
    ] = "auto",
    slots_per_gpu: Annotated[int, typer.Option(min=1, max=64, help="Trials packed on each GPU at once.")] = 1,
    cpu_slots: Annotated[int, typer.Option(min=1, max=64, help="Slots when running on the CPU.")] = 1,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Tokenised-data cache. Default: $TUNEFORGE_HOME/worker/cache.")
    ] = None,
    work_dir: Annotated[
        Path | None, typer.Option(help="Per-trial scratch space. Default: $TUNEFORGE_HOME/worker/work.")
    ] = None,
    burst: Annotated[bool, typer.Option(help="Exit when there is no work left (batch jobs, tests).")] = False,
    linger: Annotated[float, typer.Option(min=0.0, help="With --burst: keep asking this many seconds first.")] = 0.0,
    poll: Annotated[float, typer.Option(min=0.1, help="Seconds between lease requests while idle.")] = 2.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run a worker agent: lease trials from the server and train them in warm slot processes.

    SIGTERM or Ctrl-C once: running trials checkpoint and are handed back (their retries
    resume). Twice: stop at once.
    """
    from trainer.worker.agent import Agent, WorkerOptions, parse_gpus

    if not token:
        fail("--token: a worker token is required (or set TUNEFORGE_WORKER_TOKEN)")
    _setup_logging(logging.DEBUG if verbose else logging.INFO)
    home = _home() / "worker"
    options = WorkerOptions(
        server=server,
        token=token,
        gpus=parse_gpus(gpus),
        slots_per_gpu=slots_per_gpu,
        cpu_slots=cpu_slots,
        cache_dir=cache_dir or home / "cache",
        work_dir=work_dir or home / "work",
        burst=burst,
        linger_s=linger,
        idle_poll_s=poll,
    )
    code = Agent(options).run()
    raise typer.Exit(code)


# ---------------------------------------------------------------------------- study watch


def _study_line(study: dict[str, Any]) -> str:
    best = study.get("best_value")
    objective = (study.get("objectives") or ["value"])[0]
    return (
        f"{study['name']} ({study['status']}): {study['n_complete']} complete, {study['n_pruned']} pruned, "
        f"{study['n_failed']} failed, {study['n_running']} running; best {objective} {as_text(best)}"
        + (f" (trial #{study['best_trial_number']})" if study.get("best_trial_number") is not None else "")
        + (f"\n{study['status']}: {study['status_reason']}" if study.get("status_reason") else "")
    )


def _finished(study: dict[str, Any]) -> int:
    return int(study["n_complete"]) + int(study["n_pruned"]) + int(study["n_failed"])


class StudyProgress:
    """Rich progress bars for studies: trials finished out of the budget, running, best."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.fields[name]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
        )
        self._tasks: dict[int, Any] = {}

    def update(self, study: dict[str, Any]) -> None:
        total = study.get("n_trials")
        detail = (
            f"{study['n_running']} running · {study['n_pruned']} pruned · {study['n_failed']} failed · "
            f"best {as_text(study.get('best_value'))} · {study['status']}"
        )
        task = self._tasks.get(study["id"])
        if task is None:
            task = self._tasks[study["id"]] = self.progress.add_task("", total=total, name=study["name"], detail=detail)
        self.progress.update(task, completed=_finished(study), total=total, detail=detail)


def study_watch(
    study_id: Annotated[int, typer.Argument(help="Study id.")],
    server: ServerOpt = DEFAULT_SERVER_URL,
    token: TokenOpt = None,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between polls.")] = 1.0,
) -> None:
    """Follow a study with progress bars until it ends; exit 0 when it completed."""
    study = _watch(make_client(server, token), study_id, interval)
    if console.is_terminal:
        console.print(_study_line(study))
    raise typer.Exit(0 if study["status"] == "completed" else EXIT_STUDY_NOT_COMPLETED)


@handle_errors
def _watch(client: TuneForgeClient, study_id: int, interval: float) -> dict[str, Any]:
    view = StudyProgress()
    study = client.get_study(study_id)
    # Progress bars on a terminal; one line per change in a log or a pipe.
    live = Live(view.progress, console=console, refresh_per_second=4) if console.is_terminal else None
    last = ""
    with live or contextlib.nullcontext():
        while True:
            view.update(study)
            if live is None and _study_line(study) != last:
                last = _study_line(study)
                console.print(last)
            if study["status"] != "running":
                return study
            time.sleep(interval)
            try:
                study = client.get_study(study_id)
            except ServerUnavailable as exc:
                # The watch outlives a server restart; the bar just stops moving meanwhile.
                console.print(f"[yellow]server unreachable ({exc}); still watching")


# ---------------------------------------------------------------------------- up


@dataclass
class _Local:
    settings: Settings
    admin_token: str
    worker_token: str


def _local_tokens(settings: Settings) -> _Local:
    """Upgrade the database, then the local admin token (the foundation's file) and a worker token."""
    from service import auth
    from service.db import Database
    from service.migrate import local_setup
    from service.models import Role

    local_setup(settings)
    admin = settings.admin_token_file.read_text(encoding="utf-8").strip()
    path = settings.home / WORKER_TOKEN_FILE
    db = Database(settings)
    try:
        existing = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
        principal = auth.lookup(db, existing) if existing else None
        if principal is None or principal.role != Role.WORKER:
            auth.ensure_user(db, "local")  # a second local worker token joins the first one's user
            existing = auth.create_token(db, "local-worker", Role.WORKER, user="local")
            auth.write_secret(path, existing)
    finally:
        db.dispose()
    return _Local(settings=settings, admin_token=admin, worker_token=existing)


class _Server:
    """The API under uvicorn in a thread of this process (uvicorn leaves signals to the
    main thread then, where the agent handles them)."""

    def __init__(self, settings: Settings, host: str, port: int) -> None:
        import uvicorn

        from service.api.app import create_app

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            fail(f"--port: cannot listen on {host}:{port}: {exc.strerror} (is another server running? try --port)")
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{self.port}"
        config = uvicorn.Config(create_app(settings), log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                fail("the server did not start; see the log above", EXIT_UNAVAILABLE)
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


def _submit(client: TuneForgeClient, spec_file: Path) -> dict[str, Any]:
    from service.spec import load_spec_file

    spec = load_spec_file(spec_file)  # parse errors name the field before anything starts
    created: dict[str, Any] = client.create_study(spec.model_dump(mode="json", exclude_unset=True))
    return created


class _LiveView:
    """What `up` shows: study progress bars, the running trials, the best so far."""

    def __init__(self, client: TuneForgeClient, agent: Agent, study_id: int | None) -> None:
        self.client = client
        self.agent = agent
        self.study_id = study_id
        self.studies = StudyProgress()
        self.best: list[str] = []

    def poll(self) -> list[dict[str, Any]]:
        if self.study_id is not None:
            studies = [self.client.get_study(self.study_id)]
        else:
            studies = self.client.list_studies(status="running", limit=10)["data"]
        for study in studies:
            self.studies.update(study)
        self.best = [_study_line(s) for s in studies]
        return studies

    def render(self) -> Group:
        table = Table(title="running trials", expand=False, title_justify="left")
        for col in ("slot", "study", "trial", "attempt", "step", "latest metrics", "elapsed"):
            table.add_column(col)
        views: list[TrialView] = self.agent.views()
        for v in views:
            step = f"{v.step}/{v.total_steps}" if v.total_steps else str(v.step)
            metrics = " ".join(f"{k}={val:.4g}" for k, val in sorted(v.metrics.items()) if k != "train_loss")
            table.add_row(
                v.slot, v.study_name, f"#{v.trial_number}", str(v.attempt), step, metrics or "-", f"{v.elapsed_s:.0f}s"
            )
        if not views:
            table.add_row("-", "waiting for work", "", "", "", "", "")
        return Group(self.studies.progress, table, Text("\n".join(self.best), style="bold green"))


def up(
    spec: Annotated[
        Path | None, typer.Option("--spec", exists=True, dir_okay=False, help="Submit this study spec at start.")
    ] = None,
    exit_when_done: Annotated[
        bool, typer.Option(help="With --spec: exit once that study has ended (0 if it completed).")
    ] = False,
    host: Annotated[str, typer.Option(help="Address the API listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port of the API (0: any free port).")] = 8000,
    gpus: Annotated[str, typer.Option(help="'auto', 'none' or a list such as 0,1.")] = "auto",
    slots: Annotated[int, typer.Option(min=1, max=64, help="Worker slots (per GPU, or on the CPU).")] = 1,
    live: Annotated[bool, typer.Option(help="Live view of the trials (off when not on a terminal).")] = True,
) -> None:
    """Run the server on local settings (SQLite) and one local worker, in one command."""
    from trainer.worker.agent import Agent, WorkerOptions, parse_gpus

    if exit_when_done and spec is None:
        fail("--exit-when-done: needs --spec (the study to wait for)")
    quiet_logs()
    settings = settings_or_fail()
    if settings.environment != "local":
        fail("TUNEFORGE_ENVIRONMENT: `tuneforge up` is the local set-up; run `tuneforge serve` and workers instead")
    use_live = live and console.is_terminal
    if use_live:
        from rich.logging import RichHandler

        _setup_logging(logging.WARNING, handler=RichHandler(console=console, show_path=False))
    else:
        _setup_logging(logging.INFO)
    local = _handled(lambda: _local_tokens(settings))
    server = _Server(settings, host, port)
    server.start()
    console.print(f"TuneForge API on {server.url} (docs {server.url}/docs); database {settings.database_url}")
    gpu_list = parse_gpus(gpus)
    options = WorkerOptions(
        server=server.url,
        token=local.worker_token,
        gpus=gpu_list,
        slots_per_gpu=slots,
        cpu_slots=slots,
        cache_dir=settings.home / "worker" / "cache",
        work_dir=settings.home / "worker" / "work",
        idle_poll_s=1.0,
        slot_log_level=logging.WARNING if use_live else logging.INFO,
    )
    agent = Agent(options)
    client = TuneForgeClient(server.url, token=local.admin_token)
    study_id: int | None = None
    code = 0
    try:
        if spec is not None:
            created = _handled(lambda: _submit(client, spec))
            study_id = int(created["id"])
            console.print(f"submitted study {created['name']!r} (id {study_id}); `tuneforge study watch {study_id}`")
        view = _LiveView(client, agent, study_id)
        done = threading.Event()
        final: dict[str, Any] = {}
        watcher = threading.Thread(
            target=_follow, args=(view, agent, done, final, exit_when_done), name="up-watch", daemon=True
        )
        watcher.start()
        if use_live:
            with Live(get_renderable=view.render, console=console, refresh_per_second=2, transient=False):
                code = agent.run()
        else:
            code = agent.run()
        done.set()
        watcher.join(timeout=5)
        if study_id is not None:
            study = final.get("study") or client.get_study(study_id)
            _print_result(client, study, server.url)
            if exit_when_done and study["status"] != "completed":
                code = EXIT_STUDY_NOT_COMPLETED
    finally:
        client.close()
        server.stop()
    raise typer.Exit(code)


def _handled(fn: Callable[[], Any]) -> Any:
    return handle_errors(fn)()


def _follow(view: _LiveView, agent: Agent, done: threading.Event, final: dict[str, Any], exit_when_done: bool) -> None:
    """Refresh the study figures; with --exit-when-done, shut the worker down once the study ended."""
    last_line = ""
    while not done.is_set():
        try:
            studies = view.poll()
        except (ServerUnavailable, ClientError) as exc:
            logging.getLogger("tuneforge.up").warning("cannot read the study: %s", exc)
            studies = []
        if not console.is_terminal and view.best and view.best[0] != last_line:
            last_line = view.best[0]
            logging.getLogger("tuneforge.up").info("%s", last_line)
        if exit_when_done and studies and studies[0]["status"] != "running":
            final["study"] = studies[0]
            agent.shutdown()
            return
        done.wait(1.0)


def _print_result(client: TuneForgeClient, study: dict[str, Any], url: str) -> None:
    console.print(_study_line(study))
    number = study.get("best_trial_number")
    if number is not None:
        trial = client.get_trial(study["id"], number)
        params = ", ".join(f"{k}={as_text(v)}" for k, v in sorted(trial["params"].items()))
        metrics = ", ".join(f"{k}={as_text(v)}" for k, v in sorted((trial.get("metrics") or {}).items()))
        console.print(f"best trial #{number}: {params}")
        console.print(f"  metrics: {metrics}")
    console.print(f"study {study['id']}: {url}/api/v1/studies/{study['id']}  (API docs: {url}/docs)")


def register(app: typer.Typer, study_app: typer.Typer) -> None:
    """Mount these commands on the `tuneforge` app and its `study` group."""
    app.command("worker")(worker)
    app.command("up")(up)
    study_app.command("watch")(study_watch)
