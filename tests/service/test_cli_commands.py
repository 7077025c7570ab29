"""The `tuneforge` CLI against a real uvicorn server (in a thread, on a free port), and
`tuneforge serve` itself as a subprocess."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from service import auth
from service.cli.main import app
from service.context import ServiceContext
from service.models import Role
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "minilm-tweets.yaml"
runner = CliRunner()


def run(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), env=env)


def one_error_line(result) -> str:  # type: ignore[no-untyped-def]
    """The whole stderr: exactly one line, `error: ...`, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def server(live_server: str, ctx: ServiceContext, monkeypatch: pytest.MonkeyPatch) -> str:
    """A running server, with the CLI pointed at it as user alice."""
    monkeypatch.setenv("TUNEFORGE_SERVER", live_server)
    monkeypatch.setenv("TUNEFORGE_TOKEN", auth.create_token(ctx.db, "alice", Role.USER))
    return live_server


def test_submit_list_show_cancel(server: str) -> None:
    result = run("study", "submit", str(EXAMPLE))
    assert result.exit_code == 0, result.output
    assert "submitted study 1 'minilm-tweets'" in result.stdout

    listed = run("study", "list")
    assert listed.exit_code == 0, listed.output
    assert "minilm-tweets" in listed.stdout and "running" in listed.stdout

    shown = run("study", "show", "1")
    assert shown.exit_code == 0, shown.output
    for word in ("minilm-tweets", "f1_macro", "waiting", "complete", "no complete trial yet"):
        assert word in shown.stdout

    cancelled = run("study", "cancel", "1")
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.stdout
    again = run("study", "cancel", "1")
    assert again.exit_code == 2
    assert "only a running study can be cancelled" in one_error_line(again)

    assert run("study", "list", "--status", "cancelled").stdout.count("minilm-tweets") == 1


def test_a_failed_study_shows_why_and_watch_exits_nonzero(server: str, ctx: ServiceContext) -> None:
    from service.scheduler import get_scheduler
    from service.scheduler.quarantine import fail_study

    assert run("study", "submit", str(EXAMPLE)).exit_code == 0
    fail_study(get_scheduler(ctx), 1, "asking a trial", ValueError("the stored space broke"))

    shown = run("study", "show", "1")
    assert shown.exit_code == 0, shown.output
    assert "failed: asking a trial: ValueError: the stored space broke" in shown.stdout
    assert run("study", "list", "--status", "failed").stdout.count("minilm-tweets") == 1
    watched = run("study", "watch", "1")
    assert watched.exit_code == 1
    assert "the stored space broke" in watched.stdout


def test_bad_spec_is_one_line_and_exit_2(server: str, tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(EXAMPLE.read_text().replace("low: 1.0e-5", "low: 0"))
    result = run("study", "submit", str(spec))
    assert result.exit_code == 2
    line = one_error_line(result)
    assert line.startswith("error: search_space.learning_rate.low: ")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("name: [unclosed", "not valid YAML"),
        ("- a list\n", "mapping"),
        ("EXAMPLE + colour: blue\n", "colour: unknown field"),
    ],
    ids=["yaml", "not-a-mapping", "unknown-field"],
)
def test_unreadable_specs_are_one_line_and_exit_2(server: str, tmp_path: Path, text: str, words: str) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(text.replace("EXAMPLE + ", EXAMPLE.read_text()))
    result = run("study", "submit", str(spec))
    assert result.exit_code == 2
    assert words in one_error_line(result)


def test_missing_spec_file(server: str, tmp_path: Path) -> None:
    result = run("study", "submit", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2
    assert "cannot read" in one_error_line(result)


def test_server_side_rejection_is_one_line(server: str, tmp_path: Path, settings: Settings) -> None:
    """Passes the local schema check, fails the server's (a path outside the data roots)."""
    spec = tmp_path / "outside.yaml"
    spec.write_text(
        EXAMPLE.read_text().replace("kind: named\n  name: tweets-sentiment", "kind: files\n  train: /etc/passwd")
    )
    result = run("study", "submit", str(spec))
    assert result.exit_code == 2
    assert one_error_line(result).startswith("error: dataset.train: ")


def test_wrong_token_says_what_to_do(server: str) -> None:
    result = run("study", "list", "--token", "tf_wrong")
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "authorization" in line and "--token" in line


def test_unknown_study_is_one_line(server: str) -> None:
    result = run("study", "show", "42")
    assert result.exit_code == 2
    assert one_error_line(result) == "error: study_id: study 42 not found"


def test_unreachable_server_says_to_start_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEFORGE_TOKEN", "tf_whatever")
    result = run("study", "list", "--server", "http://127.0.0.1:1")
    assert result.exit_code == 1
    assert "tuneforge serve" in one_error_line(result)


def test_the_local_admin_token_file_is_used_without_any_token(
    server: str, ctx: ServiceContext, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth.ensure_local_admin(ctx.db, settings)
    monkeypatch.delenv("TUNEFORGE_TOKEN")
    monkeypatch.setenv("TUNEFORGE_HOME", str(settings.home))
    result = run("study", "list")
    assert result.exit_code == 0, result.output


@pytest.fixture
def local_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {
        "TUNEFORGE_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
        "TUNEFORGE_HOME": str(tmp_path / "home"),
        "TUNEFORGE_DATA_ROOTS": str(tmp_path),
        "TUNEFORGE_ENVIRONMENT": "local",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TUNEFORGE_TOKEN", raising=False)
    return env


def test_db_upgrade_and_token_create(local_env: dict[str, str]) -> None:
    first = run("db", "upgrade")
    assert first.exit_code == 0, first.output
    token_file = Path(local_env["TUNEFORGE_HOME"]) / "admin-token"
    assert "wrote an admin token" in first.stdout
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    second = run("db", "upgrade")
    assert second.exit_code == 0 and "wrote" not in second.stdout

    made = run("token", "create", "--name", "gpu-node-1", "--role", "worker")
    assert made.exit_code == 0, made.output
    assert made.stdout.strip().startswith("tf_") and "cannot be shown again" in made.stderr
    listed = run("token", "list")
    assert "gpu-node-1" in listed.stdout and made.stdout.strip() not in listed.stdout

    bad = run("token", "create", "--name", "x", "--role", "root")
    assert bad.exit_code == 2
    assert one_error_line(bad).startswith("error: role: unknown role 'root'")


def test_bad_database_url_is_one_line(local_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEFORGE_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:1/none")
    result = run("db", "upgrade")
    assert result.exit_code == 1
    assert "TUNEFORGE_DATABASE_URL" in one_error_line(result)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_sets_up_a_fresh_machine_and_accepts_a_study(local_env: dict[str, str], tmp_path: Path) -> None:
    """What the README does: `tuneforge serve` on an empty SQLite file, then submit the example
    with no token anywhere (the CLI finds the admin token `serve` wrote)."""
    port = _free_port()
    env = {**os.environ, **local_env, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli.main", "serve", "--port", str(port), "--log-level", "warning"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        result = run("study", "submit", str(EXAMPLE), "--server", url)
        assert result.exit_code == 0, result.output
        assert "submitted study 1" in result.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_nan_in_a_spec_file_is_one_line(server: str, tmp_path: Path) -> None:
    spec = tmp_path / "nan.yaml"
    spec.write_text(EXAMPLE.read_text().replace("low: 1.0e-5", "low: .nan"))
    result = run("study", "submit", str(spec))
    assert result.exit_code == 2
    assert one_error_line(result).startswith("error: search_space.learning_rate.low: ")
