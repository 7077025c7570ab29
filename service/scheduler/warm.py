"""Warm per-study Optuna state, kept for the life of the API process.

A fresh `optuna.load_study` reads every trial of the study on first use (6.8 s at
10,000 trials, DESIGN.md). One `WarmStudy` per active study keeps the loaded
`optuna.Study`: its `_CachedStorage` keeps finished trials in memory and re-reads
only unfinished and new ones, so an ask or a pruning decision costs about the same
at 10,000 trials as at 100. Several API processes each keep their own; the database
stays the only shared state, so they never disagree for longer than one re-read.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna

from service.errors import NotFound

if TYPE_CHECKING:
    from service.context import ServiceContext
    from service.spec import StudySpec
    from trainer.config import TrialConfig

log = logging.getLogger(__name__)


def is_maximize(direction: Any) -> bool:
    """tf_studies.directions holds 'maximize'/'minimize' (or an Optuna StudyDirection)."""
    return str(getattr(direction, "name", direction)).lower().endswith("maximize")


@dataclass
class WarmStudy:
    study_id: int
    optuna_name: str
    spec: StudySpec
    objectives: list[str]
    directions: list[str]
    study: optuna.Study
    # The sampler keeps caches (search space, RNG) that are not thread-safe: one ask at a time.
    ask_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def multi_objective(self) -> bool:
        return len(self.directions) > 1

    def trial_config(self, params: dict[str, Any]) -> TrialConfig:
        from service.optuna_bridge import build_trial_config

        return build_trial_config(self.spec, params)


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
        from service.optuna_bridge import load_optuna_study, objective_metrics
        from service.spec import StudySpec

        with self._ctx.db.scope() as s:
            row = s.get(Study, study_id)
            if row is None:
                raise NotFound(f"no study with id {study_id}")
            optuna_name, spec_json = row.optuna_name, row.spec
            objectives = list(row.objectives or [])
            directions = [str(d) for d in row.directions]
        spec = StudySpec.model_validate(spec_json)
        study = load_optuna_study(spec, self._ctx.storage, optuna_name)
        # Read every trial once now (the slow part), not on the first lease.
        study._get_trials(deepcopy=False, use_cache=False)
        log.info("warmed study %s (%s)", study_id, optuna_name)
        return WarmStudy(study_id, optuna_name, spec, objectives or objective_metrics(spec), directions, study)
