"""Fixtures for scheduler tests: studies made through `service.studies`, a scheduler, and
a check that tf_studies counters match the rows.

- `principal`: alice, a user.
- `make_study(**budget)`: a running study (named MiniLM + tweets, 4 searched knobs,
  accuracy maximised, median pruner); keyword arguments go into `budget`,
  `spec=` replaces other top-level fields.
- `sched`: the context's `Scheduler` (no background threads: tests drive it).
- `check_counters(study_id)`: asserts the study's counters against its trial rows.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from sched_test_helpers import BASE_SPEC
from sqlalchemy import func, select

from service import auth, studies
from service.auth import Principal
from service.context import ServiceContext
from service.models import Role, Study, Trial, TrialState
from service.scheduler import Scheduler, get_scheduler


@pytest.fixture
def principal(ctx: ServiceContext) -> Principal:
    user_id = auth.ensure_user(ctx.db, "alice")
    return Principal(token_id=None, name="alice", owner="alice", role=Role.USER, user_id=user_id)


@pytest.fixture
def make_study(ctx: ServiceContext, principal: Principal) -> Callable[..., int]:
    counter = iter(range(1000))

    def make(spec: dict[str, Any] | None = None, **budget: Any) -> int:
        data = copy.deepcopy(BASE_SPEC)
        data["name"] = f"sched-{next(counter)}"
        data.update(copy.deepcopy(spec or {}))
        data["budget"] = {**data["budget"], **budget}
        return studies.create_study(ctx, principal, data).id

    return make


@pytest.fixture
def sched(ctx: ServiceContext) -> Scheduler:
    return get_scheduler(ctx)


@pytest.fixture
def check_counters(ctx: ServiceContext) -> Callable[[int], Study]:
    def check(study_id: int) -> Study:
        with ctx.db.scope() as s:
            study = s.get(Study, study_id)
            assert study is not None
            by_state = dict(
                s.execute(
                    select(Trial.state, func.count()).where(Trial.study_id == study_id).group_by(Trial.state)
                ).all()
            )
            started = s.scalar(select(func.count()).where(Trial.study_id == study_id, Trial.attempts > 0))
        assert study.n_running == by_state.get(TrialState.RUNNING, 0), (study.n_running, by_state)
        assert study.n_complete == by_state.get(TrialState.COMPLETE, 0), (study.n_complete, by_state)
        assert study.n_pruned == by_state.get(TrialState.PRUNED, 0), (study.n_pruned, by_state)
        assert study.n_failed == by_state.get(TrialState.FAILED, 0), (study.n_failed, by_state)
        assert study.n_started == started, (study.n_started, started)
        return study

    return check
