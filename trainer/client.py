"""The TuneForge HTTP client: one method per endpoint.

Used by the CLI, the worker agent and users:

    from trainer.client import TuneForgeClient

    with TuneForgeClient("http://127.0.0.1:8000") as tf:   # token: argument, $TUNEFORGE_TOKEN or the local admin file
        study = tf.create_study(spec_dict)
        print(tf.get_study(study["id"])["counts"])

A 4xx answer raises `ClientError` (status code, field and reason, as the server
named them); a connection failure, a timeout or a 5xx raises `ServerUnavailable`,
which a caller may retry. Lives in trainer/ because the worker agent uses it:
no service, FastAPI or SQLAlchemy imports here.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from trainer.protocol import (
    CompleteRequest,
    FailRequest,
    FinishResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    LeaseGrant,
    LeaseRequest,
    ReportRequest,
    ReportResponse,
)

R = TypeVar("R")

DEFAULT_SERVER = "http://127.0.0.1:8000"
TOKEN_ENV = "TUNEFORGE_TOKEN"
SERVER_ENV = "TUNEFORGE_SERVER"
# Where `tuneforge serve` / `tuneforge db upgrade` write the first admin token on a
# local install: $TUNEFORGE_HOME/admin-token, with the same default home as the
# service's settings (.tuneforge in the current folder).
HOME_ENV = "TUNEFORGE_HOME"
DEFAULT_HOME = ".tuneforge"
ADMIN_TOKEN_FILE = "admin-token"
API = "/api/v1"
# Worker protocol: tries after the first for a call that met a connection error or a 5xx,
# and the backoff between them (seconds; full jitter, doubling up to the cap).
WORKER_RETRIES = 4
RETRY_BASE_S = 0.25
RETRY_CAP_S = 8.0
CHECKPOINT_STEP_HEADER = "X-Checkpoint-Step"
CHUNK_BYTES = 1 << 20


class ClientError(Exception):
    """The server refused the request (4xx). `items` holds every (field, reason) it named."""

    def __init__(self, status_code: int, field: str | None, reason: str, items: list[tuple[str | None, str]]) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.status_code = status_code
        self.field = field
        self.reason = reason
        self.items = items


class ServerUnavailable(Exception):
    """The server could not be reached, timed out, or failed (5xx). Safe to retry later."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def admin_token_path(home: str | Path | None = None) -> Path:
    return Path(home or os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser() / ADMIN_TOKEN_FILE


def resolve_token(token: str | None = None, home: str | Path | None = None) -> str | None:
    """The token to send: the argument, else $TUNEFORGE_TOKEN, else the local admin token file."""
    if token:
        return token
    env = os.environ.get(TOKEN_ENV)
    if env:
        return env.strip()
    path = admin_token_path(home)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


def _error_items(response: httpx.Response) -> list[tuple[str | None, str]]:
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):
        items = [
            (item.get("field"), str(item.get("reason") or item.get("msg") or item))
            for item in detail
            if isinstance(item, dict)
        ]
        if items:
            return items
    if isinstance(detail, str):
        return [(None, detail)]
    return [(None, response.text.strip() or response.reason_phrase)]


class TuneForgeClient:
    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        *,
        http: httpx.Client | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get(SERVER_ENV) or DEFAULT_SERVER).rstrip("/")
        self.token = resolve_token(token)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._owns_http = http is None
        self.http = http or httpx.Client(base_url=self.base_url, timeout=timeout)
        self.http.headers.update(headers)

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        if self._owns_http:
            self.http.close()

    def __enter__(self) -> TuneForgeClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        content: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """Send one request; return the decoded JSON body (None for 204)."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self.http.request(
                method, path, json=json, params=query or None, content=content, headers=headers
            )
        except httpx.TransportError as exc:  # connect, read, timeout: the request may not have arrived
            raise ServerUnavailable(f"cannot reach the TuneForge server at {self.base_url}: {exc}") from exc
        self._raise_for_status(response)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def _raise_for_status(self, response: httpx.Response) -> None:
        if response.status_code >= 500:
            items = _error_items(response)
            raise ServerUnavailable(
                f"server error {response.status_code} from {self.base_url}: {items[0][1]}", response.status_code
            )
        if response.status_code >= 400:
            items = _error_items(response)
            field, reason = items[0]
            raise ClientError(response.status_code, field, reason, items)

    # ------------------------------------------------------------------ health

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/healthz")
        return result

    def ready(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/readyz")
        return result

    def wait_ready(self, timeout: float, interval: float = 0.5) -> None:
        """Poll /readyz until the server and its database answer; `ServerUnavailable` after
        `timeout` seconds. For scripts that start a server and use it straight away."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ready()
                return
            except ServerUnavailable:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(interval)

    # ------------------------------------------------------------------ studies

    def create_study(self, spec: dict[str, Any]) -> dict[str, Any]:
        """POST /studies: the created study (with `id`, `optuna_name`, `counts`)."""
        result: dict[str, Any] = self.request("POST", f"{API}/studies", json=spec)
        return result

    def list_studies(self, status: str | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """GET /studies: {"data": [...], "count": total}."""
        result: dict[str, Any] = self.request(
            "GET", f"{API}/studies", params={"status": status, "limit": limit, "offset": offset}
        )
        return result

    def get_study(self, study_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"{API}/studies/{study_id}")
        return result

    def cancel_study(self, study_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"{API}/studies/{study_id}/cancel")
        return result

    def delete_study(self, study_id: int) -> None:
        self.request("DELETE", f"{API}/studies/{study_id}")

    def best(self, study_id: int) -> dict[str, Any]:
        """GET /studies/{id}/best: {"directions", "objectives", "trials": [best] or the Pareto front}."""
        result: dict[str, Any] = self.request("GET", f"{API}/studies/{study_id}/best")
        return result

    def enqueue(self, study_id: int, configurations: list[dict[str, Any]]) -> dict[str, Any]:
        """POST /studies/{id}/enqueue: {"study_id", "trial_numbers"}."""
        result: dict[str, Any] = self.request(
            "POST", f"{API}/studies/{study_id}/enqueue", json={"configurations": configurations}
        )
        return result

    # ------------------------------------------------------------------ trials

    def list_trials(
        self,
        study_id: int,
        state: str | None = None,
        sort: str = "number",
        order: str = "asc",
        limit: int = 50,
        offset: int = 0,
    ) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "GET",
            f"{API}/studies/{study_id}/trials",
            params={"state": state, "sort": sort, "order": order, "limit": limit, "offset": offset},
        )
        return result

    def get_trial(self, study_id: int, number: int) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"{API}/studies/{study_id}/trials/{number}")
        return result

    # ------------------------------------------------------------------ worker protocol (leases)
    # The worker agent's calls. Connection errors, timeouts and 5xx are retried here with
    # exponential backoff and full jitter, so agents that lost the server together do not
    # return together; a 4xx is an answer and is never retried (409: the lease expired or
    # is not ours). After `retries` more tries the ServerUnavailable propagates, and the
    # agent decides what is worth waiting longer for (a finished trial's result is).

    def _retrying(self, call: Callable[[], R], retries: int | None) -> R:
        tries = (WORKER_RETRIES if retries is None else retries) + 1
        for attempt in range(tries):
            try:
                return call()
            except ServerUnavailable:
                if attempt + 1 >= tries:
                    raise
                time.sleep(random.uniform(0, min(RETRY_CAP_S, RETRY_BASE_S * 2**attempt)))
        raise AssertionError("unreachable")

    def _post_message(self, path: str, message: BaseModel, retries: int | None) -> Any:
        payload = message.model_dump(mode="json")
        return self._retrying(lambda: self.request("POST", f"{API}{path}", json=payload), retries)

    def lease(self, request: LeaseRequest, *, retries: int | None = None) -> LeaseGrant | None:
        """POST /leases: a trial to run, or None when there is no work (204)."""
        body = self._post_message("/leases", request, retries)
        return None if body is None else LeaseGrant.model_validate(body)

    def heartbeat(self, lease_id: str, request: HeartbeatRequest, *, retries: int | None = None) -> HeartbeatResponse:
        """POST /leases/{id}/heartbeat: extends the lease; `stop` says the trial should end."""
        return HeartbeatResponse.model_validate(self._post_message(f"/leases/{lease_id}/heartbeat", request, retries))

    def report(self, lease_id: str, request: ReportRequest, *, retries: int | None = None) -> ReportResponse:
        """POST /leases/{id}/report: one evaluation; the answer says whether to prune."""
        return ReportResponse.model_validate(self._post_message(f"/leases/{lease_id}/report", request, retries))

    def complete(self, lease_id: str, request: CompleteRequest, *, retries: int | None = None) -> FinishResponse:
        """POST /leases/{id}/complete (idempotent for the lease that holds the trial)."""
        return FinishResponse.model_validate(self._post_message(f"/leases/{lease_id}/complete", request, retries))

    def fail(self, lease_id: str, request: FailRequest, *, retries: int | None = None) -> FinishResponse:
        """POST /leases/{id}/fail with a reason (oom, nan, timeout, error, preempted)."""
        return FinishResponse.model_validate(self._post_message(f"/leases/{lease_id}/fail", request, retries))

    def upload_checkpoint(self, lease_id: str, archive: Path, step: int, *, retries: int | None = None) -> None:
        """PUT /leases/{id}/checkpoint: an uncompressed tar of the checkpoint folder, streamed from disk."""

        def put() -> None:
            with archive.open("rb") as f:
                chunks = iter(lambda: f.read(CHUNK_BYTES), b"")
                headers = {
                    "Content-Type": "application/x-tar",
                    "Content-Length": str(archive.stat().st_size),
                    CHECKPOINT_STEP_HEADER: str(step),
                }
                self.request("PUT", f"{API}/leases/{lease_id}/checkpoint", content=chunks, headers=headers)

        self._retrying(put, retries)

    def download_checkpoint(self, lease_id: str, dest: Path, *, retries: int | None = None) -> int | None:
        """GET /leases/{id}/checkpoint into `dest`: the step of the checkpoint, None when there is none (404)."""

        def get() -> int | None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                with self.http.stream("GET", f"{API}/leases/{lease_id}/checkpoint") as response:
                    if response.status_code == 404:
                        return None
                    if response.status_code >= 400:
                        response.read()  # the error body, for the message
                        self._raise_for_status(response)
                    step = int(response.headers.get(CHECKPOINT_STEP_HEADER, "0"))
                    with dest.open("wb") as f:
                        for chunk in response.iter_bytes(CHUNK_BYTES):
                            f.write(chunk)
                    return step
            except httpx.TransportError as exc:
                raise ServerUnavailable(f"cannot reach the TuneForge server at {self.base_url}: {exc}") from exc

        return self._retrying(get, retries)
