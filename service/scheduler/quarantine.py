"""One bad study never stops the scheduler.

The reaper, the buffer threads and the grant loop each work through many studies. A
study whose stored values the code cannot handle (a timeout of 1e300 seconds, a spec
that no longer validates, a search space Optuna rejects) must cost only that study:
its step is logged with the study id, the study is marked `failed` (the reason goes to
the log and to the Optuna study's user attribute `tf_failure_reason`), and the loop
goes on with the others.

This is the scheduler's one catch-all (`isolated`), the counterpart of the trial
boundary in the slot process: everything a per-study step can raise that is not the
database being away or a known domain answer is, by definition, something about that
study we did not foresee.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from optuna.exceptions import OptunaError
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from service.errors import DomainError, Invalid, Unavailable
from service.models import Study, StudyStatus
from service.scheduler._sql import guarded_update, utcnow

if TYPE_CHECKING:
    from service.scheduler.leases import Scheduler

log = logging.getLogger(__name__)

# Errors that say nothing about the study: the next pass tries it again.
TRANSIENT = (DBAPIError, DomainError, OptunaError)


@contextmanager
def isolated(sched: Scheduler, study_id: int, step: str) -> Iterator[None]:
    """Run one per-study `step`; an unforeseen error fails that study instead of the loop.

    The database being unreachable propagates (every study would fail the same way; the
    caller's pass ends and is retried). Other transient errors skip the study this time.
    """
    try:
        yield
    except (Unavailable, DBAPIError):
        raise
    except Invalid as exc:
        # A stored value the service refuses (the spec rules tightened since it was
        # stored, or it was written behind the API's back): it will not get better.
        fail_study(sched, study_id, step, exc)
    except TRANSIENT as exc:
        log.warning("study %s: %s failed, trying again later: %s", study_id, step, exc)
    except Exception as exc:  # noqa: BLE001 - the scheduler's one catch-all, see the module docstring
        fail_study(sched, study_id, step, exc)


def fail_study(sched: Scheduler, study_id: int, step: str, exc: BaseException) -> None:
    """Mark a running study `failed` because `step` raised `exc` on it."""
    # A refused stored value reads like a submission error; anything else names its type.
    reason = (f"{step}: {exc}" if isinstance(exc, Invalid) else f"{step}: {type(exc).__name__}: {exc}")[:500]
    log.error("study %s failed: %s", study_id, reason, exc_info=exc)
    # Its warm state and parsed spec may be what failed: nothing of it stays loaded.
    sched.warm.evict(study_id)
    sched.forget_spec(study_id)
    try:
        optuna_name = sched.db.run(lambda s: _mark_failed(s, study_id, reason))
    except (DBAPIError, DomainError) as db_exc:
        # The next pass meets the study again and retries this.
        log.warning("study %s: could not mark it failed: %s", study_id, db_exc)
        return
    if optuna_name is None:
        return
    try:
        storage = sched.ctx.storage
        storage.set_study_user_attr(storage.get_study_id_from_name(optuna_name), "tf_failure_reason", reason)
    except (DBAPIError, DomainError, OptunaError, KeyError) as attr_exc:
        log.warning("study %s: failure reason not recorded in Optuna: %s", study_id, attr_exc)


def _mark_failed(s: Session, study_id: int, reason: str) -> str | None:
    won = guarded_update(
        s,
        Study,
        [Study.id == study_id, Study.status == StudyStatus.RUNNING],
        {"status": StudyStatus.FAILED, "status_reason": reason, "finished_at": utcnow()},
    )
    if not won:
        return None
    return s.scalar(select(Study.optuna_name).where(Study.id == study_id))
