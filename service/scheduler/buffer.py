"""Pre-asked trials: sampling happens here, off the lease path.

A TPE ask costs 122 ms at 100 trials and 265 ms at 10,000 (DESIGN.md). A lease must
not pay that, so each running study keeps a few *ready* rows: tf_trials in WAITING
with their params sampled and their Optuna trial already RUNNING (the constant liar
sees them as running, so they spread out). A lease claims one; this module tops the
buffer up again, in a background thread woken after each claim, or synchronously
when a lease finds the buffer empty.

Budget: a ready row reserves one unit of n_trials (`n_started + fresh waiting <
n_trials` is checked under the study lock before the row is inserted), so buffers
never overshoot. Asks run in parallel (FILLERS threads per process, each study with
up to warm.MAX_ASKERS samplers, and several API processes), so near the end of the
budget a few asks may find it taken: the guarded insert is the final word, and such
an ask is told FAIL with the user attribute `tf_discarded`.

Enqueued configurations (warm start, `POST .../enqueue`) are WAITING tf rows that
point at a WAITING Optuna trial with fixed params. Optuna's `ask()` pops those first;
when it pops one, its row already exists and no new row is made. A lease may also
claim such a row before any ask popped it; the grant then pops it (`sync.ensure_running`).

Trial numbers: a new row takes the next number of the study (max + 1, under the study
lock), so they run 0, 1, 2, ... however many asks were discarded or retried in Optuna;
a number taken meanwhile by `studies.enqueue` (which numbers by Optuna trial) makes
the insert retry with the next one. The Optuna trial is linked by tf_trials.optuna_trial_id.
Within one process, asks in flight count against the budget, so a small study is not
asked for more trials than it can take.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, select
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from service.errors import DomainError
from service.models import Study, StudyStatus, Trial, TrialState
from service.scheduler import sync
from service.scheduler._sql import begin_write, lock_study, timed_out, utcnow
from service.scheduler.quarantine import isolated

if TYPE_CHECKING:
    from service.scheduler.leases import Scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BufferState:
    study_id: int
    max_parallel: int
    ready: int  # WAITING with an Optuna trial: claimable now
    headroom: int | None  # fresh rows the budget still allows (None: no n_trials)

    @property
    def room(self) -> bool:
        return self.headroom is None or self.headroom > 0

    def wants(self, target: int, in_flight: int = 0) -> bool:
        room = self.headroom is None or self.headroom - in_flight > 0
        return room and self.ready + in_flight < target


def buffer_states(s: Session, study_ids: list[int] | None = None) -> list[BufferState]:
    """Ready counts and budget room of running studies, in one query."""
    waiting = and_(Trial.study_id == Study.id, Trial.state == TrialState.WAITING)
    ready = select(func.count()).where(waiting, Trial.optuna_trial_id.is_not(None)).scalar_subquery()
    fresh = select(func.count()).where(waiting, Trial.attempts == 0).scalar_subquery()
    q = select(Study, ready, fresh).where(Study.status == StudyStatus.RUNNING)
    if study_ids is not None:
        q = q.where(Study.id.in_(study_ids))
    now = utcnow()
    out = []
    for study, n_ready, n_fresh in s.execute(q).all():
        if timed_out(study, now):
            continue
        headroom = None if study.n_trials is None else study.n_trials - study.n_started - n_fresh
        out.append(BufferState(study.id, study.max_parallel, n_ready, headroom))
    return out


# The background filler works while workers are asking for work: pre-asked trials are
# RUNNING in Optuna, which is wrong to show (and pointless) when no worker is around.
DEMAND_WINDOW_S = 300.0


# Background filler threads per API process: their asks overlap each other's waits on
# the database (and the lease path's own asks when a buffer runs dry).
FILLERS = 2


class Buffer:
    """Keeps a few ready trials per running study, with FILLERS background threads."""

    def __init__(self, scheduler: Scheduler, size: int) -> None:
        self._sched = scheduler
        self.size = size
        self._last_demand = -math.inf
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Asks in flight per study in this process (they reserve budget and buffer room).
        self._in_flight: dict[int, int] = {}
        self._in_flight_lock = threading.Lock()

    def target(self, max_parallel: int) -> int:
        return max(1, min(self.size, max_parallel))

    # ------------------------------------------------------------------ background thread

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        for i in range(FILLERS):
            self._threads.append(self._spawn(i))

    def _spawn(self, i: int) -> threading.Thread:
        thread = threading.Thread(target=self._supervised, args=(i == 0,), name=f"tuneforge-buffer-{i}", daemon=True)
        thread.start()
        return thread

    def revive(self) -> int:
        """Start again any filler thread that died (the reaper calls this every pass);
        returns how many were restarted."""
        if self._stop.is_set() or not self._threads:
            return 0
        revived = 0
        for i, thread in enumerate(self._threads):
            if not thread.is_alive():
                log.error("buffer thread %s died; starting it again", thread.name)
                self._threads[i] = self._spawn(i)
                revived += 1
        return revived

    def _supervised(self, first: bool) -> None:
        """The filler loop, restarted in place when something unforeseen escapes it."""
        while not self._stop.is_set():
            try:
                self._loop(first)
                return
            except Exception:  # noqa: BLE001 - a supervisor: log and restart, never die
                log.exception("buffer thread died; restarting it")
                first = False
                self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads = []

    def wake(self) -> None:
        self._wake.set()

    def note_demand(self) -> None:
        """A worker asked for work: keep the buffers full for a while."""
        self._last_demand = time.monotonic()

    @property
    def in_demand(self) -> bool:
        return time.monotonic() - self._last_demand < DEMAND_WINDOW_S

    def warm_all(self) -> None:
        """Load every running study now (a restarted process reads each study once, here,
        rather than in the first lease or report that needs it)."""
        with self._sched.db.scope() as s:
            ids = s.scalars(select(Study.id).where(Study.status == StudyStatus.RUNNING)).all()
        for study_id in ids:
            if self._stop.is_set():
                return
            with isolated(self._sched, study_id, "loading the study"):
                self._sched.warm.get(study_id)

    def _loop(self, first: bool) -> None:
        if first:
            try:
                self.warm_all()
            except (DBAPIError, DomainError) as exc:
                log.warning("warming the running studies failed: %s", exc)
        while not self._stop.is_set():
            # One wake-up reaches one thread at once; the others look again soon anyway.
            self._wake.wait(timeout=0.25)
            self._wake.clear()
            if self._stop.is_set():
                return
            if not self.in_demand:
                continue
            try:
                self.top_up()
            except (DBAPIError, DomainError) as exc:
                # A database hiccup or a study deleted under us: the next round retries.
                log.warning("buffer top-up failed: %s", exc)

    def top_up(self) -> int:
        """Fill every running study's buffer up to its target; returns trials added."""
        added = 0
        while not self._stop.is_set():
            with self._sched.db.scope() as s:
                states = buffer_states(s)
            wanting = [st for st in states if st.wants(self.target(st.max_parallel))]
            if not wanting:
                break
            progressed = False
            for st in wanting:
                if self._stop.is_set():
                    break
                with isolated(self._sched, st.study_id, "asking a trial"):
                    if self.fill_one(st.study_id, blocking=False):
                        added += 1
                        progressed = True
            if not progressed:
                break
        return added

    # ------------------------------------------------------------------ one ask

    def fill_one(self, study_id: int, *, blocking: bool) -> bool:
        """Ask one trial for the study and store it as a ready row.

        blocking=False (background): skip the study when its askers are all busy.
        blocking=True (a lease found no ready row): wait for an asker; returns True at
        once if a ready row appeared meanwhile.
        """
        warm = self._sched.warm.get(study_id)
        with warm.asker(blocking=blocking) as study:
            if study is None:
                return False
            with self._sched.db.scope() as s:
                states = buffer_states(s, [study_id])
            if not states:
                return False
            st = states[0]
            if blocking and st.ready > 0:
                return True
            with self._in_flight_lock:
                in_flight = self._in_flight.get(study_id, 0)
                if not st.wants(1 if blocking else self.target(st.max_parallel), in_flight):
                    return False
                self._in_flight[study_id] = in_flight + 1
            try:
                return self._ask_and_store(warm, study, study_id)
            finally:
                with self._in_flight_lock:
                    self._in_flight[study_id] -= 1

    def _ask_and_store(self, warm: Any, study: Any, study_id: int) -> bool:
        from service.optuna_bridge import suggest_params

        trial = study.ask()
        params = suggest_params(trial, warm.spec)
        stored: int | None = None
        for attempt in range(3):
            try:
                stored = self._sched.db.run(lambda s: _store(s, study_id, trial._trial_id, params))
                break
            except IntegrityError:
                # studies.enqueue took the number meanwhile (it does not lock the study
                # row): the next try reads the new maximum.
                if attempt == 2:
                    sync.discard(warm, trial._trial_id, "no free trial number")
                    raise
        if stored is None:
            sync.discard(warm, trial._trial_id, "budget reached or study no longer running")
            return False
        self._sched.sampled.add(trial._trial_id)
        return True


def _store(s: Session, study_id: int, optuna_trial_id: int, params: dict[str, Any]) -> int | None:
    """Insert the asked trial as a ready row, under the study lock, so the budget check and
    the insert are one step. Returns its number, or None when it may not be added."""
    begin_write(s)
    study = lock_study(s, study_id)
    if study is None:
        return None
    enqueued = s.scalar(
        select(Trial.number).where(
            Trial.study_id == study_id,
            Trial.state.in_((TrialState.WAITING, TrialState.RUNNING)),
            Trial.optuna_trial_id == optuna_trial_id,
        )
    )
    if enqueued is not None:
        return int(enqueued)  # ask() popped an enqueued configuration: its row exists
    if study.status != StudyStatus.RUNNING or timed_out(study, utcnow()):
        return None
    if study.n_trials is not None:
        fresh = s.scalar(
            select(func.count()).where(
                Trial.study_id == study_id, Trial.state == TrialState.WAITING, Trial.attempts == 0
            )
        )
        if study.n_started + int(fresh or 0) >= study.n_trials:
            return None
    last = s.scalar(select(func.max(Trial.number)).where(Trial.study_id == study_id))
    number = 0 if last is None else int(last) + 1
    s.add(
        Trial(
            study_id=study_id,
            number=number,
            state=TrialState.WAITING,
            params=params,
            optuna_trial_id=optuna_trial_id,
            attempts=0,
        )
    )
    s.flush()
    return number
