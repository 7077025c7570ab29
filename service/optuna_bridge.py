"""The Optuna side of a study: spec -> distributions, define-by-run sampling, sampler,
pruner and storage.

Two knob pairs are conditional, and are sampled parent first so that no trial gets an
invalid combination:
- `unfreeze_depth <= num_layers` (or the model's depth when num_layers is not set).
  An int `unfreeze_depth` is sampled after `num_layers` with its high clipped to it, and
  an int `num_layers` never goes below the smallest `unfreeze_depth` still possible. A
  categorical `unfreeze_depth` cannot change per trial (Optuna keeps categorical choices
  fixed), so with an int `num_layers` it is sampled first and `num_layers`' low is raised
  to it; with anything else every choice must fit every `num_layers` (checked on submit).
- a built-in model built from scratch: `hidden_size % num_heads == 0`. An int
  `hidden_size` is sampled after `num_heads` as a multiple of lcm(step, num_heads);
  categorical choices must all be divisible by every num_heads.

`check_search` (called by `service.spec.check_spec`) proves on submit that every trial
has a valid value, so sampling never fails later.
"""

from __future__ import annotations

import decimal
import importlib.util
import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.pruners import (
    BasePruner,
    HyperbandPruner,
    MedianPruner,
    NopPruner,
    PercentilePruner,
    SuccessiveHalvingPruner,
    ThresholdPruner,
    WilcoxonPruner,
)
from optuna.samplers import (
    BaseSampler,
    CmaEsSampler,
    GPSampler,
    GridSampler,
    NSGAIISampler,
    QMCSampler,
    RandomSampler,
    TPESampler,
)
from optuna.storages import BaseStorage, RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError

from service.errors import Conflict, Invalid, NotFound
from service.paths import check_read_file
from service.spec import (
    INT64_MAX,
    INT64_MIN,
    AnyDimension,
    CategoricalDimension,
    IntDimension,
    StudySpec,
    choice_key,
    validation_messages,
)
from trainer import registry
from trainer.config import MAX_STEPS, ModelRef, NamedModel, PretrainedModel, TrialConfig
from trainer.knobs import Hyperparams
from trainer.modeling.build import model_depth_and_heads
from trainer.outcome import ConfigError

GRID_LIMIT = 100_000

SAMPLERS: dict[str, type[BaseSampler]] = {
    "tpe": TPESampler,
    "random": RandomSampler,
    "grid": GridSampler,
    "cmaes": CmaEsSampler,
    "gp": GPSampler,
    "qmc": QMCSampler,
    "nsga2": NSGAIISampler,
}
PRUNERS: dict[str, type[BasePruner]] = {
    "none": NopPruner,
    "median": MedianPruner,
    "percentile": PercentilePruner,
    "successive_halving": SuccessiveHalvingPruner,
    "hyperband": HyperbandPruner,
    "wilcoxon": WilcoxonPruner,
    "threshold": ThresholdPruner,
}
# Optional dependencies Optuna imports only when a sampler first samples.
SAMPLER_PACKAGES = {"cmaes": "cmaes", "gp": "torch", "qmc": "scipy"}
# CmaEsSampler raises on a study with several directions; the others handle it.
MULTI_OBJECTIVE_SAMPLERS = ("tpe", "nsga2", "gp", "random", "qmc", "grid")
_SET_BY_TUNEFORGE = {
    "seed": "set sampler.seed instead",
    "search_space": "the grid is built from search_space",
}

# The constraint TuneForge records for a trial that did not fit (out of memory).
CONSTRAINT_NAME = "tf_constraint"


# ---------------------------------------------------------------------------- model shape

# trainer.modeling.builtin.DEFAULT_NUM_LAYERS, restated: that module imports torch and
# transformers (seconds), which the API process does not need. A test keeps them equal.
BUILTIN_DEFAULT_LAYERS = 4


@dataclass(frozen=True)
class ModelShape:
    """What the model a spec fine-tunes fixes. None: not fixed, or not known."""

    depth: int | None
    """Encoder layers a trial keeps when num_layers is null."""
    max_layers: int | None
    """num_layers cannot exceed this (truncation only removes layers)."""
    max_heads: int | None
    """num_heads cannot exceed this (pruning only removes heads)."""
    sized_by_knobs: bool
    """A built-in model built from scratch: hidden_size and ffn_size apply, and hidden_size
    must be divisible by num_heads."""


def model_shape(model: ModelRef, roots: Sequence[Path] | None = None) -> ModelShape:
    """The shape of the model a spec fine-tunes, from config.json alone (or the registry).

    Paths must already be resolved (`service.paths.resolve_spec_paths`). A named model's
    shape comes from the registry, so the API host does not need its package installed.
    config.json must be a small regular file, and inside `roots` when they are given
    (Invalid otherwise): it is read on the user's behalf.
    """
    if isinstance(model, NamedModel):
        try:
            entry = registry.model_entry(model.name)
        except registry.UnknownName as exc:
            raise Invalid("model.name", str(exc)) from None
        return ModelShape(entry.num_layers, entry.num_layers, entry.num_heads, sized_by_knobs=False)
    if isinstance(model, PretrainedModel):
        ref, field = model, "model.path"
    elif model.checkpoint is not None:
        # a pretrained built-in checkpoint fixes its widths; depth and heads are cut by surgery
        ref, field = PretrainedModel(path=model.checkpoint), "model.checkpoint"
    else:
        return ModelShape(BUILTIN_DEFAULT_LAYERS, None, None, sized_by_knobs=True)
    # Submission checked config.json against the data roots (resolve_spec_paths); this runs
    # again whenever a study's space is rebuilt, so the file is checked each time it is read.
    check_read_file(Path(ref.path) / "config.json", field, roots)
    try:
        shape = model_depth_and_heads(ref)
    except ConfigError as exc:
        raise Invalid(field, str(exc).split(": ", 1)[-1]) from None
    assert shape is not None  # None only for a built-in ref
    layers, heads, _hidden = shape
    return ModelShape(layers, layers, heads, sized_by_knobs=False)


# ---------------------------------------------------------------------------- the space


def _ceil_to(value: int, low: int, step: int) -> int:
    """Smallest point of the lattice low + k*step that is >= value."""
    return low + max(0, -(-(value - low) // step)) * step


def _as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class _Space:
    dims: Mapping[str, AnyDimension]
    fixed: Mapping[str, Any]
    shape: ModelShape
    order: tuple[str, ...]

    @classmethod
    def of(cls, spec: StudySpec) -> _Space:
        fields = list(Hyperparams.model_fields)
        order = sorted(spec.search_space, key=lambda n: fields.index(n) if n in fields else len(fields))
        if cls._unfreeze_first(spec.search_space):
            order.remove("unfreeze_depth")
            order.insert(order.index("num_layers"), "unfreeze_depth")
        return cls(spec.search_space, spec.fixed, model_shape(spec.model), tuple(order))

    @staticmethod
    def _unfreeze_first(dims: Mapping[str, AnyDimension]) -> bool:
        return isinstance(dims.get("unfreeze_depth"), CategoricalDimension) and isinstance(
            dims.get("num_layers"), IntDimension
        )

    def edges(self) -> list[tuple[str, str]]:
        """(parent, child) pairs of conditional knobs, parent sampled first."""
        layers = ("num_layers", "unfreeze_depth")
        edges = [layers[::-1] if self._unfreeze_first(self.dims) else layers]
        if self.shape.sized_by_knobs:
            edges.append(("num_heads", "hidden_size"))
        return edges

    def value(self, name: str, params: Mapping[str, Any]) -> Any:
        if name in params:
            return params[name]
        if name in self.fixed:
            return self.fixed[name]
        return Hyperparams.model_fields[name].default

    def base_distribution(self, name: str) -> BaseDistribution:
        """The dimension as written, before conditional clipping."""
        dim = self.dims[name]
        if isinstance(dim, CategoricalDimension):
            return CategoricalDistribution(dim.choices)
        if isinstance(dim, IntDimension):
            return IntDistribution(dim.low, dim.high, log=dim.log, step=dim.step)
        try:
            return FloatDistribution(dim.low, dim.high, log=dim.log, step=dim.step)
        except (ArithmeticError, ValueError) as exc:  # Optuna's Decimal snapping of high onto the step
            raise Invalid(f"search_space.{name}", f"Optuna cannot use this range: {exc}") from None

    def distribution(self, name: str, params: Mapping[str, Any]) -> BaseDistribution:
        """The distribution of searched knob `name`, given the knobs sampled before it."""
        dim = self.dims[name]
        if not isinstance(dim, IntDimension):
            return self.base_distribution(name)
        low, high, step = dim.low, dim.high, dim.step
        if name == "num_layers":
            low = self._layers_low(dim, params)
        elif name == "unfreeze_depth":
            layers = self.layers(params)
            if layers is not None and layers < high:
                high = layers
                if high < low:
                    raise Invalid(
                        "search_space.unfreeze_depth.low",
                        f"{low} exceeds num_layers ({self._layers_text(params)}); "
                        "unfreeze_depth cannot exceed num_layers",
                    )
        elif name == "hidden_size" and self.shape.sized_by_knobs:
            heads = _as_int(self.value("num_heads", params))
            if heads:
                step = math.lcm(step, heads)
                low = -(-low // step) * step
                if low > high:
                    raise Invalid(
                        "search_space.hidden_size",
                        f"no multiple of {step} lies in [{dim.low}, {dim.high}]: the built-in model needs "
                        f"hidden_size divisible by num_heads ({heads})",
                    )
        # Optuna would trim high onto the lattice itself, with a warning on every trial
        return IntDistribution(low, low + (high - low) // step * step, log=dim.log, step=step)

    def _layers_low(self, dim: IntDimension, params: Mapping[str, Any]) -> int:
        """num_layers' low, raised so that the smallest unfreeze_depth still possible fits."""
        udim = self.dims.get("unfreeze_depth")
        if "unfreeze_depth" in params:
            floor, field = _as_int(params["unfreeze_depth"]), "search_space.unfreeze_depth"
        elif isinstance(udim, IntDimension):
            floor, field = udim.low, "search_space.unfreeze_depth.low"
        elif udim is None:
            floor, field = _as_int(self.value("unfreeze_depth", {})), "fixed.unfreeze_depth"
        else:
            return dim.low  # categorical, sampled later: every choice was checked on submit
        if floor is None or floor <= dim.low:
            return dim.low
        low = _ceil_to(floor, dim.low, dim.step)
        if low > dim.high:
            raise Invalid(
                field,
                f"unfreeze_depth ({floor}) exceeds every num_layers in [{dim.low}, {dim.high}]; "
                "unfreeze_depth cannot exceed num_layers",
            )
        return low

    def layers(self, params: Mapping[str, Any]) -> int | None:
        """Encoder layers a trial keeps: num_layers, else the model's depth (None: unknown)."""
        value = _as_int(self.value("num_layers", params))
        return value if value is not None else self.shape.depth

    def _layers_text(self, params: Mapping[str, Any]) -> str:
        if _as_int(self.value("num_layers", params)) is None:
            return f"{self.shape.depth}, the model's depth"
        return str(self.layers(params))

    def possible(self, name: str) -> list[Any]:
        """Every value a parent knob can take (small: bounded by the knob limits)."""
        if name not in self.dims:
            return [self.value(name, {})]
        return _lattice(name, self.distribution(name, {}))

    def conflict(self, values: Mapping[str, Any]) -> str | None:
        """Why a pair of conditional values is invalid, or None."""
        if "unfreeze_depth" in values and "num_layers" in values:
            depth = _as_int(values["unfreeze_depth"])
            layers = _as_int(values["num_layers"])
            limit = layers if layers is not None else self.shape.depth
            if depth is not None and limit is not None and depth > limit:
                what = str(limit) if layers is not None else f"{limit}, the model's depth"
                return f"unfreeze_depth ({depth}) cannot exceed num_layers ({what})"
        if "hidden_size" in values and "num_heads" in values:
            size, heads = _as_int(values["hidden_size"]), _as_int(values["num_heads"])
            if size is not None and heads and size % heads:
                return f"hidden_size ({size}) must be divisible by num_heads ({heads}) for the built-in model"
        return None


def _lattice_size(name: str, dist: BaseDistribution) -> int:
    if isinstance(dist, CategoricalDistribution):
        return len(dist.choices)
    if isinstance(dist, IntDistribution):
        return (dist.high - dist.low) // dist.step + 1
    if dist.step is None:
        raise Invalid(
            f"search_space.{name}",
            "the grid sampler needs a finite space: give this float range a step, or use categorical choices",
        )
    points = (dist.high - dist.low) / dist.step
    if not points <= GRID_LIMIT:  # also catches inf and NaN, which round() would raise on
        raise Invalid(f"search_space.{name}.step", f"the grid sampler would have more than {GRID_LIMIT:,} points")
    return round(points) + 1


def _lattice(name: str, dist: BaseDistribution) -> list[Any]:
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution):
        return list(range(dist.low, dist.high + 1, dist.step))
    # decimal arithmetic keeps 0.1 + 2 * 0.1 at 0.3, so grid values print as the user wrote them
    low, step = decimal.Decimal(str(dist.low)), decimal.Decimal(str(dist.step))
    return [float(low + i * step) for i in range(_lattice_size(name, dist))]


# ---------------------------------------------------------------------------- submit-time checks


def _extremes(spec: StudySpec, name: str) -> list[tuple[str, Any]]:
    """(field, value) for the largest values a knob can take, to compare with the model."""
    dim = spec.search_space.get(name)
    if isinstance(dim, CategoricalDimension):
        return [(f"search_space.{name}.choices.{i}", c) for i, c in enumerate(dim.choices)]
    if dim is not None:
        return [(f"search_space.{name}.high", dim.high)]
    return [(f"fixed.{name}", spec.fixed[name])] if name in spec.fixed else []


def _check_model_fit(spec: StudySpec, space: _Space) -> None:
    if not space.shape.sized_by_knobs:
        why = "the checkpoint fixes it" if spec.model.kind == "builtin" else f"model.kind is {spec.model.kind!r}"
        for name in ("hidden_size", "ffn_size"):
            for section in ("search_space", "fixed"):
                if name in getattr(spec, section):
                    raise Invalid(
                        f"{section}.{name}", f"{name} only applies to a built-in model built from scratch ({why})"
                    )
    limits = (("num_layers", space.shape.max_layers, "layers"), ("num_heads", space.shape.max_heads, "attention heads"))
    for name, limit, what in limits:
        for field, value in _extremes(spec, name):
            if limit is not None and _as_int(value) is not None and value > limit:
                raise Invalid(field, f"{value} exceeds the model's {limit} {what}")
    hidden = spec.search_space.get("hidden_size")
    log_hidden = space.shape.sized_by_knobs and isinstance(hidden, IntDimension) and hidden.log
    if log_hidden and any((_as_int(h) or 1) > 1 for h in space.possible("num_heads")):
        raise Invalid(
                "search_space.hidden_size.log",
                "cannot be used with num_heads set: hidden_size is then sampled in steps of num_heads, "
                "and Optuna's integer log scale needs step 1",
            )


def _check_edge(space: _Space, parent: str, child: str) -> None:
    for p in space.possible(parent):
        params = {parent: p} if parent in space.dims else {}
        if child in space.dims:
            dist = space.distribution(child, params)  # raises when no value is left
            if isinstance(dist, CategoricalDistribution):
                for i, c in enumerate(dist.choices):
                    if why := space.conflict({parent: p, child: c}):
                        raise Invalid(f"search_space.{child}.choices.{i}", why)
        elif why := space.conflict({parent: p, child: space.value(child, {})}):
            if parent in space.dims:
                field = f"search_space.{parent}"
            else:
                field = f"fixed.{child}" if child in space.fixed else f"fixed.{parent}"
            raise Invalid(field, why)


def _in(low: float | None, high: float | None) -> str:
    return f" in [{low}, {high}]" if low is not None and high is not None else ""


@dataclass(frozen=True)
class Option:
    """A sampler or pruner argument a spec may set. Bounded, because Optuna takes any size
    (n_ei_candidates: 3_000_000 makes every ask cost seconds and hundreds of MB)."""

    kind: Literal["int", "float", "bool"] | None = None
    low: float | None = None
    high: float | None = None
    words: tuple[str, ...] = ()
    """Strings it accepts besides (or instead of) a number."""
    nullable: bool = False
    required: bool = False

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, str):
            return value in self.words
        if isinstance(value, bool) or self.kind in (None, "bool"):
            return isinstance(value, bool) and self.kind == "bool"
        if not isinstance(value, int if self.kind == "int" else float | int):
            return False
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def text(self) -> str:
        parts = {
            "int": f"an integer{_in(self.low, self.high)}",
            "float": f"a number{_in(self.low, self.high)}",
            "bool": "true or false",
        }
        kinds = ([parts[self.kind]] if self.kind else []) + [repr(w) for w in self.words]
        return " or ".join(kinds + (["null"] if self.nullable else []))


MAX_STARTUP_TRIALS = 10_000
_FLAG = Option("bool")
_PROBABILITY = Option("float", 0.0, 1.0)
_TRIALS = Option("int", 0, MAX_STARTUP_TRIALS)
_WARMUP = Option("int", 0, MAX_STEPS)
_INTERVAL = Option("int", 1, MAX_STEPS)
_REDUCTION = Option("int", 2, 100)
_BOOTSTRAP = Option("int", 0, MAX_STARTUP_TRIALS)
_MEDIAN = {
    "n_startup_trials": _TRIALS,
    "n_warmup_steps": _WARMUP,
    "interval_steps": _INTERVAL,
    "n_min_trials": Option("int", 1, MAX_STARTUP_TRIALS),
}

# What a spec may set, checked against Optuna 5.1's constructors. Left out: arguments that
# take Python objects (gamma, x0, mutation, ...), deprecated ones (consider_prior,
# restart_strategy, ...) and those TuneForge sets itself (seed, search_space).
SAMPLER_OPTIONS: dict[str, dict[str, Option]] = {
    "tpe": {
        "n_startup_trials": _TRIALS,
        "n_ei_candidates": Option("int", 1, 1000),
        "multivariate": _FLAG,
        "group": _FLAG,
        "constant_liar": _FLAG,
    },
    "random": {},
    "grid": {},
    "cmaes": {
        "sigma0": Option("float", 1e-6, 1e3, nullable=True),
        "n_startup_trials": _TRIALS,
        "popsize": Option("int", 2, 1000, nullable=True),
        "consider_pruned_trials": _FLAG,
        "use_separable_cma": _FLAG,
        "with_margin": _FLAG,
        "lr_adapt": _FLAG,
        "warn_independent_sampling": _FLAG,
    },
    "gp": {"n_startup_trials": _TRIALS, "deterministic_objective": _FLAG, "warn_independent_sampling": _FLAG},
    "qmc": {
        "qmc_type": Option(words=("sobol", "halton")),
        "scramble": _FLAG,
        "warn_asynchronous_seeding": _FLAG,
        "warn_independent_sampling": _FLAG,
    },
    "nsga2": {
        "population_size": Option("int", 2, 1000),
        "mutation_prob": Option("float", 0.0, 1.0, nullable=True),
        "crossover_prob": _PROBABILITY,
        "swapping_prob": _PROBABILITY,
    },
}
PRUNER_OPTIONS: dict[str, dict[str, Option]] = {
    "none": {},
    "median": _MEDIAN,
    "percentile": {"percentile": Option("float", 0.0, 100.0, required=True), **_MEDIAN},
    "successive_halving": {
        "min_resource": Option("int", 1, MAX_STEPS, words=("auto",)),
        "reduction_factor": _REDUCTION,
        # rungs are reduction_factor ** (rate + rung) steps apart: beyond this no step is reached
        "min_early_stopping_rate": Option("int", 0, 30),
        "bootstrap_count": _BOOTSTRAP,
    },
    "hyperband": {
        "min_resource": Option("int", 1, MAX_STEPS),
        "max_resource": Option("int", 1, MAX_STEPS, words=("auto",)),
        "reduction_factor": _REDUCTION,
        "bootstrap_count": _BOOTSTRAP,
    },
    "wilcoxon": {"p_threshold": _PROBABILITY, "n_startup_steps": _WARMUP},
    "threshold": {
        "lower": Option("float", nullable=True),
        "upper": Option("float", nullable=True),
        "n_warmup_steps": _WARMUP,
        "interval_steps": _INTERVAL,
    },
}


def _short(value: Any) -> str:
    """repr for an error message: a user's value can be a megabyte long."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
    return text if len(text) <= 80 else text[:77] + "..."


def _check_options(
    section: str, cls: type, accepted: Mapping[str, Option], options: Mapping[str, Any], reserved: Mapping[str, str]
) -> None:
    listed = ", ".join(accepted) or "none"
    for key, value in options.items():
        field = f"{section}.options.{key}"
        if key in reserved:
            raise Invalid(field, reserved[key])
        option = accepted.get(key)
        if option is None:
            known = key in inspect.signature(cls).parameters
            what = f"{cls.__name__}'s {key} cannot be set from a spec" if known else f"unknown option of {cls.__name__}"
            raise Invalid(field, f"{what}; accepted options: {listed}")
        if not option.allows(value):
            raise Invalid(field, f"expected {option.text()}, got {_short(value)}")
    for key, option in accepted.items():
        if option.required and key not in options:
            raise Invalid(f"{section}.options.{key}", f"required by {cls.__name__}")
def check_search(spec: StudySpec) -> None:
    """The rules that depend on how the space is sampled: model shape, conditional knobs,
    the grid, several objectives, sampler and pruner options. `spec` must have resolved
    paths and passed the knob checks; `service.spec.check_spec` calls this last."""
    space = _Space.of(spec)
    _check_model_fit(spec, space)
    for parent, child in space.edges():
        _check_edge(space, parent, child)
    n_objectives = len(spec.objectives)
    if n_objectives > 1 and spec.sampler.name not in MULTI_OBJECTIVE_SAMPLERS:
        raise Invalid(
            "sampler.name",
            f"{spec.sampler.name} optimises a single objective; with {n_objectives} objectives use one of "
            + ", ".join(MULTI_OBJECTIVE_SAMPLERS),
        )
    if n_objectives > 1 and spec.pruner.name != "none":
        raise Invalid("pruner.name", "Optuna cannot prune a study with several objectives; use none")
    package = SAMPLER_PACKAGES.get(spec.sampler.name)
    if package and importlib.util.find_spec(package) is None:
        raise Invalid(
            "sampler.name",
            f"{spec.sampler.name} needs the Python package {package!r}, which is not installed on the server",
        )
    sampler, pruner = spec.sampler.name, spec.pruner.name
    _check_options("sampler", SAMPLERS[sampler], SAMPLER_OPTIONS[sampler], spec.sampler.options, _SET_BY_TUNEFORGE)
    _check_options("pruner", PRUNERS[pruner], PRUNER_OPTIONS[pruner], spec.pruner.options, {})
    try:
        make_sampler(spec, parallel=spec.budget.max_parallel > 1)
    except (ValueError, TypeError) as exc:
        raise Invalid("sampler.options", str(exc)) from None
    try:
        make_pruner(spec)
    except (ValueError, TypeError) as exc:
        raise Invalid("pruner.options", str(exc)) from None


# ---------------------------------------------------------------------------- sampler and pruner


def grid_space(spec: StudySpec) -> dict[str, list[Any]]:
    """The grid sampler's values per searched knob. Every combination of the grid is run,
    so each must be valid: raises `Invalid` for an infinite space, a grid larger than
    `GRID_LIMIT` points, or a pair of conditional values that does not fit."""
    space = _Space.of(spec)
    parents = {child: parent for parent, child in space.edges() if parent in space.dims and child in space.dims}
    dists = {
        name: space.base_distribution(name) if name in parents else space.distribution(name, {})
        for name in space.order
    }
    size = math.prod(_lattice_size(name, dist) for name, dist in dists.items())
    if size > GRID_LIMIT:
        raise Invalid(
            "search_space",
            f"the grid has {size:,} points, more than the limit of {GRID_LIMIT:,}; "
            "narrow the ranges, raise the steps or use another sampler",
        )
    values = {name: _lattice(name, dist) for name, dist in dists.items()}
    for child, parent in parents.items():
        for p in values[parent]:
            for c in values[child]:
                if why := space.conflict({parent: p, child: c}):
                    raise Invalid(
                        f"search_space.{child}",
                        f"the grid sampler runs every combination, and {child}={c!r} with {parent}={p!r} "
                        f"is invalid: {why}; narrow the choices or use another sampler",
                    )
    return values


class AskTellGridSampler(GridSampler):
    """GridSampler for ask/tell: Optuna's calls `study.stop()` once the grid is done, which
    raises outside `study.optimize`, so the last `tell` would fail. The scheduler asks
    `is_exhausted(study)` (or counts `grid_size`) instead."""

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        pass


def grid_size(spec: StudySpec) -> int:
    """Points in the grid of a grid-sampler spec: trials beyond it repeat a point."""
    return math.prod(len(values) for values in grid_space(spec).values())


def make_sampler(spec: StudySpec, parallel: bool) -> BaseSampler:
    """The spec's sampler. `parallel`: trials of the study run at once (TPE then applies
    the constant liar, so concurrent trials are not sampled next to each other).

    No `constraints_func` is passed: Optuna 5 deprecates it, and TPE, GP and NSGA-II read
    constraints from the trial itself; see `record_constraint`.
    """
    name, seed, options = spec.sampler.name, spec.sampler.seed, dict(spec.sampler.options)
    if name == "grid":
        return AskTellGridSampler(grid_space(spec), seed=seed)
    if name == "tpe":
        options = {"multivariate": True, "constant_liar": parallel, **options}
    return SAMPLERS[name](seed=seed, **options)


def make_pruner(spec: StudySpec) -> BasePruner:
    return PRUNERS[spec.pruner.name](**spec.pruner.options)


def record_constraint(storage: BaseStorage, trial_id: int, violation: float) -> None:
    """Record how far a trial broke TuneForge's constraint: > 0 means infeasible (e.g. it ran
    out of memory), <= 0 feasible. Call it before the trial is told (a finished trial
    cannot be updated).

    TPE, GP and NSGA-II read it and steer away from infeasible regions. TPE uses it on
    COMPLETE and PRUNED trials, GP and NSGA-II on COMPLETE ones only, and GP requires every
    COMPLETE trial to carry the same constraints: so either record it on every trial that
    completes or is pruned, or only on trials told as PRUNED (say, out of memory) and on
    no completed one. A FAIL trial is ignored by every sampler.
    """
    value = float(violation)
    if math.isnan(value):
        raise ValueError("a constraint value cannot be NaN")
    # the key format of optuna.trial.Trial.set_constraint; building a Trial object for an
    # existing trial would call sampler.before_trial again
    storage.set_trial_system_attr(trial_id, f"constraints:{CONSTRAINT_NAME}", value)


# ---------------------------------------------------------------------------- trials


def directions(spec: StudySpec) -> list[StudyDirection]:
    return [StudyDirection.MAXIMIZE if o.direction == "maximize" else StudyDirection.MINIMIZE for o in spec.objectives]


def objective_metrics(spec: StudySpec) -> list[str]:
    """Metric names whose final values are the trial's objective values, in order."""
    return [o.metric for o in spec.objectives]


def _suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    assert isinstance(dist, FloatDistribution)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def suggest_params(trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
    """Sample every searched knob, parents before the knobs that depend on them. The spec
    must have passed `check_spec` and carry resolved paths (a pretrained model's
    config.json is read for its depth)."""
    space = _Space.of(spec)
    params: dict[str, Any] = {}
    for name in space.order:
        params[name] = _suggest(trial, name, space.distribution(name, params))
    return params


def _contained(dist: BaseDistribution, value: Any) -> tuple[bool, Any]:
    """Whether `value` lies in `dist`, and the value normalised to what Optuna stores."""
    if isinstance(dist, CategoricalDistribution):
        key = choice_key(value)
        return next(((True, c) for c in dist.choices if choice_key(c) == key), (False, value))
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False, value
    # float() overflows on an integer beyond 1e308; no knob comes near 2**63
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX or not math.isfinite(value):
        return False, value
    if isinstance(dist, IntDistribution):
        if not float(value).is_integer():
            return False, value
        v = int(value)
        return dist.low <= v <= dist.high and (v - dist.low) % dist.step == 0, v
    assert isinstance(dist, FloatDistribution)
    v = float(value)
    on_step = dist.step is None or abs((k := (v - dist.low) / dist.step) - round(k)) < 1e-8
    return dist.low <= v <= dist.high and on_step, v


def _describe(dist: BaseDistribution) -> str:
    if isinstance(dist, CategoricalDistribution):
        return "one of " + ", ".join(repr(c) for c in dist.choices)
    assert isinstance(dist, IntDistribution | FloatDistribution)
    kind = "integers" if isinstance(dist, IntDistribution) else "numbers"
    text = f"{kind} in [{dist.low}, {dist.high}]"
    if dist.step not in (None, 1):
        text += f" in steps of {dist.step}"
    return text + (" on a log scale" if dist.log else "")


_CONDITION = {
    "unfreeze_depth": "unfreeze_depth cannot exceed num_layers",
    "num_layers": "num_layers cannot be below unfreeze_depth",
    "hidden_size": "hidden_size is a multiple of num_heads",
}


def check_params(spec: StudySpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a configuration given by a user (enqueue, warm start) against the spec's
    search space; return it normalised (ints as int, the exact categorical choice), in
    sampling order. Raises `Invalid("params.<knob>", reason)`."""
    space = _Space.of(spec)
    for name in params:
        if name in space.dims:
            continue
        if name in spec.fixed:
            reason = f"{name} is fixed to {spec.fixed[name]!r} by the study, not searched"
        elif name in Hyperparams.model_fields:
            reason = f"{name} is not in the study's search space"
        else:
            reason = f"unknown knob; searched knobs: {', '.join(space.order) or 'none'}"
        raise Invalid(f"params.{name}", reason)
    checked: dict[str, Any] = {}
    for name in space.order:
        if name not in params:
            raise Invalid(f"params.{name}", "missing: every searched knob needs a value")
        dist = space.distribution(name, checked)
        ok, value = _contained(dist, params[name])
        if not ok:
            note = f" ({_CONDITION[name]})" if name in _CONDITION and dist != space.base_distribution(name) else ""
            raise Invalid(f"params.{name}", f"{_short(params[name])} is not in {_describe(dist)}{note}")
        checked[name] = value
    return checked


def distributions(spec: StudySpec, params: Mapping[str, Any]) -> dict[str, BaseDistribution]:
    """The distribution each searched knob had for a trial with these params (as
    `suggest_params` would have used), for `optuna.trial.create_trial` and friends."""
    space = _Space.of(spec)
    result: dict[str, BaseDistribution] = {}
    earlier: dict[str, Any] = {}
    for name in space.order:
        if name not in params:
            raise Invalid(f"params.{name}", "missing: every searched knob needs a value")
        # only the knobs sampled before this one, as suggest_params had them
        result[name] = space.distribution(name, earlier)
        earlier[name] = params[name]
    return result


def params_to_hparams(spec: StudySpec, params: Mapping[str, Any]) -> Hyperparams:
    """Every knob's value for a trial: Hyperparams defaults, then `fixed`, then `params`."""
    try:
        return Hyperparams.model_validate({**spec.fixed, **params})
    except ValidationError as exc:
        field, reason = validation_messages(exc, Hyperparams)[0]
        raise Invalid(f"params.{field}", reason) from None


def build_trial_config(spec: StudySpec, params: Mapping[str, Any]) -> TrialConfig:
    """The config a trial with these params runs with (what a lease carries)."""
    hparams = params_to_hparams(spec, params)
    try:
        return TrialConfig(
            task=spec.task, model=spec.model, dataset=spec.dataset, data=spec.data, hparams=hparams, run=spec.run
        )
    except ValidationError as exc:
        field, reason = validation_messages(exc, TrialConfig)[0]
        raise Invalid("params" if field == "spec" else field, reason) from None


# ---------------------------------------------------------------------------- studies and storage


def create_optuna_study(spec: StudySpec, storage: BaseStorage, study_name: str) -> optuna.Study:
    """Create the Optuna study of a TuneForge study; `Conflict` if the name is taken."""
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            directions=directions(spec),
            sampler=make_sampler(spec, parallel=spec.budget.max_parallel > 1),
            pruner=make_pruner(spec),
        )
    except optuna.exceptions.DuplicatedStudyError:
        raise Conflict(f"an Optuna study named {study_name!r} already exists") from None
    # names the objectives in optuna-dashboard and Study.trials_dataframe(); the API is
    # marked experimental, and a warning on every study create would only be noise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(objective_metrics(spec))
    return study


def load_optuna_study(spec: StudySpec, storage: BaseStorage, study_name: str) -> optuna.Study:
    """Load a study with the spec's sampler and pruner; `NotFound` if it does not exist.
    Samplers keep state between trials (random state, caches): keep one per study."""
    try:
        return optuna.load_study(
            study_name=study_name,
            storage=storage,
            sampler=make_sampler(spec, parallel=spec.budget.max_parallel > 1),
            pruner=make_pruner(spec),
        )
    except KeyError:
        raise NotFound(f"no Optuna study named {study_name!r}") from None


def make_storage(
    url: str, engine_kwargs: dict[str, Any] | None = None, *, pool_size: int = 10, max_overflow: int = 20
) -> RDBStorage:
    """Optuna's storage on the service database. No heartbeat: workers never touch Optuna,
    leases track liveness instead.

    Its engine gets our engine's settings (`service.db.engine_kwargs`): Optuna turns on
    pool_pre_ping for MySQL only, so after a PostgreSQL restart its first write would
    fail on a dead pooled connection ("An exception is raised during the commit").
    `engine_kwargs`, when given, replaces them.
    """
    from service.db import engine_kwargs as our_engine_kwargs
    from service.db import install_pragmas

    kwargs = engine_kwargs
    if kwargs is None:
        kwargs = our_engine_kwargs(url, pool_size=pool_size, max_overflow=max_overflow)
    storage = RDBStorage(url, engine_kwargs=kwargs, skip_compatibility_check=False)
    if engine_kwargs is None and storage.engine.dialect.name == "sqlite":
        # RDBStorage connected while it checked its schema, before a listener could be
        # added: drop those connections so every pooled one gets the pragmas.
        install_pragmas(storage.engine)
        storage.engine.dispose()
    return storage
