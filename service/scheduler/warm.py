"""Warm per-study Optuna state, kept for the life of the API process.

A fresh `optuna.load_study` reads every trial of the study on first use (6.8 s at
10,000 trials, DESIGN.md). One `WarmStudy` per active study keeps the loaded
`optuna.Study`: its `_CachedStorage` keeps finished trials in memory and re-reads
only unfinished and new ones, so an ask or a pruning decision costs about the same
at 10,000 trials as at 100. Several API processes each keep their own; the database
stays the only shared state, so they never disagree for longer than one re-read.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections.abc import Container, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from optuna.pruners import NopPruner, PercentilePruner, ThresholdPruner
from optuna.trial import FrozenTrial
from optuna.trial import TrialState as OptunaTrialState

from service.errors import NotFound

if TYPE_CHECKING:
    from service.context import ServiceContext
    from service.spec import StudySpec
    from trainer.config import TrialConfig

log = logging.getLogger(__name__)


def is_maximize(direction: Any) -> bool:
    """tf_studies.directions holds 'maximize'/'minimize' (or an Optuna StudyDirection)."""
    return str(getattr(direction, "name", direction)).lower().endswith("maximize")


# Pruners re-read the study's trials on every decision; other processes' completions may
# reach this process's pruner up to this late (its own are seen at once).
PRUNER_SNAPSHOT_TTL_S = 1.0
# Pruners that read only the trial's learning curve and the study's trials, never the
# trial's attributes: for them the trial is built from the curve we already hold.
_CURVE_ONLY_PRUNERS = (PercentilePruner, ThresholdPruner, NopPruner)  # MedianPruner is a PercentilePruner


class _PrunerStudy(optuna.Study):
    """The warm study as its pruner sees it: the trial list is refreshed at most every
    PRUNER_SNAPSHOT_TTL_S instead of on every report (a refresh re-reads every
    unfinished trial: about 7 queries, the bulk of a report's cost in plain Optuna).

    Shares everything else (storage, ids, pruner) with the warm study; Hyperband's
    bracket studies are built from it through the same storage and stay exact.
    """

    def __init__(self, base: optuna.Study) -> None:  # noqa: D107 - no super().__init__: nothing to load
        self.__dict__.update(base.__dict__)
        self._snapshot: list[FrozenTrial] = []
        self._taken = -math.inf
        self._snapshot_lock = threading.Lock()

    def invalidate(self) -> None:
        self._taken = -math.inf

    def _get_trials(
        self, deepcopy: bool = True, states: Container[OptunaTrialState] | None = None, use_cache: bool = False
    ) -> list[FrozenTrial]:
        if time.monotonic() - self._taken > PRUNER_SNAPSHOT_TTL_S:
            with self._snapshot_lock:
                if time.monotonic() - self._taken > PRUNER_SNAPSHOT_TTL_S:
                    taken = time.monotonic()
                    self._snapshot = self._storage.get_all_trials(self._study_id, deepcopy=False)
                    self._taken = taken
        trials = self._snapshot if states is None else [t for t in self._snapshot if t.state in states]
        return copy.deepcopy(trials) if deepcopy else list(trials)


class AskStudy(optuna.Study):
    """An `optuna.Study` that reads the study's trials once per ask.

    With the constant liar, TPE re-reads every trial for each sampler call of an ask
    (relative space, relative sample, each independent param), to see other workers'
    RUNNING trials as late as possible; each read re-loads every unfinished trial with
    its params and attributes. Here every read of one ask shares the first one (what
    Optuna does without the constant liar): other asks started within those few
    milliseconds are missed, the same as any ask that starts just before another.
    `ask()` and `tell()` reset the per-thread cache on entry, so nothing outlives a call.
    """

    def _get_trials(
        self, deepcopy: bool = True, states: Container[OptunaTrialState] | None = None, use_cache: bool = False
    ) -> list[FrozenTrial]:
        return super()._get_trials(deepcopy, states, use_cache=True)


# Asks of one study running at once in one process, each with its own sampler object
# (a sampler's caches are not thread-safe). Asks wait on the database about two thirds
# of their time, so a few overlap well even under the GIL.
MAX_ASKERS = 3


@dataclass
class WarmStudy:
    study_id: int
    optuna_name: str
    spec: StudySpec
    objectives: list[str]
    directions: list[str]
    study: optuna.Study

    _pruner_study: _PrunerStudy | None = field(default=None, init=False, repr=False)
    _free: list[optuna.Study] = field(default_factory=list, init=False, repr=False)
    _made: int = field(default=0, init=False, repr=False)
    _askers: threading.Condition = field(default_factory=threading.Condition, init=False, repr=False)

    @contextmanager
    def asker(self, *, blocking: bool) -> Iterator[optuna.Study | None]:
        """A study object to ask with, held by this thread; None when all are busy and
        not `blocking`. The first is `self.study`; the others share its storage and
        cache but have their own sampler (reseeded, so seeded random startup trials of
        parallel asks are not all the same point)."""
        study: optuna.Study | None = None
        create = False
        with self._askers:
            while study is None and not create:
                if self._free:
                    study = self._free.pop()
                elif self._made < MAX_ASKERS:
                    self._made += 1
                    create = True
                elif not blocking:
                    break
                else:
                    self._askers.wait()
        if create:
            study = self.study if self._made == 1 else self._new_asker()
        try:
            yield study
        finally:
            if study is not None:
                with self._askers:
                    self._free.append(study)
                    self._askers.notify()

    def _new_asker(self) -> optuna.Study:
        from service.optuna_bridge import make_pruner, make_sampler

        sampler = make_sampler(self.spec, parallel=self.spec.budget.max_parallel > 1)
        sampler.reseed_rng()
        return AskStudy(
            study_name=self.optuna_name, storage=self.study._storage, sampler=sampler, pruner=make_pruner(self.spec)
        )

    @property
    def multi_objective(self) -> bool:
        return len(self.directions) > 1

    @property
    def pruner_study(self) -> _PrunerStudy:
        if self._pruner_study is None:
            self._pruner_study = _PrunerStudy(self.study)
        return self._pruner_study

    def trial_finished(self) -> None:
        """This process told Optuna a trial's end: the pruner must see it from now on."""
        if self._pruner_study is not None:
            self._pruner_study.invalidate()

    def should_prune(self, optuna_trial_id: int, number: int, curve: dict[int, float]) -> bool:
        """The study pruner's decision for a running trial whose learning curve is `curve`."""
        study = self.pruner_study
        if isinstance(study.pruner, _CURVE_ONLY_PRUNERS):
            trial = FrozenTrial(
                number=number,
                state=OptunaTrialState.RUNNING,
                value=None,
                datetime_start=None,
                datetime_complete=None,
                params={},
                distributions={},
                user_attrs={},
                system_attrs={},
                intermediate_values=dict(curve),
                trial_id=optuna_trial_id,
            )
        else:
            # ASHA and Hyperband keep their rungs in the trial's system attributes.
            trial = study._storage.get_trial(optuna_trial_id)
        return bool(study.pruner.prune(study, trial))

    def trial_config(self, params: dict[str, Any]) -> TrialConfig:
        from service.optuna_bridge import build_trial_config

        return build_trial_config(self.spec, params)


# Sampler options whose size is paid on every ask, in memory and time, inside this
# process: TPE with n_ei_candidates=3,000,000 takes minutes and gigabytes per ask. Far
# above any useful value; a stored spec beyond them is refused when the study loads.
OPTION_LIMITS: dict[str, int] = {"n_ei_candidates": 10_000, "popsize": 10_000, "population_size": 10_000}


def check_servable(spec: StudySpec) -> None:
    """Refuse a stored spec this process must not run (ValueError): a resource bomb that
    a try/except around an ask cannot contain."""
    for key, limit in OPTION_LIMITS.items():
        value = spec.sampler.options.get(key)
        if isinstance(value, int | float) and not value <= limit:
            raise ValueError(f"sampler.options.{key} = {value!r} is above {limit}")


class WarmStudies:
    """Loaded studies of this process, by tf study id. Thread-safe."""

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self._studies: dict[int, WarmStudy] = {}
        self._lock = threading.Lock()
        # One lock per study while it loads, so concurrent first uses wait for one load.
        self._loading: dict[int, threading.Lock] = {}

    def get(self, study_id: int) -> WarmStudy:
        warm = self._studies.get(study_id)
        if warm is not None:
            return warm
        with self._lock:
            load_lock = self._loading.setdefault(study_id, threading.Lock())
        with load_lock:
            warm = self._studies.get(study_id)
            if warm is None:
                warm = self._load(study_id)
                with self._lock:
                    self._studies[study_id] = warm
                    self._loading.pop(study_id, None)
        return warm

    def peek(self, study_id: int) -> WarmStudy | None:
        return self._studies.get(study_id)

    def loaded(self) -> list[int]:
        return list(self._studies)

    def evict(self, study_id: int) -> None:
        with self._lock:
            self._studies.pop(study_id, None)

    def _load(self, study_id: int) -> WarmStudy:
        from service.models import Study
        from service.optuna_bridge import make_pruner, make_sampler, objective_metrics
        from service.spec import StudySpec

        with self._ctx.db.scope() as s:
            row = s.get(Study, study_id)
            if row is None:
                raise NotFound(f"no study with id {study_id}")
            optuna_name, spec_json = row.optuna_name, row.spec
            objectives = list(row.objectives or [])
            directions = [str(d) for d in row.directions]
        spec = StudySpec.model_validate(spec_json)
        check_servable(spec)
        # What optuna_bridge.load_optuna_study does, as an AskStudy.
        try:
            study = AskStudy(
                study_name=optuna_name,
                storage=self._ctx.storage,
                sampler=make_sampler(spec, parallel=spec.budget.max_parallel > 1),
                pruner=make_pruner(spec),
            )
        except KeyError:
            raise NotFound(f"no Optuna study named {optuna_name!r}") from None
        # Read every trial once now (the slow part), not on the first lease.
        study._get_trials(deepcopy=False, use_cache=False)
        log.info("warmed study %s (%s)", study_id, optuna_name)
        return WarmStudy(study_id, optuna_name, spec, objectives or objective_metrics(spec), directions, study)
