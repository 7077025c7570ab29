"""Studies: create, list, get, cancel, delete, enqueue configurations, warm start.

A study is a `tf_studies` row plus an Optuna study on the same database. The two
live behind different engines (Optuna's storage has its own), so they cannot share
one transaction; instead every write orders its steps so that a failure leaves
nothing half-made:

- create: validate and check the name first (read only), create the Optuna study,
  then insert the row; if anything after the Optuna study fails, it is deleted.
- delete: delete the row first (one transaction, cascading to trials, leases and
  reports), then the Optuna study. A crash in between leaves only an Optuna study
  nobody points at, never a row pointing at nothing.
- enqueue: validate, add WAITING trials to Optuna (what `study.enqueue_trial` does,
  but keeping the trial ids), then insert their `tf_trials` rows in WAITING; if
  the insert fails the Optuna trials are marked FAIL so `ask()` never hands them out.

On SQLite the order matters twice over: a session holding the write lock while
Optuna's engine writes would wait on itself, so no tf write is open during an
Optuna write.

Enqueued configurations (warm start included) are WAITING trials in Optuna that
the scheduler's `study.ask()` pops first, with matching WAITING `tf_trials` rows
(same study and number): the scheduler moves that row to RUNNING instead of
inserting a new one.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from optuna.exceptions import DuplicatedStudyError
from optuna.study import StudyDirection
from optuna.trial import TrialState as OptunaTrialState
from optuna.trial import create_trial
from pydantic import ValidationError
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, selectinload

from service import auth, optuna_bridge
from service.auth import Principal
from service.context import ServiceContext
from service.db import Database
from service.errors import Conflict, Invalid, NotFound, Unavailable
from service.models import Study, StudyStatus, Trial, TrialState, utcnow
from service.paths import resolve_spec_paths
from service.schemas import (
    MAX_DB_INT,
    MAX_PAGE,
    BestTrials,
    EnqueueResult,
    StateCounts,
    StudiesPublic,
    StudyCreated,
    StudyDetail,
    StudyPublic,
    TrialSummary,
)
from service.spec import StudySpec, check_spec, validation_messages

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- helpers


def check_page(limit: int, offset: int, max_limit: int = MAX_PAGE) -> None:
    if not 1 <= limit <= max_limit:
        raise Invalid("limit", f"must be between 1 and {max_limit}")
    if not 0 <= offset <= MAX_DB_INT:
        raise Invalid("offset", f"must be between 0 and {MAX_DB_INT}")


def visible_study(s: Session, principal: Principal, study_id: int) -> Study:
    """The study if the caller may see it. Another user's study is "not found", not
    "forbidden": its existence is not the caller's business."""
    study = s.get(Study, study_id)
    if study is None or not auth.owns(principal, study.owner_id):
        raise NotFound(f"study {study_id} not found", field="study_id")
    return study


def _direction_names(spec: StudySpec) -> list[str]:
    names: list[str] = []
    for d in optuna_bridge.directions(spec):
        names.append(d.name.lower() if isinstance(d, StudyDirection) else str(d).lower())
    return names


@contextlib.contextmanager
def _optuna_errors() -> Iterator[None]:
    """Optuna's storage talks to the database through its own engine: translate its
    failures like `Database.scope` does ours."""
    try:
        yield
    except DuplicatedStudyError as exc:
        raise Conflict("an Optuna study with this name exists already; submit again", field="name") from exc
    except DBAPIError as exc:
        raise Unavailable(f"database unavailable: {exc.orig}") from exc


def _drop_optuna_study(storage: BaseStorage, optuna_name: str) -> None:
    try:
        study_id = storage.get_study_id_from_name(optuna_name)
        storage.delete_study(study_id)
    except KeyError:
        return  # already gone
    except DBAPIError:
        # The tf row is gone or was never made, so nothing points at this study; it is
        # harmless garbage that a later `optuna delete-study` can remove.
        log.warning("could not delete Optuna study %r", optuna_name, exc_info=True)


def _enqueue_in_optuna(
    storage: BaseStorage, optuna_name: str, configs: Sequence[dict[str, Any]]
) -> list[tuple[int, int]]:
    """Add WAITING trials with fixed params (what `Study.enqueue_trial` does) and return
    their (trial_id, number); enqueue_trial itself does not say which trial it made."""
    made: list[tuple[int, int]] = []
    with _optuna_errors():
        study_id = storage.get_study_id_from_name(optuna_name)
        for params in configs:
            template = create_trial(state=OptunaTrialState.WAITING, system_attrs={"fixed_params": params})
            trial_id = storage.create_new_trial(study_id, template_trial=template)
            made.append((trial_id, storage.get_trial_number_from_id(trial_id)))
    return made


def _fail_optuna_trials(storage: BaseStorage, trial_ids: Sequence[int]) -> None:
    for trial_id in trial_ids:
        try:
            storage.set_trial_state_values(trial_id, state=OptunaTrialState.FAIL)
        except DBAPIError:
            log.warning("could not mark Optuna trial %s failed", trial_id, exc_info=True)


def _best_order(study: Study) -> Any:
    first = (study.directions or ["minimize"])[0]
    return Trial.value.desc() if first == "maximize" else Trial.value.asc()


def _best_trial(s: Session, study: Study) -> Trial | None:
    return s.scalars(
        select(Trial)
        .where(Trial.study_id == study.id, Trial.state == TrialState.COMPLETE, Trial.value.is_not(None))
        .order_by(_best_order(study), Trial.number)
        .limit(1)
    ).first()


def _counts(s: Session, study_id: int) -> StateCounts:
    rows = s.execute(
        select(Trial.state, func.count()).where(Trial.study_id == study_id).group_by(Trial.state)
    ).all()
    return StateCounts(**{TrialState(state).value: n for state, n in rows})


def _detail(s: Session, study: Study) -> StudyDetail:
    best = _best_trial(s, study) if len(study.directions) == 1 else None
    return StudyDetail(
        **StudyPublic.model_validate(study).model_dump(),
        spec=study.spec,
        counts=_counts(s, study.id),
        best_trial=TrialSummary.model_validate(best) if best is not None else None,
    )


# ---------------------------------------------------------------------------- create


def parse_spec(data: Any) -> StudySpec:
    """Validate a submitted spec, reporting every schema problem with the same field
    names as `tuneforge study submit` does locally (`spec.validation_messages`)."""
    try:
        return StudySpec.model_validate(data)
    except ValidationError as exc:
        (field, reason), *more = validation_messages(exc) or [("spec", "invalid study spec")]
        raise Invalid(field, reason, more=more) from None


def _warm_start_configs(s: Session, principal: Principal, spec: StudySpec, owner_id: int) -> list[dict[str, Any]]:
    """Params of the best COMPLETE trials of another of the owner's studies, cut down to
    the new search space; a configuration the new space does not admit is skipped."""
    ws = spec.warm_start_from
    if ws is None:
        return []
    field = "warm_start_from.study"
    source: Study | None = None
    if isinstance(ws.study, int):
        if 1 <= ws.study <= MAX_DB_INT:  # a bigger id cannot exist, and would overflow the query
            source = s.get(Study, ws.study)
        if source is not None and not auth.owns(principal, source.owner_id):
            source = None  # another user's study: not found, as everywhere
    else:
        source = s.scalars(select(Study).where(Study.owner_id == owner_id, Study.name == ws.study)).first()
    if source is None:
        raise NotFound(f"you have no study {ws.study!r} to warm-start from", field=field)
    if len(source.directions) != 1:
        raise Invalid(field, "warm start needs a single-objective source study")
    rows = s.scalars(
        select(Trial.params)
        .where(Trial.study_id == source.id, Trial.state == TrialState.COMPLETE, Trial.value.is_not(None))
        .order_by(_best_order(source), Trial.number)
        .limit(ws.n_best)
    ).all()
    configs: list[dict[str, Any]] = []
    for params in rows:
        candidate = {k: v for k, v in params.items() if k in spec.search_space}
        if not candidate:
            continue
        try:
            checked = optuna_bridge.check_params(spec, candidate)
        except Invalid:
            continue
        if checked not in configs:
            configs.append(checked)
    return configs


def create_study(ctx: ServiceContext, principal: Principal, spec: StudySpec | dict[str, Any]) -> StudyCreated:
    if not isinstance(spec, StudySpec):
        spec = parse_spec(spec)
    roots = ctx.settings.data_roots
    check_spec(spec, roots)
    resolved = resolve_spec_paths(spec, roots)
    owner = principal.owner
    owner_id = auth.owner_id(ctx.db, principal)

    with ctx.db.scope() as s:
        if s.scalar(select(Study.id).where(Study.owner_id == owner_id, Study.name == spec.name)) is not None:
            raise Conflict(f"you already have a study named {spec.name!r}; pick another name", field="name")
        seeds = _warm_start_configs(s, principal, spec, owner_id)

    storage = ctx.storage
    # Readable in `optuna-dashboard`, and unique even after a delete and re-create.
    optuna_name = f"{owner}.{spec.name}.{secrets.token_hex(4)}"
    directions = _direction_names(spec)
    done = False
    try:
        with _optuna_errors():
            optuna_bridge.create_optuna_study(resolved, storage, optuna_name)
        enqueued = _enqueue_in_optuna(storage, optuna_name, seeds)

        def _insert(s: Session) -> int:
            study = Study(
                name=spec.name,
                owner_id=owner_id,
                optuna_name=optuna_name,
                status=StudyStatus.RUNNING,
                spec=resolved.model_dump(mode="json"),
                directions=directions,
                objectives=list(optuna_bridge.objective_metrics(spec)),
                n_trials=spec.budget.n_trials,
                max_parallel=spec.budget.max_parallel,
                max_retries=spec.budget.max_retries,
                timeout_s=spec.budget.timeout_s,
                trial_timeout_s=spec.budget.trial_timeout_s,
            )
            s.add(study)
            s.flush()
            for (trial_id, number), params in zip(enqueued, seeds, strict=True):
                s.add(Trial(study_id=study.id, number=number, optuna_trial_id=trial_id, params=params))
            return study.id

        try:
            study_id = ctx.db.run(_insert)
        except IntegrityError as exc:
            # Lost a race with a concurrent create of the same name.
            raise Conflict(f"you already have a study named {spec.name!r}; pick another name", field="name") from exc
        done = True
    finally:
        if not done:
            _drop_optuna_study(storage, optuna_name)

    log.info("created study %s %r for %r (optuna %r)", study_id, spec.name, owner, optuna_name)
    with ctx.db.scope() as s:
        detail = _detail(s, visible_study(s, principal, study_id))
    return StudyCreated(**detail.model_dump(), warm_started=len(enqueued))


# ---------------------------------------------------------------------------- read


def list_studies(
    db: Database, principal: Principal, *, status: StudyStatus | None = None, limit: int = 50, offset: int = 0
) -> StudiesPublic:
    check_page(limit, offset)
    where = []
    if not principal.is_admin:
        if principal.user_id is None:
            return StudiesPublic(data=[], count=0)
        where.append(Study.owner_id == principal.user_id)
    if status is not None:
        where.append(Study.status == status)
    with db.scope() as s:
        count = s.scalar(select(func.count()).select_from(Study).where(*where)) or 0
        rows = s.scalars(
            select(Study)
            .where(*where)
            .options(selectinload(Study.owner_user))  # one query for the owners' names, not one per row
            .order_by(Study.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
        return StudiesPublic(data=[StudyPublic.model_validate(r) for r in rows], count=count)


def get_study(db: Database, principal: Principal, study_id: int) -> StudyDetail:
    with db.scope() as s:
        return _detail(s, visible_study(s, principal, study_id))


def best_trials(db: Database, principal: Principal, study_id: int) -> BestTrials:
    """The best trial, or the Pareto front when the study has several objectives."""
    with db.scope() as s:
        study = visible_study(s, principal, study_id)
        if len(study.directions) == 1:
            best = _best_trial(s, study)
            trials = [best] if best is not None else []
        else:
            trials = _pareto_front(s, study)
        return BestTrials(
            directions=study.directions,
            objectives=study.objectives,
            trials=[TrialSummary.model_validate(t) for t in trials],
        )


def _pareto_front(s: Session, study: Study) -> list[Trial]:
    signs = [-1.0 if d == "maximize" else 1.0 for d in study.directions]
    points: list[tuple[tuple[float, ...], int]] = []
    for number, values in s.execute(
        select(Trial.number, Trial.values).where(Trial.study_id == study.id, Trial.state == TrialState.COMPLETE)
    ):
        if values and len(values) == len(signs):
            points.append((tuple(sign * float(v) for sign, v in zip(signs, values, strict=True)), number))
    # Sorted lexicographically (all minimised), a point can only be dominated by one
    # before it, so one pass against the front so far finds the non-dominated set.
    points.sort()
    front: list[tuple[tuple[float, ...], int]] = []
    for point, number in points:
        dominated = any(all(f <= p for f, p in zip(fp, point, strict=True)) and fp != point for fp, _ in front)
        if not dominated:
            front.append((point, number))
    numbers = [n for _, n in front]
    if not numbers:
        return []
    return list(
        s.scalars(select(Trial).where(Trial.study_id == study.id, Trial.number.in_(numbers)).order_by(Trial.number))
    )


# ---------------------------------------------------------------------------- change


def cancel_study(db: Database, principal: Principal, study_id: int) -> StudyDetail:
    """RUNNING -> CANCELLED. Running trials are told to stop in their next heartbeat."""

    def _cancel(s: Session) -> StudyDetail:
        study = visible_study(s, principal, study_id)
        now = utcnow()
        # Guarded transition: only a running study moves, so a concurrent cancel or
        # completion is reported instead of overwritten.
        result = s.execute(
            update(Study)
            .where(Study.id == study_id, Study.status == StudyStatus.RUNNING)
            .values(status=StudyStatus.CANCELLED, finished_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 0) != 1:
            raise Conflict(
                f"study {study_id} is {study.status.value}; only a running study can be cancelled", field="study_id"
            )
        s.refresh(study)
        return _detail(s, study)

    return db.run(_cancel)


def delete_study(ctx: ServiceContext, principal: Principal, study_id: int) -> None:
    """Delete the row (trials, reports and leases cascade), then the Optuna study."""

    def _delete(s: Session) -> str:
        study = visible_study(s, principal, study_id)
        s.execute(delete(Study).where(Study.id == study_id).execution_options(synchronize_session=False))
        return study.optuna_name

    optuna_name = ctx.db.run(_delete)
    _drop_optuna_study(ctx.storage, optuna_name)
    log.info("deleted study %s (optuna %r)", study_id, optuna_name)


def enqueue(
    ctx: ServiceContext, principal: Principal, study_id: int, configurations: Sequence[dict[str, Any]]
) -> EnqueueResult:
    """Queue configurations to run next (before anything the sampler proposes)."""
    with ctx.db.scope() as s:
        study = visible_study(s, principal, study_id)
        if study.status is not StudyStatus.RUNNING:
            raise Conflict(f"study {study_id} is {study.status.value}; cannot enqueue", field="study_id")
        try:
            spec = StudySpec.model_validate(study.spec)
        except ValidationError as exc:
            # stored before a bound was added (timeout_s: 1e300, ...): the study's state is at fault
            field, reason = (validation_messages(exc) or [("spec", "invalid")])[0]
            raise Conflict(
                f"study {study_id}'s stored spec no longer validates ({field}: {reason}); cannot enqueue",
                field="study_id",
            ) from None
        optuna_name = study.optuna_name

    checked: list[dict[str, Any]] = []
    for i, params in enumerate(configurations):
        try:
            normalised = optuna_bridge.check_params(spec, params)
        except Invalid as exc:
            raise Invalid(f"configurations.{i}.{exc.field.removeprefix('params.')}", exc.reason) from exc
        checked.append(dict(normalised) if isinstance(normalised, dict) else dict(params))

    storage = ctx.storage
    made = _enqueue_in_optuna(storage, optuna_name, checked)
    done = False
    try:

        def _insert(s: Session) -> None:
            current = s.get(Study, study_id)
            if current is None or current.status is not StudyStatus.RUNNING:
                raise Conflict(f"study {study_id} was cancelled or deleted meanwhile", field="study_id")
            for (trial_id, number), params in zip(made, checked, strict=True):
                s.add(Trial(study_id=study_id, number=number, optuna_trial_id=trial_id, params=params))

        try:
            ctx.db.run(_insert)
        except IntegrityError as exc:
            # Trial numbers come from Optuna and are unique there, so this is a row that
            # was written without Optuna knowing: report it rather than hide it.
            raise Conflict(f"study {study_id}: trial numbers {[n for _, n in made]} exist already") from exc
        done = True
    finally:
        if not done:
            _fail_optuna_trials(storage, [trial_id for trial_id, _ in made])
    return EnqueueResult(study_id=study_id, trial_numbers=[number for _, number in made])

