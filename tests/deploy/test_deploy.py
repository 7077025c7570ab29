"""The compose file and the Dockerfile, checked without a Docker engine.

No engine runs here, so these tests check what can go wrong without one: the
compose file's shape, the GPU reservation, that every `tuneforge` command it
names parses with the real CLI, that the files the Dockerfile copies exist, and
that the API entrypoint starts with the production environment compose gives it.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
import typer
import yaml

from service.cli.main import app as cli_app

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?]([^}]*))?\}")


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR:?message}, with the variables unset."""
    return _VAR.sub(lambda m: m.group(2) if m.group(0).find(":-") >= 0 else "x", value)


def _command(service: str) -> list[str]:
    cmd = SERVICES[service]["command"]
    args = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    return [_interpolate(str(a)) for a in args]


def _environment(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment", {})
    return {k: _interpolate(str(v)) for k, v in env.items()}


def test_services_and_their_order() -> None:
    assert set(SERVICES) == {"postgres", "migrate", "api", "worker"}
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert SERVICES["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert SERVICES["worker"]["depends_on"]["api"]["condition"] == "service_healthy"
    assert "healthcheck" in SERVICES["postgres"]


def test_workers_reserve_nvidia_gpus() -> None:
    devices = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # Warm shutdown checkpoints running trials; the default 10 s grace would cut it off.
    assert SERVICES["worker"]["stop_grace_period"] in ("2m", "120s")
    assert not any("deploy" in SERVICES[s] for s in ("postgres", "migrate", "api"))


def test_api_and_worker_see_the_data_roots_at_one_path() -> None:
    roots = _environment("api")["TUNEFORGE_DATA_ROOTS"]
    for service in ("api", "worker"):
        mounts = [_interpolate(str(v)).split(":")[1] for v in SERVICES[service]["volumes"]]
        assert roots in mounts, f"{service} does not mount the data roots at {roots}"


def test_workers_hold_no_database_credentials() -> None:
    env = _environment("worker")
    assert not any("DATABASE" in k for k in env)
    assert "TUNEFORGE_WORKER_TOKEN" in env and "--token" not in _command("worker")


@pytest.mark.parametrize("service", ["migrate", "api", "worker"])
def test_named_tuneforge_commands_parse(service: str) -> None:
    args = _command(service)
    assert args[0] == "tuneforge"
    group: click.Command = typer.main.get_command(cli_app)
    rest = args[1:]
    # Walk down the command groups, then let click parse the options for real.
    while isinstance(group, click.Group):
        name, rest = rest[0], rest[1:]
        sub = group.get_command(click.Context(group), name)
        assert sub is not None, f"{service}: no command {name!r} in the tuneforge CLI"
        group = sub
    group.make_context(args[-1], list(rest))


def test_dockerfile_copies_what_exists_and_runs_the_cli() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is missing"
    assert 'CMD ["tuneforge", "serve", "--host", "0.0.0.0", "--port", "8000"]' in text
    assert "torch==${TORCH_VERSION}" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_migrate_then_api_start_with_the_compose_environment(upgraded_db_url: str, tmp_path: Path) -> None:
    """The production environment compose sets: the migration job and the API start and serve."""
    env = {**os.environ, **_environment("api")}
    env.update(
        TUNEFORGE_DATABASE_URL=upgraded_db_url,
        TUNEFORGE_HOME=str(tmp_path / "home"),
        TUNEFORGE_ARTIFACT_DIR=str(tmp_path / "artifacts"),
        TUNEFORGE_DATA_ROOTS=str(tmp_path),
    )
    assert env["TUNEFORGE_ENVIRONMENT"] == "production"
    bin_dir = Path(sys.executable).parent
    migrate = subprocess.run(
        [str(bin_dir / "tuneforge"), *_command("migrate")[1:]], env=env, capture_output=True, text=True, timeout=180
    )
    assert migrate.returncode == 0, migrate.stderr

    port = _free_port()
    api_args = [a if a != "0.0.0.0" else "127.0.0.1" for a in _command("api")[1:]]
    api_args[api_args.index("--port") + 1] = str(port)
    proc = subprocess.Popen([str(bin_dir / "tuneforge"), *api_args], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the API did not start within 120 s"
                time.sleep(0.5)
        assert ready.status_code == 200
        # Production writes no admin token file and refuses anonymous calls.
        assert not (tmp_path / "home" / "admin-token").exists()
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/studies", timeout=5).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)
