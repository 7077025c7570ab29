"""Helpers for the many-workers tests, importable by name (`from lease_e2e_helpers import LiveApi`):
a live uvicorn server that can be stopped and started again on the same port, and
simulated worker agents (threads speaking the lease protocol through TuneForgeClient)."""

from __future__ import annotations

import math
import socket
import threading
import time
from typing import Any

import httpx

from service.context import ServiceContext
from service.settings import Settings
from trainer.client import ClientError, ServerUnavailable, TuneForgeClient
from trainer.knobs import Hyperparams
from trainer.protocol import CompleteRequest, LeaseGrant, LeaseRequest, ReportRequest

REPORTS = 5


class LiveApi:
    """`create_app` under uvicorn in a thread on a fixed free port, with its own
    ServiceContext (so a test reads its `db.retried`); `stop()` then `start()` is a
    restart of the API process on the same database."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self.contexts: list[ServiceContext] = []
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def retried(self) -> int:
        """Deadlocks and lock timeouts retried by every process so far."""
        return sum(c.db.retried for c in self.contexts)

    def start(self) -> None:
        import uvicorn

        from service.api.app import create_app

        ctx = ServiceContext.build(self.settings)
        self.contexts.append(ctx)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self._sock = sock
        config = uvicorn.Config(create_app(self.settings, context=ctx), log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        assert self._thread is not None and self._sock is not None
        self._thread.join(timeout=30)
        self._sock.close()
        self._server = None


def objective(hp: Hyperparams) -> float:
    """A smooth synthetic accuracy with its best near lr=1e-4, 4 layers, dropout 0.1, batch 32."""
    lr_term = 0.1 * (math.log10(hp.learning_rate) + 4) ** 2
    layers = hp.num_layers if hp.num_layers is not None else 6
    depth = hp.unfreeze_depth if isinstance(hp.unfreeze_depth, int) else layers
    return (
        0.95
        - lr_term
        - 0.02 * (layers - 4) ** 2
        - 0.3 * (hp.dropout - 0.1) ** 2
        - 0.01 * abs(hp.batch_size - 32) / 16
        - 0.005 * depth
    )


class SimAgent(threading.Thread):
    """A worker agent with zero-length trials: lease, REPORTS reports, complete; counts
    what the server answered. Stops when `stop` is set."""

    def __init__(self, url: str, token: str, name: str, stop: threading.Event, retries: int = 4) -> None:
        super().__init__(name=name, daemon=True)
        self.url, self.token, self.stop, self.retries = url, token, stop, retries
        self.status: dict[int, int] = {}
        self.completed = self.pruned = self.lost = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

    def _count(self, response: httpx.Response) -> None:
        with self._lock:
            self.status[response.status_code] = self.status.get(response.status_code, 0) + 1

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.status.items() if code >= 500)

    def run(self) -> None:
        try:
            with TuneForgeClient(self.url, token=self.token) as client:
                client.http.event_hooks["response"] = [self._count]
                while not self.stop.is_set():
                    try:
                        grant = client.lease(LeaseRequest(worker_id=self.name, slot="0"), retries=self.retries)
                    except ServerUnavailable:
                        continue  # the server is restarting: ask again
                    if grant is None:
                        self.stop.wait(0.05)
                        continue
                    self._trial(client, grant)
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)

    def _trial(self, client: TuneForgeClient, grant: LeaseGrant) -> None:
        final = objective(grant.config.hparams)
        try:
            for step in range(1, REPORTS + 1):
                acc = final * step / REPORTS
                metrics = {"accuracy": acc, "loss": 1 - acc}
                answer = client.report(grant.lease_id, ReportRequest(step=step, metrics=metrics), retries=self.retries)
                if answer.prune:
                    self.pruned += 1
                    return
            done = CompleteRequest(metrics={"accuracy": final, "loss": 1 - final}, step=REPORTS, duration_s=0.0)
            client.complete(grant.lease_id, done, retries=self.retries)
            self.completed += 1
        except ClientError as exc:
            if exc.status_code != 409:
                raise
            self.lost += 1  # the lease expired while the server was away: the reaper retries it
