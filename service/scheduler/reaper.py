"""The reaper: takes back expired leases, ends studies, repairs what a crash left behind.

One pass (`reap_once`) does, in order:
1. Expired leases -> EXPIRED. Each is one guarded `UPDATE ... WHERE state='active' AND
   expires_at <= now`; its rowcount decides which API process handles it, so with
   several processes on one PostgreSQL each lease is handled exactly once. The
   attempt then fails with reason `expired` and is retried (same params, resuming
   from the last checkpoint) up to max_retries, like `Scheduler.fail`.
2. Studies that stopped taking trials (cancelled, or past their timeout): waiting rows
   are dropped (pre-asked ones, never started) or failed for good (retries that will
   not run now); a timed-out study with nothing running becomes `completed`.
3. Repairs, for a crash between a tf_* commit and its Optuna sync: retries without an
   Optuna trial get one; RUNNING Optuna trials that no live tf row holds are told
   the tf outcome (or FAIL when nothing claims them).

It runs in every API process as a background task of the app's lifespan
(`scheduler_lifespan`), every settings.reaper_interval_s, together with the
buffer thread that pre-asks trials.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from optuna.exceptions import OptunaError
from optuna.trial import TrialState as OptunaState
from sqlalchemy import or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from service.errors import DomainError
from service.models import Lease, LeaseState, Study, StudyStatus, Trial, TrialState
from service.scheduler import sync
from service.scheduler._sql import aware, begin_write, guarded_update, lock_study, timed_out, utcnow
from service.scheduler.leases import EXPIRED, Finished, LeaseRef, Scheduler, get_scheduler
from service.scheduler.quarantine import isolated

if TYPE_CHECKING:
    from service.context import ServiceContext

log = logging.getLogger(__name__)

# Errors a background pass survives (logged, retried next pass); anything else is a bug.
_TRANSIENT = (DBAPIError, DomainError, OptunaError)


@dataclass
class ReapStats:
    expired: int = 0
    retried: int = 0
    failed: int = 0
    dropped: int = 0
    completed_studies: int = 0
    repaired: int = 0


def reap_once(sched: Scheduler, *, repair_grace_s: float = 60.0) -> ReapStats:
    """One pass of the reaper. `repair_grace_s`: how old an unsynced Optuna trial must be
    before the repair sweep touches it (a pre-ask inserts its row within milliseconds)."""
    stats = ReapStats()
    _expire_leases(sched, stats)
    _wind_down_studies(sched, stats)
    _repair(sched, stats, repair_grace_s)
    return stats


# ---------------------------------------------------------------------------- 1. leases


def _expire_leases(sched: Scheduler, stats: ReapStats) -> None:
    now = utcnow()
    with sched.db.scope() as s:
        rows = s.execute(
            select(Lease.id, Lease.study_id)
            .where(Lease.state == LeaseState.ACTIVE, Lease.expires_at <= now)
            .order_by(Lease.expires_at)
            .limit(500)
        ).all()
    for lease_id, study_id in rows:
        with isolated(sched, study_id, f"expiring lease {lease_id}"):
            fin = sched.db.run(lambda s, lid=lease_id: _expire(sched, s, lid))
            if fin is None:
                continue  # another process took it, or the holder finished just in time
            stats.expired += 1
            if fin.state == TrialState.WAITING:
                stats.retried += 1
            elif fin.state == TrialState.FAILED:
                stats.failed += 1
            sched.sync(fin)


def _expire(sched: Scheduler, s: Session, lease_id: str) -> Finished | None:
    now = utcnow()
    row = s.execute(
        update(Lease)
        .where(Lease.id == lease_id, Lease.state == LeaseState.ACTIVE, Lease.expires_at <= now)
        .values(state=LeaseState.EXPIRED, stop_reason=EXPIRED)
        .returning(Lease.study_id, Lease.trial_id, Lease.attempt, Lease.granted_at, Lease.last_step, Lease.worker_id)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return None  # another process took it, or its holder finished just in time
    held = s.scalar(
        select(Trial.id).where(
            Trial.id == row.trial_id, Trial.state == TrialState.RUNNING, Trial.attempts == row.attempt
        )
    )
    if held is None:
        return None  # nothing runs under this lease any more; expiring it is all there is to do
    lease = LeaseRef(lease_id, row.study_id, row.trial_id, row.attempt, aware(row.granted_at), row.last_step)
    message = (
        f"lease expired: no heartbeat from worker {row.worker_id!r} "
        f"for {sched.settings.lease_timeout_s:g}s (attempt {row.attempt})"
    )
    return sched.fail_trial(s, lease, EXPIRED, message, None, row.last_step, now)


# ---------------------------------------------------------------------------- 2. studies


def _wind_down_studies(sched: Scheduler, stats: ReapStats) -> None:
    now = utcnow()
    with sched.db.scope() as s:
        has_waiting = select(Trial.id).where(Trial.study_id == Study.id, Trial.state == TrialState.WAITING).exists()
        rows = s.execute(
            select(Study.id, Study.status, Study.timeout_s, Study.created_at, Study.finished_at).where(
                or_(
                    (Study.status != StudyStatus.RUNNING) & has_waiting,
                    (Study.status == StudyStatus.RUNNING) & Study.timeout_s.is_not(None),
                )
            )
        ).all()
    settle = timedelta(seconds=sched.settings.lease_timeout_s)
    for row in rows:
        with isolated(sched, row.id, "winding the study down"):
            _wind_down_one(sched, stats, row, now, settle)


def _wind_down_one(sched: Scheduler, stats: ReapStats, row: Any, now: datetime, settle: timedelta) -> None:
    if row.status == StudyStatus.RUNNING and not timed_out(row, now):
        return
    finished = aware(row.finished_at)
    if row.status != StudyStatus.RUNNING and finished is not None and now - finished < settle:
        return  # just cancelled or completed: let calls in flight land first
    result = sched.db.run(lambda s, sid=row.id: _wind_down(s, sid))
    if result is None:
        return
    discards, completed, failed = result
    stats.dropped += len(discards) - failed
    stats.failed += failed
    stats.completed_studies += int(completed)
    live = [d for d in discards if d is not None]
    for optuna_id in live:
        sched.sampled.discard(optuna_id)
    if live:
        warm = sched.warm.get(row.id)
        for optuna_id in live:
            sync.discard(warm, optuna_id, "study cancelled or out of time before this trial ran")


def _wind_down(s: Session, study_id: int) -> tuple[list[int | None], bool, int] | None:
    begin_write(s)
    study = lock_study(s, study_id)
    if study is None:
        return None
    now = utcnow()
    if study.status == StudyStatus.RUNNING and not timed_out(study, now):
        return None
    why = {StudyStatus.CANCELLED: "study cancelled", StudyStatus.FAILED: "study failed"}.get(
        study.status, "study out of time"
    )
    discards: list[int | None] = []
    failed = 0
    waiting = s.scalars(
        select(Trial)
        .where(Trial.study_id == study_id, Trial.state == TrialState.WAITING)
        .execution_options(populate_existing=True)
    ).all()
    for trial in waiting:
        discards.append(trial.optuna_trial_id)
        if trial.attempts == 0:
            s.delete(trial)  # pre-asked or enqueued, never started: not a trial of the study
            continue
        trial.state = TrialState.FAILED
        trial.finished_at = now
        trial.failure_message = f"{trial.failure_message or trial.failure_reason}; not retried: {why}"
        failed += 1
    if failed:
        guarded_update(s, Study, [Study.id == study_id], {"n_failed": Study.n_failed + failed})
    completed = False
    if study.status == StudyStatus.RUNNING and study.n_running == 0:
        completed = bool(
            guarded_update(
                s,
                Study,
                [Study.id == study_id, Study.status == StudyStatus.RUNNING, Study.n_running == 0],
                {"status": StudyStatus.COMPLETED, "finished_at": now},
            )
        )
    return discards, completed, failed


# ---------------------------------------------------------------------------- 3. repairs


def _repair(sched: Scheduler, stats: ReapStats, grace_s: float) -> None:
    now = utcnow()
    recent = now - timedelta(hours=1)
    with sched.db.scope() as s:
        studies = (
            s.execute(select(Study.id).where(or_(Study.status == StudyStatus.RUNNING, Study.finished_at >= recent)))
            .scalars()
            .all()
        )
        unattached = s.execute(
            select(Trial.id, Trial.study_id, Trial.number, Trial.attempts, Trial.params).where(
                Trial.state == TrialState.WAITING, Trial.attempts > 0, Trial.optuna_trial_id.is_(None)
            )
        ).all()
    # Retries whose Optuna trial was never created (crash after the failing commit). Only
    # rows seen by an earlier pass at least `grace_s` ago: the process that failed the
    # attempt attaches its retry within milliseconds, and a duplicate would be discarded.
    seen = sched.unattached_seen
    clock = time.monotonic()
    for r in unattached:
        first_seen = seen.get(r.id)
        if first_seen is None:
            continue
        if clock - first_seen < grace_s:
            continue
        with isolated(sched, r.study_id, f"attaching the retry of trial {r.number}"):
            if sched.attach_retry(sched.warm.get(r.study_id), r.id, r.number, r.attempts, None, dict(r.params)):
                stats.repaired += 1
    current = {r.id for r in unattached}
    for key in list(seen):
        if key not in current:
            del seen[key]
    for key in current:
        seen.setdefault(key, clock)

    for study_id in studies:
        with isolated(sched, study_id, "repairing its Optuna trials"):
            stats.repaired += _sweep_study(sched, study_id, grace_s)
    # Studies that ended long ago need no warm state in this process.
    active = set(studies)
    for study_id in sched.warm.loaded():
        if study_id not in active:
            sched.warm.evict(study_id)


def _sweep_study(sched: Scheduler, study_id: int, grace_s: float) -> int:
    warm = sched.warm.peek(study_id)
    if warm is None:
        return 0  # never loaded here; the process that ran it, or a later pass, sweeps it
    running = warm.study._storage.get_all_trials(warm.study._study_id, deepcopy=False, states=(OptunaState.RUNNING,))
    cutoff = datetime.now() - timedelta(seconds=grace_s)  # Optuna stores naive local times
    old = {t._trial_id: t for t in running if t.datetime_start is not None and t.datetime_start <= cutoff}
    if not old:
        return 0
    with sched.db.scope() as s:
        rows = s.execute(
            select(Trial.optuna_trial_id, Trial.state, Trial.values, Trial.failure_reason, Trial.failure_message).where(
                Trial.study_id == study_id, Trial.optuna_trial_id.in_(list(old))
            )
        ).all()
    held: dict[int, Any] = {r.optuna_trial_id: r for r in rows}
    repaired = 0
    for optuna_id in old:
        row = held.get(optuna_id)
        if row is not None and row.state in (TrialState.WAITING, TrialState.RUNNING):
            continue  # a live row holds it
        if row is None:
            sync.discard(warm, optuna_id, "no tuneforge trial holds it (left behind by a crash or a retry)")
        elif row.state == TrialState.COMPLETE and row.values:
            sync.tell_complete(warm, optuna_id, row.values)
        elif row.state == TrialState.PRUNED:
            sync.tell_pruned(warm, optuna_id)
        else:
            sync.tell_failed(warm, optuna_id, row.failure_reason or "error", row.failure_message)
        repaired += 1
    return repaired


# ---------------------------------------------------------------------------- background


def pause_lease_clocks(sched: Scheduler, s: Session) -> int:
    """Give every active lease a full lease period from now.

    Runs (through `Database.on_reconnect`) before this process's first unit of work
    after it came up and after each time it could not reach the database: a worker
    cannot heartbeat to a server that is down or cannot write, so that time must not
    count against its lease. Returns the leases extended.
    """
    fresh = utcnow() + sched.lease_timeout
    extended = guarded_update(
        s, Lease, [Lease.state == LeaseState.ACTIVE, Lease.expires_at < fresh], {"expires_at": fresh}
    )
    if extended:
        log.info("lease clocks paused: %d active lease(s) extended to %s", extended, fresh.isoformat())
    return extended


# A background task that died is started again after this long (seconds), so a bug that
# kills it at once does not spin.
RESTART_DELAY_S = 1.0


async def _reaper_loop(sched: Scheduler, interval_s: float) -> None:
    while True:
        try:
            stats = await asyncio.to_thread(reap_once, sched)
            if stats.expired or stats.completed_studies or stats.repaired:
                log.info("reaper: %s", stats)
        except _TRANSIENT as exc:
            log.warning("reaper pass failed, retrying next pass: %s", exc)
        # The buffer's threads are supervised from here: one that died is started again.
        sched.buffer.revive()
        await asyncio.sleep(interval_s)


async def _supervised_reaper(sched: Scheduler, interval_s: float) -> None:
    """The reaper loop, started again whenever it dies of something unforeseen."""
    while True:
        try:
            await _reaper_loop(sched, interval_s)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a supervisor: log and restart, never die
            log.exception("the reaper loop died; restarting it in %.0f s", RESTART_DELAY_S)
            await asyncio.sleep(RESTART_DELAY_S)


@asynccontextmanager
async def scheduler_lifespan(ctx: ServiceContext) -> AsyncIterator[None]:
    """Lifespan hook: the buffer thread and the reaper loop, for the app's lifetime."""
    sched = get_scheduler(ctx)
    # Registered before the app serves: the first lease call or reaper pass of this
    # process pauses every lease's clock for the time no server was there to hear it.
    ctx.db.on_reconnect(lambda s: pause_lease_clocks(sched, s))
    sched.buffer.start()
    task = asyncio.create_task(_supervised_reaper(sched, ctx.settings.reaper_interval_s), name="tuneforge-reaper")
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        await asyncio.to_thread(sched.buffer.stop)
