"""A lease belongs to the token that took it: other tokens get 403 and change nothing;
an admin releases a lease instead (`POST /leases/{id}/release`)."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sched_test_helpers import BASE_SPEC, optuna_trials, tar_bytes
from sqlalchemy import func, select

from service import auth
from service.context import ServiceContext
from service.models import Lease, LeaseState, Role, Trial, TrialReport, TrialState
from service.settings import Settings
from trainer.protocol import LeaseGrant

API = "/api/v1"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_study(client: Any, headers: dict[str, str], max_retries: int = 0) -> int:
    spec = copy.deepcopy(BASE_SPEC)
    spec["budget"] = {"n_trials": 5, "max_parallel": 2, "max_retries": max_retries}
    r = client.post(f"{API}/studies", json=spec, headers=headers)
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def take(client: Any, headers: dict[str, str]) -> LeaseGrant:
    r = client.post(f"{API}/leases", json={"worker_id": "host:1", "slot": "gpu0/0"}, headers=headers)
    assert r.status_code == 200, r.text
    return LeaseGrant.model_validate(r.json())


def put_checkpoint(client: Any, headers: dict[str, str], lease_id: str, data: bytes) -> Any:
    return client.put(
        f"{API}/leases/{lease_id}/checkpoint",
        content=data,
        headers={**headers, "Content-Type": "application/x-tar", "X-Checkpoint-Step": "3"},
    )


@pytest.fixture
def stranger_headers(ctx: ServiceContext) -> dict[str, str]:
    return bearer(auth.create_token(ctx.db, "gpu-node-2", Role.WORKER))


def _snapshot(ctx: ServiceContext, lease_id: str) -> dict[str, Any]:
    with ctx.db.scope() as s:
        lease = s.get(Lease, lease_id)
        assert lease is not None
        trial = s.get(Trial, lease.trial_id)
        assert trial is not None
        reports = s.scalar(select(func.count()).select_from(TrialReport))
        return {
            "lease": (lease.state, lease.expires_at, lease.last_step, lease.stop_reason),
            "trial": (trial.state, trial.attempts, trial.last_step, trial.values, trial.checkpoint_path),
            "reports": reports,
        }


def test_only_the_token_that_took_a_lease_may_use_it(  # type: ignore[no-untyped-def]
    client,
    ctx: ServiceContext,
    settings: Settings,
    user_headers,
    worker_headers,
    worker_token,
    stranger_headers,
    admin_headers,
    row_counts: Callable[[], dict[str, int]],
) -> None:
    study_id = make_study(client, user_headers)
    g = take(client, worker_headers)
    holder = auth.lookup(ctx.db, worker_token)
    with ctx.db.scope() as s:
        lease = s.get(Lease, g.lease_id)
        assert lease is not None and holder is not None and lease.token_id == holder.token_id

    base = f"{API}/leases/{g.lease_id}"
    data = tar_bytes({"model.safetensors": b"\x01" * 1000})
    calls: dict[str, Callable[[dict[str, str]], Any]] = {
        "heartbeat": lambda h: client.post(f"{base}/heartbeat", json={"step": 5}, headers=h),
        "report": lambda h: client.post(f"{base}/report", json={"step": 1, "metrics": {"accuracy": 0.9}}, headers=h),
        "complete": lambda h: client.post(
            f"{base}/complete", json={"metrics": {"accuracy": 0.9}, "step": 2, "duration_s": 1.0}, headers=h
        ),
        "fail": lambda h: client.post(f"{base}/fail", json={"reason": "error"}, headers=h),
        "checkpoint PUT": lambda h: put_checkpoint(client, h, g.lease_id, data),
        "checkpoint GET": lambda h: client.get(f"{base}/checkpoint", headers=h),
    }

    def counts_now() -> dict[str, int]:
        # Trial rows come and go with the buffer's background pre-asks; the trial this
        # lease holds is compared in the snapshot instead.
        return {k: v for k, v in row_counts().items() if k not in ("tf_trials", "trials")}

    counts, before = counts_now(), _snapshot(ctx, g.lease_id)
    for headers in (stranger_headers, admin_headers):  # an admin is not the holder either
        for name, call in calls.items():
            r = call(headers)
            assert r.status_code == 403, (name, r.text)
            [detail] = r.json()["detail"]
            assert detail["field"] == "lease_id" and "another token" in detail["reason"], name
    assert counts_now() == counts and _snapshot(ctx, g.lease_id) == before
    assert not (settings.artifact_dir / str(study_id)).exists()  # no upload reached the disk

    # The holder is unaffected.
    assert calls["heartbeat"](worker_headers).status_code == 200
    assert calls["report"](worker_headers).status_code == 200
    assert calls["checkpoint PUT"](worker_headers).status_code == 200
    assert calls["checkpoint GET"](worker_headers).status_code == 404  # no earlier attempt
    r = calls["complete"](worker_headers)
    assert r.status_code == 200 and r.json()["state"] == "complete"
    # After the end too: a stranger learns nothing from the idempotent answer.
    assert calls["complete"](stranger_headers).status_code == 403
    assert calls["complete"](worker_headers).status_code == 200


def test_an_admin_releases_a_lease_like_an_expiry(  # type: ignore[no-untyped-def]
    client, ctx: ServiceContext, user_headers, worker_headers, admin_headers, stranger_headers
) -> None:
    study_id = make_study(client, user_headers, max_retries=0)
    g = take(client, worker_headers)
    url = f"{API}/leases/{g.lease_id}/release"
    for headers in (worker_headers, stranger_headers, user_headers):
        assert client.post(url, headers=headers).status_code == 403
    with ctx.db.scope() as s:
        assert s.get(Lease, g.lease_id).state == LeaseState.ACTIVE  # type: ignore[union-attr]
        first_optuna_id = s.scalar(
            select(Trial.optuna_trial_id).where(Trial.study_id == study_id, Trial.number == g.trial_number)
        )

    r = client.post(url, headers=admin_headers)
    assert r.status_code == 200, r.text
    # Released is not the trial's fault: retried even with max_retries=0.
    assert r.json() == {"trial_number": g.trial_number, "state": "waiting"}
    with ctx.db.scope() as s:
        lease = s.get(Lease, g.lease_id)
        assert lease is not None and (lease.state, lease.stop_reason) == (LeaseState.EXPIRED, "released")
    attempt_1 = optuna_trials(ctx, study_id)[first_optuna_id]
    assert attempt_1.state.name == "FAIL" and attempt_1.user_attrs["tf_failure_reason"] == "released"

    # The old holder is told to stop; a second release is refused; unknown leases are 404.
    r = client.post(f"{API}/leases/{g.lease_id}/heartbeat", json={}, headers=worker_headers)
    assert r.status_code == 409
    body = {"metrics": {"accuracy": 0.9}, "step": 2, "duration_s": 1.0}
    assert client.post(f"{API}/leases/{g.lease_id}/complete", json=body, headers=worker_headers).status_code == 409
    assert client.post(url, headers=admin_headers).status_code == 409
    assert client.post(f"{API}/leases/{uuid.uuid4()}/release", headers=admin_headers).status_code == 404

    retry = take(client, worker_headers)
    assert (retry.trial_number, retry.attempt) == (g.trial_number, 2)
    r = client.post(f"{API}/leases/{retry.lease_id}/complete", json=body, headers=worker_headers)
    assert r.status_code == 200 and r.json()["state"] == "complete"
    with ctx.db.scope() as s:
        trial = s.scalars(select(Trial).where(Trial.study_id == study_id, Trial.number == g.trial_number)).one()
        assert (trial.state, trial.attempts) == (TrialState.COMPLETE, 2)
