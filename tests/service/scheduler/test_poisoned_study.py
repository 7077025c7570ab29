"""One bad study cannot stop the scheduler for everyone else (issue 7).

A study is poisoned directly in the database with values the validators might miss;
another user's study must still get leases, reports, completions and reaper passes,
and the background threads must stay alive.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable
from typing import Any

import pytest
from sched_test_helpers import BASE_SPEC, expire
from sqlalchemy import update

from service.context import ServiceContext
from service.models import Study, StudyStatus
from service.scheduler import get_scheduler, reaper
from service.scheduler.buffer import Buffer
from service.scheduler.reaper import reap_once
from trainer.protocol import LeaseGrant

API = "/api/v1"


def _spec_edit(**changes: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def edit(spec: dict[str, Any]) -> dict[str, Any]:
        spec = copy.deepcopy(spec)
        for path, value in changes.items():
            *parents, leaf = path.split("__")
            node = spec
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        return spec

    return edit


# name -> (column values, spec edit)
POISONS: dict[str, tuple[dict[str, Any], Callable[[dict[str, Any]], dict[str, Any]] | None]] = {
    "timeout_1e300": ({"timeout_s": 1e300}, None),
    "trial_timeout_1e300": ({"trial_timeout_s": 1e300}, None),
    "spec_no_longer_valid": ({}, _spec_edit(budget__max_parallel="lots", search_space={"x": {"type": "nope"}})),
    "step_5e-324": (
        {},
        _spec_edit(search_space__learning_rate={"type": "float", "low": 1e-5, "high": 1e-3, "step": 5e-324}),
    ),
    "n_ei_candidates_3e6": ({}, _spec_edit(sampler__options={"n_ei_candidates": 3_000_000})),
}


def _create(client: Any, headers: dict[str, str], name: str, **budget: Any) -> int:
    spec = copy.deepcopy(BASE_SPEC)
    spec["name"] = name
    spec["budget"] = {**spec["budget"], **budget}
    r = client.post(f"{API}/studies", json=spec, headers=headers)
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def _poison(ctx: ServiceContext, study_id: int, poison: str) -> None:
    values, edit = POISONS[poison]
    with ctx.db.scope() as s:
        study = s.get(Study, study_id)
        assert study is not None
        if edit is not None:
            values = {**values, "spec": edit(study.spec)}
        s.execute(update(Study).where(Study.id == study_id).values(**values))
    # This process may have loaded it already: what it holds must come from the rows.
    sched = get_scheduler(ctx)
    sched.warm.evict(study_id)
    sched.forget_spec(study_id)


def _lease(client: Any, headers: dict[str, str]) -> LeaseGrant:
    r = client.post(f"{API}/leases", json={"worker_id": "host:1"}, headers=headers)
    assert r.status_code == 200, r.text
    return LeaseGrant.model_validate(r.json())


@pytest.mark.parametrize("poison", list(POISONS))
def test_a_poisoned_study_cannot_stop_another_users_study(  # type: ignore[no-untyped-def]
    client, ctx: ServiceContext, user_headers, other_headers, worker_headers, poison: str
) -> None:
    # The poisoned study is older, so the fair-share order offers it first.
    bad = _create(client, other_headers, "bad", n_trials=4, max_parallel=2, max_retries=1)
    good = _create(client, user_headers, "good", n_trials=3, max_parallel=1, max_retries=1)
    _poison(ctx, bad, poison)
    sched = get_scheduler(ctx)

    reap_once(sched)  # must not raise
    sched.buffer.top_up()  # must not raise
    seen: set[int] = set()
    good_grant: LeaseGrant | None = None
    for _ in range(6):
        g = _lease(client, worker_headers)
        seen.add(g.study_id)
        # The bad study's own leases keep working where its values allow it to run at all.
        r = client.post(f"{API}/leases/{g.lease_id}/heartbeat", json={"step": 1}, headers=worker_headers)
        assert r.status_code == 200, r.text
        if g.study_id == good:
            good_grant = g
            break
    assert good_grant is not None, f"the good study got no lease (leases went to {seen})"
    base = f"{API}/leases/{good_grant.lease_id}"
    r = client.post(f"{base}/report", json={"step": 1, "metrics": {"accuracy": 0.5}}, headers=worker_headers)
    assert r.status_code == 200, r.text
    r = client.post(f"{base}/heartbeat", json={"step": 1}, headers=worker_headers)
    assert r.status_code == 200, r.text
    done = {"metrics": {"accuracy": 0.6}, "step": 2, "duration_s": 1.0}
    r = client.post(f"{base}/complete", json=done, headers=worker_headers)
    assert r.status_code == 200 and r.json()["state"] == "complete", r.text

    # The reaper still takes back the good study's lost leases.
    while True:
        g = _lease(client, worker_headers)
        if g.study_id == good:
            break
    expire(ctx, g.lease_id)
    stats = reap_once(sched)
    assert stats.expired >= 1
    trial = client.get(f"{API}/studies/{good}/trials/{g.trial_number}", headers=user_headers).json()
    assert (trial["state"], trial["failure_reason"]) == ("waiting", "expired")

    # Background parts are alive, and the bad study is either harmless or marked failed.
    assert all(t.is_alive() for t in sched.buffer._threads)
    shown = client.get(f"{API}/studies/{bad}", headers=other_headers).json()
    if poison in ("timeout_1e300", "trial_timeout_1e300"):
        assert shown["status"] == StudyStatus.RUNNING.value  # stored values it can live with
        assert shown["status_reason"] is None
    else:
        assert shown["status"] == StudyStatus.FAILED.value
        # The owner sees why (the step that failed and the error), not only the operator's log.
        assert shown["status_reason"] and ":" in shown["status_reason"]


def test_dead_buffer_threads_and_reaper_loop_are_restarted(ctx: ServiceContext, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    sched = get_scheduler(ctx)
    calls: list[str] = []

    def broken_loop(self: Buffer, first: bool) -> None:
        calls.append("buffer")
        if len(calls) == 1:
            raise RuntimeError("a bug")
        self._stop.wait()

    monkeypatch.setattr(Buffer, "_loop", broken_loop)
    sched.buffer.start()
    try:
        deadline = time.monotonic() + 30
        while calls.count("buffer") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert calls.count("buffer") >= 3, "a filler that died was started again"
        assert all(t.is_alive() for t in sched.buffer._threads)
    finally:
        sched.buffer.stop()

    passes: list[int] = []

    def flaky(s: Any) -> reaper.ReapStats:
        passes.append(1)
        if len(passes) == 1:
            raise OverflowError("a bug")
        return reaper.ReapStats()

    monkeypatch.setattr(reaper, "reap_once", flaky)
    monkeypatch.setattr(reaper, "RESTART_DELAY_S", 0.01)

    async def run() -> None:
        task = asyncio.create_task(reaper._supervised_reaper(sched, 0.01))
        deadline = time.monotonic() + 30
        while len(passes) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(run())
    assert len(passes) >= 3, "the reaper loop came back after dying"
