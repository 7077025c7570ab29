"""max_parallel and n_trials hold exactly when 32 threads lease at once."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from sqlalchemy import select

from service.context import ServiceContext
from service.models import Study, StudyStatus, Trial, TrialState
from service.scheduler import Scheduler
from trainer.protocol import CompleteRequest, LeaseRequest, ReportRequest

THREADS = 32


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


@pytest.mark.slow
def test_32_threads_never_overshoot(
    ctx: ServiceContext, sched: Scheduler, make_study, check_counters, monkeypatch: pytest.MonkeyPatch
) -> None:
    n_trials, max_parallel = 40, 5
    study_id = make_study(spec={"pruner": {"name": "none"}}, n_trials=n_trials, max_parallel=max_parallel)
    sched.buffer.note_demand()
    granted: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def agent(i: int) -> None:
        try:
            barrier.wait()
            while True:
                grant = sched.grant(LeaseRequest(worker_id=f"w{i}"))
                if grant is None:
                    with ctx.db.scope() as s:
                        study = s.get(Study, study_id)
                        assert study is not None
                        if study.status != StudyStatus.RUNNING:
                            return
                    time.sleep(0.01)
                    continue
                with lock:
                    granted.append(grant.trial_number)
                sched.report(grant.lease_id, ReportRequest(step=1, metrics={"accuracy": 0.5 + i / 100}))
                time.sleep(0.2)  # long enough that the other threads find max_parallel reached
                sched.complete(grant.lease_id, CompleteRequest(metrics={"accuracy": 0.6}, step=1, duration_s=0.0))
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    # Ask every trial up front (the buffer, sized to the budget), so that the threads
    # race on claims alone: the max_parallel and n_trials checks get all the contention.
    monkeypatch.setattr(sched.buffer, "target", lambda max_parallel: n_trials)
    assert sched.buffer.top_up() == n_trials
    threads = [threading.Thread(target=agent, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[:3]
    assert len(granted) == n_trials and len(set(granted)) == n_trials
    study = check_counters(study_id)
    assert (study.status, study.n_started, study.n_complete) == (StudyStatus.COMPLETED, n_trials, n_trials)
    with ctx.db.scope() as s:
        rows = s.execute(
            select(Trial.state, Trial.started_at, Trial.finished_at).where(Trial.study_id == study_id)
        ).all()
    assert Counter(r.state for r in rows) == {TrialState.COMPLETE: n_trials}
    # Server-side timestamps: a grant commits after it checked n_running, and a complete
    # sets finished_at before it commits, so the intervals overlap at most max_parallel deep.
    peak = _max_overlap([(r.started_at.timestamp(), r.finished_at.timestamp()) for r in rows])
    assert peak <= max_parallel
    assert peak >= 2  # the threads did run trials side by side
    print(f"retried deadlocks/locks: {ctx.db.retried}, peak running: {peak}")
