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
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

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

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        """Send one request; return the decoded JSON body (None for 204)."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self.http.request(method, path, json=json, params=query or None)
        except httpx.TransportError as exc:  # connect, read, timeout: the request may not have arrived
            raise ServerUnavailable(f"cannot reach the TuneForge server at {self.base_url}: {exc}") from exc
        if response.status_code >= 500:
            items = _error_items(response)
            raise ServerUnavailable(
                f"server error {response.status_code} from {self.base_url}: {items[0][1]}", response.status_code
            )
        if response.status_code >= 400:
            items = _error_items(response)
            field, reason = items[0]
            raise ClientError(response.status_code, field, reason, items)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    # ------------------------------------------------------------------ health

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/healthz")
        return result

    def ready(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/readyz")
        return result

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
