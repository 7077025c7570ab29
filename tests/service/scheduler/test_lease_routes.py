"""The lease routes over HTTP: roles, status codes, bodies, checkpoint streaming and limits."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from sched_test_helpers import BASE_SPEC, expire, tar_bytes

from service.context import ServiceContext
from service.settings import Settings
from trainer.protocol import LeaseGrant

API = "/api/v1"


@pytest.fixture
def study_id(client, user_headers) -> int:  # type: ignore[no-untyped-def]
    spec = copy.deepcopy(BASE_SPEC)
    spec["budget"] = {"n_trials": 5, "max_parallel": 2, "max_retries": 1}
    r = client.post(f"{API}/studies", json=spec, headers=user_headers)
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def lease(client, headers: dict[str, str]) -> LeaseGrant:  # type: ignore[no-untyped-def]
    r = client.post(f"{API}/leases", json={"worker_id": "host:1", "slot": "gpu0/0"}, headers=headers)
    assert r.status_code == 200, r.text
    return LeaseGrant.model_validate(r.json())


def test_no_work_is_204(client, worker_headers) -> None:  # type: ignore[no-untyped-def]
    r = client.post(f"{API}/leases", json={"worker_id": "host:1"}, headers=worker_headers)
    assert r.status_code == 204 and r.content == b""


def test_worker_tokens_only(client, user_headers, study_id) -> None:  # type: ignore[no-untyped-def]
    assert client.post(f"{API}/leases", json={"worker_id": "x"}).status_code == 401
    assert client.post(f"{API}/leases", json={"worker_id": "x"}, headers=user_headers).status_code == 403
    assert client.post(f"{API}/leases/abc/heartbeat", json={}, headers=user_headers).status_code == 403


def test_protocol_round_trip(client, worker_headers, study_id) -> None:  # type: ignore[no-untyped-def]
    g = lease(client, worker_headers)
    assert g.study_id == study_id and g.attempt == 1
    base = f"{API}/leases/{g.lease_id}"
    r = client.post(f"{base}/heartbeat", json={"step": 1}, headers=worker_headers)
    assert r.status_code == 200 and r.json()["stop"] is False
    r = client.post(f"{base}/report", json={"step": 1, "metrics": {"accuracy": 0.6}}, headers=worker_headers)
    assert r.status_code == 200 and r.json()["prune"] is False
    r = client.post(
        f"{base}/complete", json={"metrics": {"loss": 0.2}, "step": 2, "duration_s": 1}, headers=worker_headers
    )
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "metrics.accuracy"
    body = {"metrics": {"accuracy": 0.7}, "step": 2, "duration_s": 1.0}
    first = client.post(f"{base}/complete", json=body, headers=worker_headers)
    again = client.post(f"{base}/complete", json=body, headers=worker_headers)
    assert first.status_code == again.status_code == 200 and first.json() == again.json()
    assert first.json() == {"trial_number": g.trial_number, "state": "complete"}
    r = client.post(f"{base}/fail", json={"reason": "error"}, headers=worker_headers)
    assert r.status_code == 409


def test_expired_lease_is_409(client, ctx: ServiceContext, worker_headers, study_id) -> None:  # type: ignore[no-untyped-def]
    from service.scheduler import get_scheduler
    from service.scheduler.reaper import reap_once

    g = lease(client, worker_headers)
    expire(ctx, g.lease_id)
    calls = {
        "heartbeat": {},
        "report": {"step": 1, "metrics": {"accuracy": 0.5}},
        "complete": {"metrics": {"accuracy": 0.5}, "step": 1, "duration_s": 1},
        "fail": {"reason": "oom"},
    }
    for path in ("heartbeat", "report"):
        r = client.post(f"{API}/leases/{g.lease_id}/{path}", json=calls[path], headers=worker_headers)
        assert r.status_code == 409, (path, r.text)
        assert "expired" in r.json()["detail"][0]["reason"]
    # A finished result is still taken until the retry starts (test_outages.py); after, 409.
    reap_once(get_scheduler(ctx))
    retry = lease(client, worker_headers)
    assert (retry.trial_number, retry.attempt) == (g.trial_number, 2)
    for path in ("complete", "fail"):
        r = client.post(f"{API}/leases/{g.lease_id}/{path}", json=calls[path], headers=worker_headers)
        assert r.status_code == 409, (path, r.text)
        assert "expired" in r.json()["detail"][0]["reason"]


def put_checkpoint(client, headers, lease_id: str, data: bytes, step: int) -> Any:  # type: ignore[no-untyped-def]
    return client.put(
        f"{API}/leases/{lease_id}/checkpoint",
        content=data,
        headers={**headers, "Content-Type": "application/x-tar", "X-Checkpoint-Step": str(step)},
    )


def test_checkpoint_upload_resume_and_download(  # type: ignore[no-untyped-def]
    client, settings: Settings, worker_headers, user_headers, other_headers, study_id
) -> None:
    # Bigger than the JSON body limit: the checkpoint route has its own.
    data = tar_bytes({"model.safetensors": b"\x01" * (settings.max_body_bytes + 500_000), "meta.json": b"{}"})
    g = lease(client, worker_headers)
    r = put_checkpoint(client, worker_headers, g.lease_id, data, step=12)
    assert r.status_code == 200, r.text
    assert r.json() == {"lease_id": g.lease_id, "step": 12, "bytes": len(data)}
    stored = settings.artifact_dir / str(study_id) / str(g.trial_number) / "attempt-1" / "checkpoint.tar"
    assert stored.read_bytes() == data
    # Nothing from an earlier attempt yet.
    assert client.get(f"{API}/leases/{g.lease_id}/checkpoint", headers=worker_headers).status_code == 404
    r = client.post(f"{API}/leases/{g.lease_id}/fail", json={"reason": "preempted"}, headers=worker_headers)
    assert r.json()["state"] == "waiting"
    retry = lease(client, worker_headers)
    assert (retry.trial_number, retry.attempt, retry.resume_checkpoint) == (g.trial_number, 2, True)
    r = client.get(f"{API}/leases/{retry.lease_id}/checkpoint", headers=worker_headers)
    assert r.status_code == 200 and r.content == data and r.headers["X-Checkpoint-Step"] == "12"
    # The owner downloads the trial's checkpoint; another user cannot see it.
    url = f"{API}/studies/{study_id}/trials/{g.trial_number}/checkpoint"
    r = client.get(url, headers=user_headers)
    assert r.status_code == 200 and r.content == data
    assert client.get(url, headers=other_headers).status_code == 404
    assert client.get(url, headers=worker_headers).status_code == 403
    assert client.get(f"{API}/studies/{study_id}/trials/999/checkpoint", headers=user_headers).status_code == 404


def test_checkpoint_limits_and_checks(  # type: ignore[no-untyped-def]
    client, ctx: ServiceContext, settings: Settings, worker_headers, study_id
) -> None:
    g = lease(client, worker_headers)
    settings.max_checkpoint_bytes = 20_000  # the middleware and the store read it per request
    too_big = tar_bytes({"w": b"x" * 30_000})
    r = put_checkpoint(client, worker_headers, g.lease_id, too_big, step=1)
    assert r.status_code == 413
    unsafe = tar_bytes({"../escape.txt": b"x"})
    r = put_checkpoint(client, worker_headers, g.lease_id, unsafe, step=1)
    assert r.status_code == 422 and "unsafe" in r.json()["detail"][0]["reason"]
    r = put_checkpoint(client, worker_headers, g.lease_id, b"not a tar at all" * 100, step=1)
    assert r.status_code == 422
    r = client.put(f"{API}/leases/{g.lease_id}/checkpoint", content=tar_bytes({"a": b"1"}), headers=worker_headers)
    assert r.status_code == 422  # the step header is required
    # No partial files are left behind.
    folder = settings.artifact_dir / str(study_id) / str(g.trial_number) / "attempt-1"
    assert not list(folder.glob("*.part"))
    expire(ctx, g.lease_id)
    assert put_checkpoint(client, worker_headers, g.lease_id, tar_bytes({"a": b"1"}), step=2).status_code == 409
