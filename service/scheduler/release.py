"""An admin takes a lease back from its worker (`POST /api/v1/leases/{id}/release`).

For a worker that is stuck, lost its token, or should not hold work: the lease ends
like an expiry that does not wait for `expires_at`. The lease becomes EXPIRED with
stop_reason `released`, so its holder's next call gets 409 (stop, send nothing
more), and the attempt fails with reason `released`: retried like a preemption (not
the trial's fault, so max_retries is spared; `released` and `preempted` together are
capped by MAX_PREEMPTIONS), never once the study is cancelled or out of time.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.errors import Conflict, NotFound
from service.models import Lease, LeaseState, Trial, TrialState
from service.scheduler._sql import aware, utcnow
from service.scheduler.leases import RELEASED, Finished, LeaseRef, Scheduler
from trainer.protocol import FinishResponse


def release(sched: Scheduler, lease_id: str) -> FinishResponse:
    """End an active lease now; `state` says whether the trial waits for a retry or failed."""
    fin = sched.db.run(lambda s: _release(sched, s, lease_id))
    sched.sync(fin)
    return FinishResponse(trial_number=fin.number, state=fin.state.value)


def _release(sched: Scheduler, s: Session, lease_id: str) -> Finished:
    now = utcnow()
    # The same guarded transition as the reaper's expiry, without the expires_at bound:
    # whichever of the two (or the holder's complete/fail) runs first wins, once.
    row = s.execute(
        update(Lease)
        .where(Lease.id == lease_id, Lease.state == LeaseState.ACTIVE)
        .values(state=LeaseState.EXPIRED, stop_reason=RELEASED)
        .returning(Lease.study_id, Lease.trial_id, Lease.attempt, Lease.granted_at, Lease.last_step, Lease.worker_id)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        lease = s.get(Lease, lease_id)
        if lease is None:
            raise NotFound(f"no lease {lease_id!r}", field="lease_id")
        raise Conflict(
            f"lease {lease_id} is {lease.state.value} ({lease.stop_reason}); only an active lease can be released",
            field="lease_id",
        )
    trial = s.execute(
        select(Trial.number, Trial.state, Trial.optuna_trial_id).where(
            Trial.id == row.trial_id, Trial.state == TrialState.RUNNING, Trial.attempts == row.attempt
        )
    ).first()
    if trial is None:
        # Nothing runs under this lease any more (its trial was ended server-side): ending
        # the lease is all there is to do.
        current = s.execute(select(Trial.number, Trial.state).where(Trial.id == row.trial_id)).one()
        return Finished(row.study_id, row.trial_id, current.number, current.state, None)
    lease = LeaseRef(lease_id, row.study_id, row.trial_id, row.attempt, aware(row.granted_at), row.last_step)
    message = f"lease released by an admin (worker {row.worker_id!r}, attempt {row.attempt})"
    return sched.fail_trial(s, lease, RELEASED, message, None, row.last_step, now)
