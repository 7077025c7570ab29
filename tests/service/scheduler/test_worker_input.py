"""Hostile worker input on the lease routes: every request a 4xx (never a 500, on SQLite
and PostgreSQL alike) that changes nothing stored; checkpoints that the database refused
leave the previous archive and step in place."""

from __future__ import annotations

import copy
import gzip
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sched_test_helpers import BASE_SPEC, tar_bytes
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service.context import ServiceContext
from service.scheduler import checkpoints
from trainer.protocol import MAX_METRIC_NAME, MAX_METRICS, LeaseGrant

API = "/api/v1"
TOO_BIG = 2**31
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def study_id(client, user_headers) -> int:  # type: ignore[no-untyped-def]
    spec = copy.deepcopy(BASE_SPEC)
    spec["budget"] = {"n_trials": 5, "max_parallel": 2, "max_retries": 1}
    r = client.post(f"{API}/studies", json=spec, headers=user_headers)
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


@pytest.fixture
def grant(client, worker_headers, study_id) -> LeaseGrant:  # type: ignore[no-untyped-def]
    r = client.post(f"{API}/leases", json={"worker_id": "host:1", "slot": "gpu0/0"}, headers=worker_headers)
    assert r.status_code == 200, r.text
    return LeaseGrant.model_validate(r.json())


@pytest.fixture
def snapshot(ctx: ServiceContext) -> Callable[[], dict[str, Any]]:
    """What a refused worker request must leave as it was: trials, reports, leases."""

    def take() -> dict[str, Any]:
        with ctx.db.engine.connect() as conn:
            return {
                # Started trials only: the scheduler pre-asks waiting ones in the background.
                "trials": conn.execute(
                    sa.text(
                        "SELECT id, state, attempts, last_step, checkpoint_path, checkpoint_step"
                        " FROM tf_trials WHERE attempts > 0 ORDER BY id"
                    )
                ).all(),
                "reports": conn.execute(sa.text("SELECT COUNT(*) FROM tf_trial_reports")).scalar_one(),
                "leases": conn.execute(
                    sa.text("SELECT id, worker_id, slot, state, last_step FROM tf_leases ORDER BY id")
                ).all(),
            }

    return take


def _raw(client, headers, url: str, text: str) -> Any:  # type: ignore[no-untyped-def]
    return client.post(url, content=text.encode("utf-8", "surrogatepass"), headers={**headers, **JSON})


def _bad_bodies(lease_id: str) -> Iterator[tuple[str, str]]:
    """(route, raw JSON text) pairs that must each be a 422."""
    ok_metrics = '{"accuracy": 0.5}'
    for literal in ("NaN", "Infinity", "-Infinity"):
        yield "report", f'{{"step": 1, "metrics": {{"accuracy": {literal}}}}}'
        yield "complete", f'{{"metrics": {{"accuracy": {literal}}}, "step": 1, "duration_s": 1}}'
        yield "complete", f'{{"metrics": {ok_metrics}, "step": 1, "duration_s": {literal}}}'
        yield "heartbeat", f'{{"step": {literal}}}'
    yield "complete", f'{{"metrics": {ok_metrics}, "step": 1, "duration_s": 1e400}}'
    for step in (TOO_BIG, 2**63, 10**30, -1):
        yield "heartbeat", f'{{"step": {step}}}'
        yield "report", f'{{"step": {step}, "metrics": {ok_metrics}}}'
        yield "complete", f'{{"metrics": {ok_metrics}, "step": {step}, "duration_s": 1}}'
        yield "fail", f'{{"reason": "error", "step": {step}}}'
    for name in ("acc\\u0000", "acc\\nx", "\\ud800", "", "m" * (MAX_METRIC_NAME + 1)):
        yield "report", f'{{"step": 1, "metrics": {{"accuracy": 0.5, "{name}": 1}}}}'
    many = ", ".join(f'"m{i}": 1' for i in range(MAX_METRICS + 1))
    yield "report", f'{{"step": 1, "metrics": {{{many}}}}}'
    yield "fail", '{"reason": "error", "message": "boom\\u0000"}'
    yield "fail", '{"reason": "error", "message": "\\udc80"}'
    yield "fail", '{"reason": "error", "traceback": "line\\u0000"}'
    yield "fail", '{"reason": "error", "message": "bell\\u0007"}'


def test_hostile_bodies_are_422_and_change_nothing(  # type: ignore[no-untyped-def]
    client, worker_headers, grant: LeaseGrant, snapshot
) -> None:
    before = snapshot()
    base = f"{API}/leases/{grant.lease_id}"
    for route, text in _bad_bodies(grant.lease_id):
        r = _raw(client, worker_headers, f"{base}/{route}", text)
        assert r.status_code == 422, (route, text[:120], r.status_code, r.text[:300])
        assert set(r.json()["detail"][0]) == {"field", "reason"}
    assert snapshot() == before
    # Free text keeps its tabs and line breaks; the lease still works after all that.
    r = client.post(f"{base}/heartbeat", json={"step": TOO_BIG - 1}, headers=worker_headers)
    assert r.status_code == 200, r.text
    r = client.post(
        f"{base}/fail",
        json={"reason": "error", "message": "a\tb\r\nc", "traceback": "T\n  x", "step": 3},
        headers=worker_headers,
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "body",
    [
        {"worker_id": "host\x00:1"},
        {"worker_id": "host:1", "slot": "gpu\x00"},
        {"worker_id": "host\n:1"},
        {"worker_id": "w" * 201},
        {"worker_id": "host:1", "slot": "s" * 101},
    ],
)
def test_lease_request_strings(client, worker_headers, study_id, snapshot, body: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    before = snapshot()
    r = client.post(f"{API}/leases", content=json.dumps(body), headers={**worker_headers, **JSON})
    assert r.status_code == 422, r.text
    assert snapshot() == before


def test_bounded_path_and_header_values(  # type: ignore[no-untyped-def]
    client, worker_headers, user_headers, grant: LeaseGrant, study_id, snapshot
) -> None:
    before = snapshot()
    for lease_id in ("x" * 10_000, "not-a-lease", grant.lease_id + "0", "%00" * 12):
        for route in ("heartbeat", "report", "complete", "fail"):
            r = client.post(f"{API}/leases/{lease_id}/{route}", json={}, headers=worker_headers)
            assert r.status_code == 422, (lease_id[:20], route, r.text[:200])
        r = client.get(f"{API}/leases/{lease_id}/checkpoint", headers=worker_headers)
        assert r.status_code == 422, r.text[:200]
        r = _put(client, worker_headers, lease_id, tar_bytes({"a": b"1"}), step=1)
        assert r.status_code == 422, r.text[:200]
    # A well-formed id that was never granted is the protocol's 409, as before.
    r = client.post(f"{API}/leases/00000000-0000-4000-8000-000000000000/heartbeat", json={}, headers=worker_headers)
    assert r.status_code == 409
    for sid, number in ((2**63, 0), (TOO_BIG, 0), (study_id, TOO_BIG), (study_id, 2**63), (0, 0), (study_id, -1)):
        r = client.get(f"{API}/studies/{sid}/trials/{number}/checkpoint", headers=user_headers)
        assert r.status_code == 422, (sid, number, r.text)
    tar = tar_bytes({"a": b"1"})
    url = f"{API}/leases/{grant.lease_id}/checkpoint"
    for step in (str(TOO_BIG), str(2**63), "9" * 5000, "-1", "nan", "1.5", ""):
        r = client.put(url, content=tar, headers={**worker_headers, "X-Checkpoint-Step": step})
        assert r.status_code == 422, (step[:20], r.text[:200])
    assert snapshot() == before


def _put(client, headers, lease_id: str, data: bytes, step: int) -> Any:  # type: ignore[no-untyped-def]
    return client.put(
        f"{API}/leases/{lease_id}/checkpoint",
        content=data,
        headers={**headers, "Content-Type": "application/x-tar", "X-Checkpoint-Step": str(step)},
    )


def _download(client, headers, study_id: int, number: int) -> tuple[bytes, str | None]:  # type: ignore[no-untyped-def]
    r = client.get(f"{API}/studies/{study_id}/trials/{number}/checkpoint", headers=headers)
    assert r.status_code == 200, r.text
    return r.content, r.headers.get("X-Checkpoint-Step")


def _gzipped_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("model.safetensors")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    return buf.getvalue()


def _sparse_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("weights.bin")
        info.pax_headers = {"GNU.sparse.map": "0,0", "GNU.sparse.size": str(2**40)}
        tar.addfile(info, io.BytesIO(b""))
    return buf.getvalue()


def _many_members_tar() -> bytes:
    return tar_bytes({f"f{i}": b"" for i in range(1_001)})


def _link_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("config.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    return buf.getvalue()


def test_odd_checkpoint_bodies_keep_the_stored_one(  # type: ignore[no-untyped-def]
    client, worker_headers, user_headers, grant: LeaseGrant, study_id, snapshot
) -> None:
    good = tar_bytes({"model.safetensors": b"w" * 3000})
    assert _put(client, worker_headers, grant.lease_id, good, step=5).status_code == 200
    before = snapshot()
    truncated = tar_bytes({"model.safetensors": b"w" * 5000})[:2048]
    for body in (
        b"",
        b"not a tar" * 100,
        gzip.compress(good),
        _gzipped_tar(),
        truncated,
        _sparse_tar(),
        _many_members_tar(),
        _link_tar(),
        tar_bytes({"../x": b"1"}),
    ):
        r = _put(client, worker_headers, grant.lease_id, body, step=9)
        assert r.status_code == 422, (body[:20], r.text[:300])
        assert set(r.json()["detail"][0]) == {"field", "reason"}
    assert snapshot() == before
    assert _download(client, user_headers, study_id, grant.trial_number) == (good, "5")
    # A repeated upload of the same attempt replaces it, step and all.
    newer = tar_bytes({"model.safetensors": b"v" * 4000})
    assert _put(client, worker_headers, grant.lease_id, newer, step=7).status_code == 200
    assert _download(client, user_headers, study_id, grant.trial_number) == (newer, "7")


def test_failed_commit_keeps_the_old_archive_and_step(  # type: ignore[no-untyped-def]
    client, settings, worker_headers, user_headers, grant: LeaseGrant, study_id, monkeypatch
) -> None:
    old = tar_bytes({"model.safetensors": b"o" * 3000})
    assert _put(client, worker_headers, grant.lease_id, old, step=5).status_code == 200
    real_update = checkpoints.guarded_update

    def update_then_fail_commit(s: Session, *args: Any, **kwargs: Any) -> bool:
        result = real_update(s, *args, **kwargs)

        def fail_commit(_session: Session) -> None:
            raise OperationalError("COMMIT", None, Exception("disk I/O error"))

        event.listen(s, "before_commit", fail_commit, once=True)
        return bool(result)

    monkeypatch.setattr(checkpoints, "guarded_update", update_then_fail_commit)
    new = tar_bytes({"model.safetensors": b"n" * 3500})
    r = _put(client, worker_headers, grant.lease_id, new, step=9)
    assert r.status_code != 200, r.text
    monkeypatch.undo()
    assert _download(client, user_headers, study_id, grant.trial_number) == (old, "5")
    folder = settings.artifact_dir / str(study_id) / str(grant.trial_number) / "attempt-1"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.tar", "checkpoint.tar.step"]
    assert (folder / "checkpoint.tar.step").read_text() == "5"
