"""Leases: how worker agents take trials, keep them, report on them and give them back.

Every state change is one transaction with guarded transitions: an UPDATE that names
the state it expects (`WHERE state = 'active' AND expires_at > now`) and whose
rowcount says whether this call won. A loser changes nothing and gets `LeaseLost`
(409). Calls from the current holder are idempotent: a repeated complete or fail
answers what the first one decided; Optuna is brought in line after the commit
(`sync.py`), idempotently too.

Scheduling
- Fair share: among running studies below max_parallel, the one with the fewest
  running trials relative to its max_parallel goes first (ties: the oldest).
- The study row is locked for the claim (PostgreSQL `FOR UPDATE SKIP LOCKED`, then
  a blocking lock if every candidate was busy; SQLite takes the write lock first),
  so max_parallel and n_trials hold exactly under any concurrency.
- A lease claims a *ready* row (params sampled ahead by `buffer.py`); retries go
  before fresh trials. With no ready row, the lease asks synchronously.
- A study past its timeout grants nothing (the reaper ends it); a cancelled or
  completed one neither.

Retries (decided when an attempt fails; max_retries comes from the study)
| reason | retried? | counts against max_retries |
| --- | --- | --- |
| error, timeout | yes, up to max_retries | yes |
| lease expired (worker lost; the reaper) | yes, up to max_retries | yes |
| preempted (SIGTERM, node drained) | yes, up to MAX_PREEMPTIONS | no |
| released (an admin took the lease back, release.py) | yes, shares MAX_PREEMPTIONS | no |
| oom, nan | never: the same config would fail again; recorded as a constraint (sync.py) | - |
A retry keeps its tf trial number and params, gets a new Optuna trial, and resumes
from the trial's last uploaded checkpoint when there is one
(`LeaseGrant.resume_checkpoint`). Nothing is retried once the study is cancelled or
past its timeout.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from optuna.exceptions import UpdateFinishedTrialError
from sqlalchemy import Float, cast, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from service.errors import Conflict, DomainError, Forbidden, Invalid, LeaseLost
from service.models import Lease, LeaseState, Study, StudyStatus, Trial, TrialReport, TrialState
from service.scheduler import sync
from service.scheduler._sql import (
    aware,
    begin_write,
    guarded_update,
    is_sqlite,
    lock_study,
    past,
    timed_out,
    utcnow,
)
from service.scheduler.buffer import Buffer
from service.scheduler.checkpoints import CheckpointStore
from service.scheduler.quarantine import isolated
from service.scheduler.warm import WarmStudies, is_maximize
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

if TYPE_CHECKING:
    from service.auth import Principal
    from service.context import ServiceContext
    from service.spec import StudySpec

log = logging.getLogger(__name__)

# How long a lease call keeps trying while a study has room but no ready trial yet.
GRANT_PATIENCE_S = 30.0
# Preemptions do not use up max_retries, but a trial that is preempted forever must end.
MAX_PREEMPTIONS = 20
# Failure reasons (as stored in tf_leases.stop_reason) that use up max_retries.
COUNTED_REASONS = ("error", "timeout", "expired")
EXPIRED = "expired"  # tf_trials.failure_reason / tf_leases.stop_reason of a lost lease
RELEASED = "released"  # ... of a lease an admin took back (release.py)
# Not the trial's fault, so they spare max_retries; together capped by MAX_PREEMPTIONS.
UNCOUNTED_REASONS = ("preempted", RELEASED)
PRUNED = "pruned"
COMPLETE = "complete"


@dataclass
class _Claimed:
    lease_id: str
    study_id: int
    trial_id: int
    directions: list[str]
    study_name: str
    number: int
    optuna_trial_id: int
    attempt: int
    expires_at: datetime
    trial_timeout_s: float | None
    params: dict[str, Any]
    spec_json: dict[str, Any]
    objectives: list[str]
    resume: bool
    token_id: int | None = None


@dataclass
class _NeedsFill:
    study_id: int


@dataclass
class Finished:
    """What a finishing transaction decided; `Scheduler.sync` applies it to Optuna."""

    study_id: int
    trial_id: int
    number: int
    state: TrialState  # the tf trial's state after the transaction (WAITING: retry scheduled)
    optuna_trial_id: int | None  # the attempt's Optuna trial
    values: list[float] | None = None
    reason: str | None = None
    message: str | None = None
    retry_attempt: int | None = None  # set when a retry was scheduled
    params: dict[str, Any] = field(default_factory=dict)
    # A result that arrived after its lease expired, with its retry not started yet
    # (`Scheduler._take_late`): the attempt it belongs to, and the retry's Optuna trial
    # to discard. The attempt's own Optuna trial was told FAIL at expiry, so the result
    # gets a new one (`Scheduler._sync_late`).
    late_attempt: int | None = None
    discard_optuna_trial_id: int | None = None


@dataclass(frozen=True)
class LeaseRef:
    """The lease a finishing transaction just took over (from its guarded UPDATE)."""

    id: str
    study_id: int
    trial_id: int
    attempt: int
    granted_at: datetime | None
    last_step: int | None


@dataclass(frozen=True)
class _LeaseMeta:
    study_id: int
    trial_id: int
    attempt: int
    number: int
    optuna_trial_id: int | None
    objectives: tuple[str, ...]
    directions: tuple[str, ...]
    token_id: int | None = None  # the holder (Lease.token_id); never changes


_LEASE_CACHE = 50_000


class Scheduler:
    """Grants and tracks leases for one API process. Thread-safe; build with `get_scheduler`."""

    def __init__(self, ctx: ServiceContext, *, buffer_size: int = 6) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self.settings = ctx.settings
        self.warm = WarmStudies(ctx)
        self.buffer = Buffer(self, buffer_size)
        self.checkpoints = CheckpointStore(self)
        self._specs: dict[int, StudySpec] = {}
        # Optuna trials this process asked (RUNNING with params): a grant of their row
        # need not check for an enqueued WAITING trial. Set add/discard are atomic.
        self.sampled: set[int] = set()
        self._leases: OrderedDict[str, _LeaseMeta] = OrderedDict()
        self._leases_lock = threading.Lock()
        # Retries seen without an Optuna trial by reaper passes, and when first (reaper.py).
        self.unattached_seen: dict[int, float] = {}

    @property
    def lease_timeout(self) -> timedelta:
        return timedelta(seconds=self.settings.lease_timeout_s)

    # ================================================================== grant

    def grant(self, req: LeaseRequest, principal: Principal | None = None) -> LeaseGrant | None:
        """A lease on the next trial to run, or None when no study has work. The lease is
        tied to `principal`'s token: only that token may use it afterwards."""
        token_id = principal.token_id if principal is not None else None
        self.buffer.note_demand()
        # 204 must mean "no work": an agent then idles for its poll interval, and one in
        # burst mode exits. While a study has room, keep asking and claiming (another
        # lease may take the row this call asked for) up to GRANT_PATIENCE_S.
        deadline = time.monotonic() + GRANT_PATIENCE_S
        # Studies that failed this call (an error while asking or handing out): one bad
        # study must not keep this worker from the others' work.
        skip: set[int] = set()
        while time.monotonic() < deadline:
            claimed = self.db.run(lambda s: self._claim(s, req, skip, token_id))
            if claimed is None:
                return None
            if isinstance(claimed, _Claimed):
                self.buffer.wake()
                message: LeaseGrant | None = None
                with isolated(self, claimed.study_id, "handing out a lease"):
                    message = self._hand_out(claimed)
                if message is None:
                    skip.add(claimed.study_id)
                    self._take_back(claimed)
                    continue
                return message
            # The fairest study has no ready trial: ask one now, then claim again.
            asked = False
            with isolated(self, claimed.study_id, "asking a trial for a lease"):
                self.buffer.fill_one(claimed.study_id, blocking=True)
                asked = True
            if not asked:
                skip.add(claimed.study_id)
        return None

    def _hand_out(self, claimed: _Claimed) -> LeaseGrant:
        if claimed.optuna_trial_id in self.sampled:
            self.sampled.discard(claimed.optuna_trial_id)
        else:
            # Maybe an enqueued configuration nobody popped yet (or a row another
            # process asked): make sure its Optuna trial runs with its params.
            sync.ensure_running(self.warm.get(claimed.study_id), claimed.optuna_trial_id)
        message = self._grant_message(claimed)
        self._remember(
            claimed.lease_id,
            _LeaseMeta(
                study_id=claimed.study_id,
                trial_id=claimed.trial_id,
                attempt=claimed.attempt,
                number=claimed.number,
                optuna_trial_id=claimed.optuna_trial_id,
                objectives=tuple(message.objectives),
                directions=tuple(claimed.directions),
                token_id=claimed.token_id,
            ),
        )
        return message

    def _take_back(self, claimed: _Claimed) -> None:
        """A claimed lease that could not be handed out: no worker will ever hold it. Its
        attempt ends as preempted (retried without using up max_retries; never in a
        study that was marked failed), rather than waiting a lease period to expire."""
        from trainer.protocol import FailRequest, FailureReason

        req = FailRequest(reason=FailureReason.PREEMPTED, message="the server could not hand this lease out")
        try:
            fin = self.db.run(lambda s: self._finish_tx(s, claimed.lease_id, req.reason.value, None, fail=req))
        except (DBAPIError, DomainError) as exc:
            log.warning("lease %s not taken back (the reaper expires it): %s", claimed.lease_id, exc)
            return
        with isolated(self, claimed.study_id, "taking back a lease"):
            self.sync(fin)

    def _claim(
        self, s: Session, req: LeaseRequest, skip: set[int] | None = None, token_id: int | None = None
    ) -> _Claimed | _NeedsFill | None:
        begin_write(s)
        now = utcnow()
        share = cast(Study.n_running, Float) / Study.max_parallel
        q = select(Study.id, Study.n_trials, Study.n_started, Study.timeout_s, Study.created_at).where(
            # max_parallel > 0: a stored 0 would divide by zero in the ordering, failing every grant.
            Study.status == StudyStatus.RUNNING,
            Study.n_running < Study.max_parallel,
            Study.max_parallel > 0,
        )
        if skip:
            q = q.where(Study.id.not_in(skip))
        candidates = s.execute(q.order_by(share, Study.id)).all()
        busy: list[int] = []
        for cand in candidates:
            if timed_out(cand, now):
                continue
            ready = self._has_ready(s, cand.id)
            if not ready:
                if self._has_room(s, cand):
                    return _NeedsFill(cand.id)
                continue
            study = lock_study(s, cand.id, skip_locked=True)
            if study is None:
                busy.append(cand.id)  # another grant holds it right now
                continue
            claimed = self._claim_in(s, study, req, token_id)
            if claimed is not None:
                return claimed
        for study_id in busy:
            # Every ready study was busy: wait for the fairest one (we hold no other lock).
            study = lock_study(s, study_id)
            if study is not None:
                claimed = self._claim_in(s, study, req, token_id)
                if claimed is not None:
                    return claimed
        return None

    @staticmethod
    def _has_ready(s: Session, study_id: int) -> bool:
        q = select(Trial.id).where(
            Trial.study_id == study_id, Trial.state == TrialState.WAITING, Trial.optuna_trial_id.is_not(None)
        )
        return s.scalar(q.limit(1)) is not None

    @staticmethod
    def _has_room(s: Session, cand: Any) -> bool:
        if cand.n_trials is None:
            return True
        fresh = s.scalar(
            select(func.count()).where(
                Trial.study_id == cand.id, Trial.state == TrialState.WAITING, Trial.attempts == 0
            )
        )
        return cand.n_started + int(fresh or 0) < cand.n_trials

    def _claim_in(self, s: Session, study: Study, req: LeaseRequest, token_id: int | None = None) -> _Claimed | None:
        """Claim a ready row of a locked study, or None if it can take no more now."""
        now = utcnow()  # after the lock: the lease's clock starts when it is really granted
        if study.status != StudyStatus.RUNNING or study.n_running >= study.max_parallel or timed_out(study, now):
            return None
        trial = s.scalars(
            select(Trial)
            .where(Trial.study_id == study.id, Trial.state == TrialState.WAITING, Trial.optuna_trial_id.is_not(None))
            .order_by(Trial.attempts.desc(), Trial.number)  # retries first
            .limit(1)
            .execution_options(populate_existing=True)
        ).first()
        if trial is None:
            return None
        fresh = trial.attempts == 0
        if fresh and study.n_trials is not None and study.n_started >= study.n_trials:
            return None
        attempt = max(trial.attempts, 1)
        won = guarded_update(
            s,
            Trial,
            [Trial.id == trial.id, Trial.state == TrialState.WAITING, Trial.attempts == trial.attempts],
            {
                "state": TrialState.RUNNING,
                "attempts": attempt,
                "worker_id": req.worker_id,
                "started_at": aware(trial.started_at) or now,
                # The trial shows its current attempt's outcome; earlier attempts' reasons
                # stay in tf_leases.stop_reason (the detail's attempt list).
                "failure_reason": None,
                "failure_message": None,
                "failure_traceback": None,
            },
        )
        if not won:
            return None
        expires = now + self.lease_timeout
        lease = Lease(
            id=str(uuid.uuid4()),
            trial_id=trial.id,
            study_id=study.id,
            attempt=attempt,
            worker_id=req.worker_id,
            token_id=token_id,
            slot=req.slot,
            state=LeaseState.ACTIVE,
            granted_at=now,
            expires_at=expires,
        )
        s.add(lease)
        guarded_update(
            s,
            Study,
            [Study.id == study.id],
            {"n_running": Study.n_running + 1, "n_started": Study.n_started + (1 if fresh else 0)},
        )
        return _Claimed(
            lease_id=lease.id,
            study_id=study.id,
            trial_id=trial.id,
            directions=[str(d) for d in study.directions],
            study_name=study.name,
            number=trial.number,
            optuna_trial_id=int(trial.optuna_trial_id),  # type: ignore[arg-type]
            attempt=attempt,
            expires_at=expires,
            trial_timeout_s=study.trial_timeout_s,
            params=dict(trial.params),
            spec_json=study.spec,
            objectives=list(study.objectives or []),
            resume=attempt > 1 and trial.checkpoint_path is not None,
            token_id=token_id,
        )

    def forget_spec(self, study_id: int) -> None:
        self._specs.pop(study_id, None)

    def _spec(self, study_id: int, spec_json: dict[str, Any]) -> StudySpec:
        spec = self._specs.get(study_id)
        if spec is None:
            from service.spec import StudySpec

            spec = self._specs[study_id] = StudySpec.model_validate(spec_json)
        return spec

    def _grant_message(self, c: _Claimed) -> LeaseGrant:
        from service.optuna_bridge import build_trial_config

        spec = self._spec(c.study_id, c.spec_json)
        objectives = c.objectives or [o.metric for o in spec.objectives]
        return LeaseGrant(
            lease_id=c.lease_id,
            study_id=c.study_id,
            study_name=c.study_name,
            trial_number=c.number,
            attempt=c.attempt,
            expires_at=c.expires_at,
            heartbeat_interval_s=self.settings.lease_timeout_s / 3,
            trial_timeout_s=c.trial_timeout_s,
            config=build_trial_config(spec, c.params),
            resume_checkpoint=c.resume,
            objectives=objectives,
        )

    # ================================================================== heartbeat

    def heartbeat(self, lease_id: str, req: HeartbeatRequest, principal: Principal | None = None) -> HeartbeatResponse:
        self.check_holder(lease_id, principal)
        return self.db.run(lambda s: self._heartbeat(s, lease_id, req))

    def _heartbeat(self, s: Session, lease_id: str, req: HeartbeatRequest) -> HeartbeatResponse:
        now = utcnow()
        expires = now + self.lease_timeout
        values: dict[str, Any] = {"expires_at": expires}
        if req.step is not None:
            values["last_step"] = req.step
        if not guarded_update(s, Lease, _live(lease_id, now), values):
            lease = _lease(s, lease_id)
            if lease is not None and lease.state == LeaseState.FINISHED:
                why = "trial pruned" if lease.stop_reason == PRUNED else "trial finished"
                return HeartbeatResponse(expires_at=aware(lease.expires_at) or now, stop=True, reason=why)
            raise _lost(lease, now)
        row = s.execute(
            select(Lease.granted_at, Study.status, Study.trial_timeout_s)
            .join(Study, Study.id == Lease.study_id)
            .where(Lease.id == lease_id)
        ).one()
        if row.status == StudyStatus.CANCELLED:
            return HeartbeatResponse(expires_at=expires, stop=True, reason="study cancelled")
        granted = aware(row.granted_at)
        limit = row.trial_timeout_s
        if limit is not None and granted is not None and past(granted, limit, now):
            return HeartbeatResponse(expires_at=expires, stop=True, reason="trial timeout")
        return HeartbeatResponse(expires_at=expires)

    # ================================================================== report

    def report(self, lease_id: str, req: ReportRequest, principal: Principal | None = None) -> ReportResponse:
        meta = self.check_holder(lease_id, principal)
        objective = meta.objectives[0] if meta.objectives else None
        if objective is not None and objective not in req.metrics:
            raise Invalid(f"metrics.{objective}", f"missing; the study optimises {objective!r}")
        answer = self.db.run(lambda s: self._report_tx(s, lease_id, meta, req, objective))
        if isinstance(answer, ReportResponse):
            return answer  # the server pruned this trial already
        expires, curve = answer
        prune = False
        if objective is not None and len(meta.directions) == 1 and meta.optuna_trial_id is not None:
            prune = self._should_prune(meta, req.step, float(req.metrics[objective]), curve)
        if prune:
            fin = self.db.run(lambda s: self._finish_tx(s, lease_id, PRUNED, None))
            self.sync(fin)
            if fin.state != TrialState.PRUNED:
                raise LeaseLost("the lease ended before the prune decision was recorded")
        return ReportResponse(prune=prune, expires_at=expires)

    def _report_tx(
        self, s: Session, lease_id: str, meta: _LeaseMeta, req: ReportRequest, objective: str | None
    ) -> tuple[datetime, dict[int, float]] | ReportResponse:
        now = utcnow()
        expires = now + self.lease_timeout
        # A report is proof of life too: it extends the lease like a heartbeat.
        if not guarded_update(s, Lease, _live(lease_id, now), {"expires_at": expires, "last_step": req.step}):
            lease = _lease(s, lease_id)
            if lease is not None and lease.state == LeaseState.FINISHED and lease.stop_reason == PRUNED:
                return ReportResponse(prune=True, expires_at=aware(lease.expires_at) or now)
            raise _lost(lease, now)
        dialect = postgresql if not is_sqlite(s) else sqlite
        s.execute(
            dialect.insert(TrialReport)
            .values(trial_id=meta.trial_id, attempt=meta.attempt, step=req.step, metrics=req.metrics, created_at=now)
            .on_conflict_do_nothing(index_elements=["trial_id", "attempt", "step"])
        )
        # This attempt's learning curve so far: what the pruner judges (tiny: one row per eval).
        curve: dict[int, float] = {}
        if objective is not None:
            rows = s.execute(
                select(TrialReport.step, TrialReport.metrics).where(
                    TrialReport.trial_id == meta.trial_id, TrialReport.attempt == meta.attempt
                )
            ).all()
            curve = {r.step: float(r.metrics[objective]) for r in rows if objective in r.metrics}
        return expires, curve

    def _should_prune(self, meta: _LeaseMeta, step: int, value: float, curve: dict[int, float]) -> bool:
        warm = self.warm.get(meta.study_id)
        assert meta.optuna_trial_id is not None
        try:
            # Optuna keeps the curve too: pruned trials are ranked by it (TPE) and complete
            # ones compared against (median pruner), and optuna-dashboard plots it.
            warm.study._storage.set_trial_intermediate_value(meta.optuna_trial_id, step, value)
        except UpdateFinishedTrialError:
            raise LeaseLost("the trial already finished") from None
        return warm.should_prune(meta.optuna_trial_id, meta.number, curve)

    # ================================================================== complete / fail

    def complete(self, lease_id: str, req: CompleteRequest, principal: Principal | None = None) -> FinishResponse:
        meta = self.check_holder(lease_id, principal)
        try:
            values = _objective_values(list(meta.objectives), req.metrics)
        except Invalid:
            if self._live_now(lease_id):
                raise
            values = None  # a lease that is not live gets its idempotent answer or 409 below
        fin = self.db.run(lambda s: self._finish_tx(s, lease_id, COMPLETE, values, complete=req))
        self.sync(fin)
        return FinishResponse(trial_number=fin.number, state=fin.state.value)

    def fail(self, lease_id: str, req: FailRequest, principal: Principal | None = None) -> FinishResponse:
        self.check_holder(lease_id, principal)
        fin = self.db.run(lambda s: self._finish_tx(s, lease_id, req.reason.value, None, fail=req))
        self.sync(fin)
        return FinishResponse(trial_number=fin.number, state=fin.state.value)

    def _finish_tx(
        self,
        s: Session,
        lease_id: str,
        outcome: str,
        values: list[float] | None,
        *,
        complete: CompleteRequest | None = None,
        fail: FailRequest | None = None,
    ) -> Finished:
        """End the lease with `outcome` (complete, pruned, or a failure reason)."""
        now = utcnow()
        row = s.execute(
            update(Lease)
            .where(*_live(lease_id, now))
            .values(state=LeaseState.FINISHED, stop_reason=outcome)
            .returning(Lease.id, Lease.study_id, Lease.trial_id, Lease.attempt, Lease.granted_at, Lease.last_step)
            .execution_options(synchronize_session=False)
        ).first()
        late: Finished | None = None
        if row is None:
            late_ok = (outcome == COMPLETE and values is not None) or fail is not None
            taken = self._take_late(s, lease_id, outcome) if late_ok else None
            if taken is None:
                return self._answer_finished(s, lease_id, outcome, now)
            lease, late = taken
        else:
            lease = LeaseRef(row.id, row.study_id, row.trial_id, row.attempt, aware(row.granted_at), row.last_step)
        fin = self._record_outcome(s, lease, outcome, values, now, complete=complete, fail=fail)
        if late is not None:
            fin.late_attempt, fin.discard_optuna_trial_id = late.late_attempt, late.discard_optuna_trial_id
            fin.params = fin.params or late.params
        return fin

    def _take_late(self, s: Session, lease_id: str, outcome: str) -> tuple[LeaseRef, Finished | None] | None:
        """A complete or fail from a lease that is no longer live, accepted when nothing
        has replaced its attempt yet: the lease is past its expiry but not taken back, or
        the reaper took it back and scheduled a retry that no worker has started. The
        worker's finished work counts; the retry is dropped. None: refuse as before.

        The lease is ended with `outcome` (its `expired` stop reason no longer counts
        against max_retries) and the trial is RUNNING on the lease's attempt again, so
        the normal finishing path records the outcome and moves the counters.
        """
        lease = _lease(s, lease_id)
        if lease is None or lease.state == LeaseState.FINISHED:
            return None
        if lease.stop_reason == RELEASED:
            return None  # an admin took it back on purpose (release.py): its results no longer count
        was_expired = lease.state == LeaseState.EXPIRED
        row = s.execute(
            update(Lease)
            .where(Lease.id == lease_id, Lease.state == lease.state)
            .values(state=LeaseState.FINISHED, stop_reason=outcome)
            .returning(Lease.id, Lease.study_id, Lease.trial_id, Lease.attempt, Lease.granted_at, Lease.last_step)
            .execution_options(synchronize_session=False)
        ).first()
        if row is None:
            return None  # the reaper or a repeat got there first
        ref = LeaseRef(row.id, row.study_id, row.trial_id, row.attempt, aware(row.granted_at), row.last_step)
        if not was_expired:
            return ref, None  # still the trial's attempt (the reaper has not run): finish it normally
        q = select(Trial.optuna_trial_id, Trial.number, Trial.params).where(
            Trial.id == ref.trial_id, Trial.state == TrialState.WAITING, Trial.attempts == ref.attempt + 1
        )
        if not is_sqlite(s):
            q = q.with_for_update()
        retry = s.execute(q).first()
        if retry is None:
            raise _lost(lease, utcnow())  # the retry runs or the trial ended: this result is too late
        back = guarded_update(
            s,
            Trial,
            [
                Trial.id == ref.trial_id,
                Trial.state == TrialState.WAITING,
                Trial.attempts == ref.attempt + 1,
                Trial.optuna_trial_id.is_(None)
                if retry.optuna_trial_id is None
                else Trial.optuna_trial_id == retry.optuna_trial_id,
            ],
            {"state": TrialState.RUNNING, "attempts": ref.attempt, "optuna_trial_id": None},
        )
        if not back:
            raise _lost(lease, utcnow())
        # The reaper took the attempt out of n_running; the finishing path takes it out again.
        guarded_update(s, Study, [Study.id == ref.study_id], {"n_running": Study.n_running + 1})
        late = Finished(ref.study_id, ref.trial_id, retry.number, TrialState.RUNNING, None)
        late.late_attempt, late.discard_optuna_trial_id = ref.attempt, retry.optuna_trial_id
        late.params = dict(retry.params)
        log.info(
            "lease %s: result %r accepted after the lease expired; its retry (attempt %d) is dropped",
            lease_id,
            outcome,
            ref.attempt + 1,
        )
        return ref, late

    def _record_outcome(
        self,
        s: Session,
        lease: LeaseRef,
        outcome: str,
        values: list[float] | None,
        now: datetime,
        *,
        complete: CompleteRequest | None,
        fail: FailRequest | None,
    ) -> Finished:
        if outcome == COMPLETE:
            assert complete is not None and values is not None
            fin = self._end_trial(
                s,
                lease,
                TrialState.COMPLETE,
                now,
                {
                    "values": values,
                    "value": values[0],
                    "metrics": dict(complete.metrics),
                    "duration_s": complete.duration_s,
                    "last_step": complete.step,
                    # A late result replaces the `expired` its attempt was given.
                    "failure_reason": None,
                    "failure_message": None,
                    "failure_traceback": None,
                },
                counter="n_complete",
                best=values[0],
            )
            fin.values = values
            return fin
        if outcome == PRUNED:
            return self._end_trial(s, lease, TrialState.PRUNED, now, {}, counter="n_pruned")
        assert fail is not None
        return self.fail_trial(s, lease, outcome, fail.message, fail.traceback, fail.step, now)

    def _answer_finished(self, s: Session, lease_id: str, outcome: str, now: datetime) -> Finished:
        """The lease is not live: answer a repeat from its holder, refuse anyone else."""
        lease = _lease(s, lease_id)
        if lease is None or lease.state != LeaseState.FINISHED:
            raise _lost(lease, now)
        trial = s.get(Trial, lease.trial_id, populate_existing=True)
        assert trial is not None
        fin = Finished(lease.study_id, trial.id, trial.number, trial.state, trial.optuna_trial_id)
        if lease.stop_reason == PRUNED:
            fin.state = TrialState.PRUNED
            return fin
        if lease.stop_reason == COMPLETE:
            if outcome != COMPLETE:
                raise Conflict("this lease already completed the trial; it cannot fail it now")
            fin.values = trial.values
            return fin
        # The lease ended with a failure.
        if outcome == COMPLETE:
            raise Conflict(f"this lease already failed the trial ({lease.stop_reason}); it cannot complete it now")
        fin.optuna_trial_id = None  # told FAIL by the first call (or the reaper's sweep does it)
        if trial.attempts > lease.attempt:
            # A retry was scheduled; the trial may be running again under another lease.
            fin.state = TrialState.WAITING
            unattached = trial.state == TrialState.WAITING and trial.optuna_trial_id is None
            if unattached and trial.attempts == lease.attempt + 1:
                fin.retry_attempt = trial.attempts
                fin.params = dict(trial.params)
        return fin

    def _end_trial(
        self,
        s: Session,
        lease: LeaseRef,
        state: TrialState,
        now: datetime,
        values: dict[str, Any],
        *,
        counter: str,
        best: float | None = None,
    ) -> Finished:
        """RUNNING -> a finished state for the lease's attempt, with the study counters."""
        if values.get("duration_s") is None and lease.granted_at is not None:
            values["duration_s"] = (now - lease.granted_at).total_seconds()  # this attempt's run time
        trial = s.execute(
            update(Trial)
            .where(Trial.id == lease.trial_id, Trial.state == TrialState.RUNNING, Trial.attempts == lease.attempt)
            .values(state=state, finished_at=now, **values)
            .returning(Trial.number, Trial.optuna_trial_id)
            .execution_options(synchronize_session=False)
        ).first()
        if trial is None:
            raise LeaseLost("the trial is no longer held by this lease")
        study = s.execute(
            update(Study)
            .where(Study.id == lease.study_id)
            .values({"n_running": Study.n_running - 1, counter: getattr(Study, counter) + 1})
            .returning(Study.status, Study.n_running, Study.n_started, Study.n_trials, Study.directions)
            .execution_options(synchronize_session=False)
        ).one()
        if best is not None and len(study.directions) == 1:
            better = Study.best_value < best if is_maximize(study.directions[0]) else Study.best_value > best
            guarded_update(
                s,
                Study,
                [Study.id == lease.study_id, Study.best_value.is_(None) | better],
                {"best_value": best, "best_trial_number": trial.number},
            )
        self._maybe_complete_study(s, lease.study_id, study, now)
        return Finished(lease.study_id, lease.trial_id, trial.number, state, trial.optuna_trial_id)

    def fail_trial(
        self,
        s: Session,
        lease: LeaseRef,
        reason: str,
        message: str | None,
        traceback: str | None,
        step: int | None,
        now: datetime,
    ) -> Finished:
        """The lease's attempt failed (or its lease expired): retry or fail for good.

        The lease is already finished/expired with stop_reason=reason in this
        transaction, so the counts below include this attempt.
        """
        study = s.get(Study, lease.study_id, populate_existing=True)
        assert study is not None
        retry = self._retry_allowed(s, study, lease.trial_id, reason, now)
        failure: dict[str, Any] = {
            "failure_reason": reason,
            "failure_message": message or None,
            "failure_traceback": traceback,
        }
        if step is not None:
            failure["last_step"] = step
        if not retry:
            fin = self._end_trial(s, lease, TrialState.FAILED, now, failure, counter="n_failed")
        else:
            old_optuna_id = s.scalar(select(Trial.optuna_trial_id).where(Trial.id == lease.trial_id))
            trial = s.execute(
                update(Trial)
                .where(Trial.id == lease.trial_id, Trial.state == TrialState.RUNNING, Trial.attempts == lease.attempt)
                .values(state=TrialState.WAITING, attempts=lease.attempt + 1, optuna_trial_id=None, **failure)
                .returning(Trial.number, Trial.params)
                .execution_options(synchronize_session=False)
            ).first()
            if trial is None:
                raise LeaseLost("the trial is no longer held by this lease")
            guarded_update(s, Study, [Study.id == study.id], {"n_running": Study.n_running - 1})
            fin = Finished(study.id, lease.trial_id, trial.number, TrialState.WAITING, old_optuna_id)
            fin.retry_attempt = lease.attempt + 1
            fin.params = dict(trial.params)
        fin.reason, fin.message = reason, message
        return fin

    @staticmethod
    def _retry_allowed(s: Session, study: Study, trial_id: int, reason: str, now: datetime) -> bool:
        if study.status != StudyStatus.RUNNING or timed_out(study, now):
            return False
        if reason in sync.CONSTRAINT_REASONS:
            return False
        ended = select(func.count()).where(Lease.trial_id == trial_id)
        if reason in UNCOUNTED_REASONS:
            return int(s.scalar(ended.where(Lease.stop_reason.in_(UNCOUNTED_REASONS))) or 0) <= MAX_PREEMPTIONS
        counted = int(s.scalar(ended.where(Lease.stop_reason.in_(COUNTED_REASONS))) or 0)
        return counted <= study.max_retries

    @staticmethod
    def _maybe_complete_study(s: Session, study_id: int, counts: Any, now: datetime) -> None:
        """running -> completed once the budget is spent and nothing runs or waits for a retry.

        `counts` comes back from our counter UPDATE, so we hold the study row lock
        (PostgreSQL) or the write lock (SQLite): they are the latest. Fresh waiting rows
        (pre-asked, or enqueued beyond the budget) cannot run any more; the reaper drops
        them and fails their Optuna trials.
        """
        if counts.status != StudyStatus.RUNNING or counts.n_running > 0:
            return
        if counts.n_trials is None or counts.n_started < counts.n_trials:
            return
        waiting = s.scalar(
            select(Trial.id)
            .where(Trial.study_id == study_id, Trial.state == TrialState.WAITING, Trial.attempts > 0)
            .limit(1)
        )
        if waiting is None:
            guarded_update(
                s,
                Study,
                [Study.id == study_id, Study.status == StudyStatus.RUNNING, Study.n_running == 0],
                {"status": StudyStatus.COMPLETED, "finished_at": now},
            )

    # ================================================================== Optuna sync

    def sync(self, fin: Finished) -> None:
        """Apply a committed outcome to Optuna (idempotent; the reaper repairs a crash here)."""
        if fin.late_attempt is not None:
            self._sync_late(fin)
        need_warm = fin.optuna_trial_id is not None or fin.retry_attempt is not None
        if not need_warm:
            return
        warm = self.warm.get(fin.study_id)
        if fin.optuna_trial_id is not None:
            if fin.state == TrialState.COMPLETE and fin.values is not None:
                sync.tell_complete(warm, fin.optuna_trial_id, fin.values)
            elif fin.state == TrialState.PRUNED:
                sync.tell_pruned(warm, fin.optuna_trial_id)
            elif fin.state in (TrialState.FAILED, TrialState.WAITING):
                sync.tell_failed(warm, fin.optuna_trial_id, fin.reason or "error", fin.message)
        if fin.retry_attempt is not None:
            self.attach_retry(warm, fin.trial_id, fin.number, fin.retry_attempt, fin.optuna_trial_id, fin.params)

    def _sync_late(self, fin: Finished) -> None:
        """Optuna's side of a late result: the dropped retry's trial is discarded, and the
        result gets a trial of its own (the attempt's first one was told FAIL at expiry,
        and a finished Optuna trial cannot change). A crash in between leaves the retry's
        trial RUNNING with no row holding it, which the reaper's repair sweep discards."""
        assert fin.late_attempt is not None
        warm = self.warm.get(fin.study_id)
        if fin.discard_optuna_trial_id is not None:
            self.sampled.discard(fin.discard_optuna_trial_id)
            sync.discard(warm, fin.discard_optuna_trial_id, "not needed: the attempt before it finished after all")
        carried = fin.state == TrialState.COMPLETE or (
            fin.state == TrialState.FAILED and fin.reason in sync.CONSTRAINT_REASONS
        )
        if not carried or fin.optuna_trial_id is not None:
            return
        new_id = sync.create_retry(
            warm, tf_number=fin.number, attempt=fin.late_attempt, previous_optuna_trial_id=None, params=fin.params
        )
        attempt = fin.late_attempt

        def _link(s: Session) -> int:
            return guarded_update(
                s,
                Trial,
                [Trial.id == fin.trial_id, Trial.attempts == attempt, Trial.optuna_trial_id.is_(None)],
                {"optuna_trial_id": new_id},
            )

        if not self.db.run(_link):
            sync.discard(warm, new_id, "a late result's trial, linked elsewhere")
            return
        # The normal path below tells it the outcome.
        fin.optuna_trial_id = new_id

    def attach_retry(
        self, warm: Any, trial_id: int, number: int, attempt: int, previous: int | None, params: dict[str, Any]
    ) -> bool:
        new_id = sync.create_retry(
            warm, tf_number=number, attempt=attempt, previous_optuna_trial_id=previous, params=params
        )

        def _attach(s: Session) -> int:
            return guarded_update(
                s,
                Trial,
                [
                    Trial.id == trial_id,
                    Trial.state == TrialState.WAITING,
                    Trial.attempts == attempt,
                    Trial.optuna_trial_id.is_(None),
                ],
                {"optuna_trial_id": new_id},
            )

        if not self.db.run(_attach):
            sync.discard(warm, new_id, "retry attached elsewhere or no longer wanted")
            return False
        self.buffer.wake()
        return True

    # ================================================================== helpers

    def _live_now(self, lease_id: str) -> bool:
        with self.db.scope() as s:
            return s.scalar(select(Lease.id).where(*_live(lease_id, utcnow()))) is not None

    def _remember(self, lease_id: str, meta: _LeaseMeta) -> None:
        with self._leases_lock:
            self._leases[lease_id] = meta
            if len(self._leases) > _LEASE_CACHE:
                self._leases.popitem(last=False)

    def check_holder(self, lease_id: str, principal: Principal | None) -> _LeaseMeta:
        """Refuse (403, nothing changed) a caller whose token did not take the lease.

        `principal` None is an in-process caller (tests, tools), trusted. A lease with no
        token (granted before migration 0002, or with auth disabled) is open to any
        worker token, as before. Admins are not holders either: they release a lease
        (`release.py`) instead of acting as its worker.
        """
        meta = self._meta(lease_id)
        if principal is not None and meta.token_id is not None and meta.token_id != principal.token_id:
            raise Forbidden(
                f"lease {lease_id} was granted to another token; only its holder may use it", field="lease_id"
            )
        return meta

    def _meta(self, lease_id: str) -> _LeaseMeta:
        """What never changes about a lease, cached: the hot calls skip a read."""
        meta = self._leases.get(lease_id)
        if meta is not None:
            return meta
        with self.db.scope() as s:
            row = s.execute(
                select(
                    Lease.study_id,
                    Lease.trial_id,
                    Lease.attempt,
                    Trial.number,
                    Trial.optuna_trial_id,
                    Trial.attempts,
                    Study.objectives,
                    Study.directions,
                    Lease.token_id,
                )
                .join(Trial, Trial.id == Lease.trial_id)
                .join(Study, Study.id == Lease.study_id)
                .where(Lease.id == lease_id)
            ).first()
        if row is None:
            raise LeaseLost(f"no lease {lease_id!r}: it was never granted, or its study was deleted")
        meta = _LeaseMeta(
            study_id=row.study_id,
            trial_id=row.trial_id,
            attempt=row.attempt,
            number=row.number,
            # The trial's Optuna trial belongs to this lease only while it is on this attempt.
            optuna_trial_id=row.optuna_trial_id if row.attempts == row.attempt else None,
            objectives=tuple(row.objectives or ()),
            directions=tuple(str(d) for d in row.directions),
            token_id=row.token_id,
        )
        if meta.optuna_trial_id is not None:
            self._remember(lease_id, meta)
        return meta


def _live(lease_id: str, now: datetime) -> list[Any]:
    return [Lease.id == lease_id, Lease.state == LeaseState.ACTIVE, Lease.expires_at > now]


def _lease(s: Session, lease_id: str) -> Lease | None:
    return s.get(Lease, lease_id, populate_existing=True)


def _lost(lease: Lease | None, now: datetime) -> LeaseLost:
    if lease is None:
        return LeaseLost("no such lease: it was never granted, or its study was deleted")
    if lease.state == LeaseState.ACTIVE:
        return LeaseLost(f"lease expired at {aware(lease.expires_at)}; the trial will be retried or has ended")
    if lease.state == LeaseState.EXPIRED:
        return LeaseLost("lease expired; the trial was taken back and retried or ended")
    return LeaseLost("lease already finished")


def _objective_values(objectives: list[str], metrics: dict[str, float]) -> list[float]:
    values: list[float] = []
    for name in objectives:
        if name not in metrics:
            raise Invalid(f"metrics.{name}", f"missing; the study optimises {name!r}")
        value = float(metrics[name])
        if not math.isfinite(value):
            raise Invalid(f"metrics.{name}", "must be a finite number; report a non-finite loss as fail(reason='nan')")
        values.append(value)
    return values


_SCHEDULERS_LOCK = threading.Lock()


def get_scheduler(ctx: ServiceContext) -> Scheduler:
    """The process's scheduler, kept on the context (built on first use)."""
    sched = ctx.extras.get("scheduler")
    if sched is None:
        with _SCHEDULERS_LOCK:
            sched = ctx.extras.get("scheduler")
            if sched is None:
                sched = ctx.extras["scheduler"] = Scheduler(ctx)
    assert isinstance(sched, Scheduler)
    return sched
