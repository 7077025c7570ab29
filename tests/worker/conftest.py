"""Fixtures for worker tests: a real uvicorn server that can be stopped and restarted on
the same port, a tiny saved BERT and a tiny CSV inside the data root, study specs, and
agents run in a thread (burst mode) or as a subprocess (for kill -9 and SIGTERM).

Settings use a short lease timeout and a fast reaper so recovery is observable in
seconds; a test needing more (a server outage) parametrises `lease_timeout`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Slot processes inherit this: never reach for a model hub in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from service.settings import Settings  # noqa: E402
from trainer.client import TuneForgeClient  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "trainer"))
from trainer_test_helpers import build_tiny_bert, separable_rows, write_csv  # noqa: E402
from worker_test_helpers import AgentProcess, Server  # noqa: E402

REPO = Path(__file__).parents[2]


@pytest.fixture
def lease_timeout() -> float:
    return 3.0


@pytest.fixture
def settings(upgraded_db_url: str, data_root: Path, tmp_path: Path, lease_timeout: float) -> Settings:
    home = tmp_path / "home"
    return Settings(
        environment="local",
        database_url=upgraded_db_url,
        data_roots=[data_root],
        home=home,
        artifact_dir=home / "artifacts",
        lease_timeout_s=lease_timeout,
        reaper_interval_s=0.5,
    )


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    srv = Server(settings)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def api(server: Server, user_token: str) -> Iterator[TuneForgeClient]:
    """A user's client on the live server."""
    with TuneForgeClient(server.url, token=user_token) as client:
        yield client


@pytest.fixture
def tiny_data(data_root: Path) -> dict[str, str]:
    """A tiny saved BERT and a 120-row separable CSV inside the data root (paths relative to it)."""
    build_tiny_bert(data_root / "tiny-bert")
    write_csv(data_root / "train.csv", separable_rows(120, seed=3))
    return {"model": "tiny-bert", "train": "train.csv"}


@pytest.fixture
def make_spec(tiny_data: dict[str, str]) -> Callable[..., dict[str, Any]]:
    """A study spec on the tiny model; keyword sections are merged over the defaults.

    Default trial: 108 training rows, batch 12 -> 9 steps an epoch; `epochs` in `fixed`
    sets the length. Evaluations (and checkpoints) every 3 steps.
    """

    def make(name: str = "tiny", **sections: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "name": name,
            "model": {"kind": "pretrained", "path": tiny_data["model"]},
            "dataset": {"kind": "files", "train": tiny_data["train"]},
            "run": {"seed": 0, "eval_every_steps": 3},
            "objective": {"metric": "loss"},
            "search_space": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
            "fixed": {"batch_size": 12, "epochs": 1, "max_seq_len": 16},
            "sampler": {"name": "random", "seed": 0},
            "budget": {"n_trials": 2, "max_parallel": 1, "max_retries": 1},
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(spec.get(key), dict):
                spec[key] = {**spec[key], **value}
            else:
                spec[key] = value
        return spec

    return make


@pytest.fixture
def run_agent(server: Server, worker_token: str, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start an in-process agent in a thread: `agent, thread = run_agent(burst=True, ...)`."""
    from trainer.worker.agent import Agent, WorkerOptions

    started: list[tuple[Any, threading.Thread]] = []

    def start(**overrides: Any) -> tuple[Any, threading.Thread]:
        options: dict[str, Any] = {
            "server": server.url,
            "token": worker_token,
            "cache_dir": tmp_path / "worker-cache",
            "work_dir": tmp_path / f"worker-work-{len(started)}",
            "idle_poll_s": 0.3,
            "stop_grace_s": 20.0,
        }
        options.update(overrides)
        agent = Agent(WorkerOptions(**options))
        thread = threading.Thread(target=agent.run, name="test-agent", daemon=True)
        thread.start()
        started.append((agent, thread))
        return agent, thread

    yield start
    for agent, thread in started:
        if thread.is_alive():
            agent.shutdown(cold=True)
            thread.join(timeout=30)


@pytest.fixture
def spawn_agent(server: Server, worker_token: str, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    procs: list[AgentProcess] = []

    def spawn(*extra: str) -> AgentProcess:
        n = len(procs)
        env = {**os.environ, "TUNEFORGE_HOME": str(tmp_path / f"agent-home-{n}"), "PYTHONUNBUFFERED": "1"}
        args = ["--server", server.url, "--token", worker_token, "--gpus", "none", "--poll", "0.3", *extra]
        proc = AgentProcess(args, tmp_path / f"agent-{n}.log", env)
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        proc.close()


logging.getLogger("httpx").setLevel(logging.WARNING)
