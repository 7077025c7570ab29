"""Helpers for scheduler tests, importable by name (`from sched_test_helpers import must_grant`);
a conftest is not importable reliably because several folders have one."""

from __future__ import annotations

import io
import tarfile
from datetime import UTC, datetime, timedelta
from typing import Any

import optuna
from sqlalchemy import select, update

from service.context import ServiceContext
from service.models import Lease, LeaseState, Study, Trial
from service.scheduler import Scheduler
from trainer.protocol import LeaseGrant, LeaseRequest

BASE_SPEC: dict[str, Any] = {
    "name": "sched",
    "model": {"kind": "named", "name": "all-minilm-l6-v2"},
    "dataset": {"kind": "named", "name": "tweets-sentiment"},
    "objectives": [{"metric": "accuracy", "direction": "maximize"}],
    "search_space": {
        "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
        "batch_size": {"type": "categorical", "choices": [16, 32, 64]},
        "num_layers": {"type": "int", "low": 2, "high": 6},
        "unfreeze_depth": {"type": "int", "low": 0, "high": 6},
    },
    "sampler": {"name": "tpe", "seed": 7},
    "pruner": {"name": "median", "options": {"n_startup_trials": 2, "n_warmup_steps": 0}},
    "budget": {"n_trials": 10, "max_parallel": 2, "max_retries": 1},
}


def req(worker: str = "w1", slot: str | None = None) -> LeaseRequest:
    return LeaseRequest(worker_id=worker, slot=slot)


def must_grant(sched: Scheduler, worker: str = "w1") -> LeaseGrant:
    grant = sched.grant(req(worker))
    assert grant is not None, "expected a lease"
    return grant


def study_row(ctx: ServiceContext, study_id: int) -> Study:
    with ctx.db.scope() as s:
        study = s.get(Study, study_id)
        assert study is not None
        return study


def trial_row(ctx: ServiceContext, study_id: int, number: int) -> Trial:
    with ctx.db.scope() as s:
        trial = s.scalars(select(Trial).where(Trial.study_id == study_id, Trial.number == number)).one()
        return trial


def optuna_trials(ctx: ServiceContext, study_id: int) -> dict[int, optuna.trial.FrozenTrial]:
    """The study's Optuna trials by trial id, read fresh from the storage."""
    study = study_row(ctx, study_id)
    storage = optuna.storages.RDBStorage(ctx.settings.database_url)
    try:
        optuna_id = storage.get_study_id_from_name(study.optuna_name)
        return {t._trial_id: t for t in storage.get_all_trials(optuna_id)}
    finally:
        storage.engine.dispose()


def tar_bytes(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar holding `files` (name -> content)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def upload(sched: Scheduler, lease_id: str, step: int, files: dict[str, bytes] | None = None) -> None:
    """Upload a checkpoint the way the route does: begin, write chunks, commit."""
    data = tar_bytes(files or {"model.safetensors": b"w" * 3000, "state.json": b'{"step": %d}' % step})
    up = sched.checkpoints.begin_upload(lease_id, step)
    try:
        for i in range(0, len(data), 1024):
            up.write(data[i : i + 1024])
        up.commit()
    finally:
        up.abort()


def expire(ctx: ServiceContext, lease_id: str | None = None) -> None:
    """Move one lease's (or every active lease's) expiry into the past."""
    q = update(Lease).values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
    if lease_id is not None:
        q = q.where(Lease.id == lease_id)
    with ctx.db.scope() as s:
        s.execute(q.where(Lease.state == LeaseState.ACTIVE))
