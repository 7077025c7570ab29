"""`StudySpec`: what a user submits to start a study, and the rules it must satisfy.

Two layers: the pydantic schema rejects wrong shapes and types (unknown fields included),
and `check_spec` applies the rules that need the knob catalogue, the data roots, the
model's shape or Optuna, raising `Invalid(field, reason)` with a dotted field path.
Both layers report the same way, so the API and the CLI show either kind of error alike.

Specs are data: nothing in them is imported, evaluated or unpickled.
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from service.errors import Invalid, dotted
from service.paths import resolve_spec_paths
from trainer import registry
from trainer.config import (
    MAX_SEED,
    METRIC_NAMES,
    DatasetRef,
    DataSettings,
    MetricName,
    ModelRef,
    RunSettings,
    Seconds,
)
from trainer.knobs import Knob, catalogue

Scalar = str | int | float | bool | None

MAX_CHOICES = 1000
MAX_STRING = 200
MAX_OPTIONS = 50
# Databases, numpy and float() all break on integers beyond 64 bits (OverflowError: a 500).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Points between low and high of a stepped range: Optuna lists a lattice to sample it, and
# a finer step (5e-324) overflows or takes forever on every ask.
MAX_LATTICE = 1_000_000
# A step or range this much smaller than the values it spans makes neighbouring points equal
# floats, and TPE's kernels NaN (a 500 on every ask); so do subnormal bounds (5e-324).
MIN_RELATIVE_STEP = 1e-9
MIN_MAGNITUDE = 1e-300

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


def _scalar(value: Any) -> Scalar:
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        raise ValueError("integers must fit in 64 bits (at most 9223372036854775807 in size)")
    if value is None or isinstance(value, str | bool | int):
        if isinstance(value, str) and len(value) > MAX_STRING:
            raise ValueError(f"strings are limited to {MAX_STRING} characters")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value
    raise ValueError("must be a string, number, boolean or null")


def _scalar_or_list(value: Any) -> Scalar | list[Scalar]:
    if isinstance(value, list):
        if len(value) > MAX_CHOICES:
            raise ValueError(f"lists are limited to {MAX_CHOICES} items")
        return [_scalar(v) for v in value]
    return _scalar(value)


_SCALAR_SCHEMA = {"type": ["string", "number", "integer", "boolean", "null"]}
# `Any` plus one validator gives a single clear error, where a union of scalar types would
# report one error per member type.
ScalarValue = Annotated[Any, AfterValidator(_scalar), WithJsonSchema(_SCALAR_SCHEMA)]
OptionValue = Annotated[
    Any,
    AfterValidator(_scalar_or_list),
    WithJsonSchema({"anyOf": [_SCALAR_SCHEMA, {"type": "array", "items": _SCALAR_SCHEMA}]}),
]


class _Spec(BaseModel):
    # NaN compares false with everything, so a NaN bound would slip past every range check.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------- search space


class FloatDimension(_Spec):
    """A real range. `step` makes it discrete (and finite, for the grid sampler)."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0.0)


class IntDimension(_Spec):
    """An integer range, both ends included."""

    type: Literal["int"]
    low: Int64
    high: Int64
    step: int = Field(1, ge=1, le=INT64_MAX)
    log: bool = False


class CategoricalDimension(_Spec):
    """A list of values to choose from."""

    type: Literal["categorical"]
    choices: list[ScalarValue] = Field(min_length=1, max_length=MAX_CHOICES)


AnyDimension = FloatDimension | IntDimension | CategoricalDimension
Dimension = Annotated[AnyDimension, Field(discriminator="type")]


# ---------------------------------------------------------------------------- the rest


class Objective(_Spec):
    metric: MetricName
    direction: Literal["maximize", "minimize"] = Field(
        description="Defaults to minimize for loss and maximize for the other metrics."
    )

    @model_validator(mode="before")
    @classmethod
    def _default_direction(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("direction") is None:
            data = {**data, "direction": "minimize" if data.get("metric") == "loss" else "maximize"}
        return data


SamplerName = Literal["tpe", "random", "grid", "cmaes", "gp", "qmc", "nsga2"]
PrunerName = Literal["none", "median", "percentile", "successive_halving", "hyperband", "wilcoxon", "threshold"]
PRUNER_ALIASES = {"asha": "successive_halving"}


class SamplerSpec(_Spec):
    name: SamplerName = "tpe"
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seeds the sampler (numpy takes 32 bits).")
    options: dict[str, OptionValue] = Field(
        default_factory=dict,
        max_length=MAX_OPTIONS,
        description="Keyword arguments of the Optuna sampler (scalars only).",
    )


class PrunerSpec(_Spec):
    name: PrunerName = Field("none", description="'asha' is accepted as an alias of successive_halving.")
    options: dict[str, OptionValue] = Field(
        default_factory=dict,
        max_length=MAX_OPTIONS,
        description="Keyword arguments of the Optuna pruner (scalars only).",
    )

    @field_validator("name", mode="before")
    @classmethod
    def _alias(cls, value: Any) -> Any:
        return PRUNER_ALIASES.get(value, value) if isinstance(value, str) else value


class Budget(_Spec):
    n_trials: int | None = Field(None, ge=1, le=1_000_000, description="Trials to run; null: until timeout_s.")
    timeout_s: Seconds | None = Field(None, description="Stop starting trials after this many seconds.")
    max_parallel: int = Field(1, ge=1, le=1024, description="Trials of this study running at once.")
    max_retries: int = Field(1, ge=0, le=100, description="Retries of a trial whose worker was lost.")
    trial_timeout_s: Seconds | None = Field(None, description="Fail a trial that runs longer.")

    @model_validator(mode="after")
    def _bounded(self) -> Budget:
        if self.n_trials is None and self.timeout_s is None:
            raise ValueError("set n_trials, timeout_s or both, so that the study ends")
        return self


# starts with a letter or digit: "." and ".." read as paths, "-x" as a CLI option
StudyName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class WarmStart(_Spec):
    study: Annotated[StrictInt, Field(ge=1, le=INT64_MAX)] | StudyName = Field(
        description="Name or id of a finished or running study."
    )
    # each is an Optuna trial written in the submit request, as many as one enqueue may add
    n_best: int = Field(10, ge=1, le=100, description="Best trials of that study to enqueue first.")


class StudySpec(_Spec):
    """A tuning study as submitted. Knobs not in `search_space` or `fixed` take the
    defaults of `trainer.knobs.Hyperparams`."""

    name: StudyName
    description: str | None = Field(None, max_length=2000)
    task: Literal["sequence_classification"] = "sequence_classification"
    model: ModelRef
    dataset: DatasetRef
    data: DataSettings = DataSettings()
    run: RunSettings = RunSettings()
    objectives: list[Objective] = Field(min_length=1, max_length=len(METRIC_NAMES))
    search_space: dict[str, Dimension] = Field(default_factory=dict)
    fixed: dict[str, ScalarValue] = Field(default_factory=dict)
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    budget: Budget
    warm_start_from: WarmStart | None = None

    @model_validator(mode="before")
    @classmethod
    def _objective_shorthand(cls, data: Any) -> Any:
        # `objective: {...}` reads better for the common single-objective study
        if isinstance(data, dict) and "objective" in data:
            if "objectives" in data:
                raise ValueError("give either objective or objectives, not both")
            data = dict(data)
            data["objectives"] = [data.pop("objective")]
        return data


# ---------------------------------------------------------------------------- loading


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` as a float: YAML 1.1 only knows `1.0e-5`, and a
    learning rate silently read as a string would be a confusing error further on."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_spec_file(path: str | Path) -> StudySpec:
    """Read a YAML or JSON spec file.

    Raises `Invalid("spec", ...)` when the file cannot be read or parsed, and pydantic's
    `ValidationError` (turn it into messages with `validation_messages`) when its content
    does not fit the schema. Paths inside the spec are relative to the data roots, not to
    the file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Invalid("spec", f"cannot read {path}: {exc}") from None
    try:
        data = yaml.load(text, Loader=_SpecLoader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as exc:
        raise Invalid("spec", f"{path} is not valid YAML or JSON: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise Invalid("spec", f"{path} must hold a mapping of spec fields, not {type(data).__name__}")
    return StudySpec.model_validate(data)


# ---------------------------------------------------------------------------- error messages


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional, which add no step to an error location."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if typing.get_origin(tp) in (Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
        return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _union_members(tp: Any) -> list[Any]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return []


def _tag_member(members: list[Any], part: Any) -> Any:
    """The member of a tagged union whose Literal tag (or class name) is `part`."""
    for member in members:
        if not _is_model(member):
            continue
        if member.__name__ == part:
            return member
        for field in member.model_fields.values():
            if typing.get_origin(field.annotation) is Literal and part in typing.get_args(field.annotation):
                return member
    return None


def _child(tp: Any, part: Any) -> Any:
    if _is_model(tp):
        field = tp.model_fields.get(part) if isinstance(part, str) else None
        return field.annotation if field is not None else None
    origin = typing.get_origin(tp)
    if origin is dict:
        return typing.get_args(tp)[1]
    if origin is list:
        return typing.get_args(tp)[0]
    return None


def _walk(loc: tuple[Any, ...], root: type[BaseModel]) -> tuple[list[Any], Any, Any]:
    """Drop union-member steps from a pydantic error location.

    Returns the cleaned path, the model that holds the last step (for unknown-field
    messages) and the type at the end of the path (for union-tag messages).
    """
    path: list[Any] = []
    tp: Any = root
    owner: Any = None
    for part in loc:
        tp = _unwrap(tp)
        members = _union_members(tp)
        if members:
            # a tagged union names its member by tag, a plain union by type name: not a field
            tp = _tag_member(members, part)
            continue
        owner = tp if _is_model(tp) else None
        path.append(part)
        tp = _child(tp, part)
    return path, owner, _unwrap(tp)


def _union_tags(tp: Any, discriminator: str) -> list[str]:
    tags: list[str] = []
    for member in _union_members(tp):
        field = member.model_fields.get(discriminator) if _is_model(member) else None
        if field is not None and typing.get_origin(field.annotation) is Literal:
            tags.extend(str(t) for t in typing.get_args(field.annotation))
    return tags


def _reason(error: Any, owner: Any, end: Any) -> tuple[str | None, str]:
    """(extra path step, reason) for one pydantic error."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        known = ", ".join(owner.model_fields) if _is_model(owner) else ""
        return None, f"unknown field; expected one of: {known}" if known else "unknown field"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        discriminator = str(ctx.get("discriminator", "")).strip("'\"")
        expected = ", ".join(repr(t) for t in _union_tags(end, discriminator))
        if kind == "union_tag_not_found":
            return discriminator, f"required: one of {expected}"
        return discriminator, f"{ctx.get('tag')!r} is not one of {expected}"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return None, message


def validation_messages(
    exc: ValidationError, model: type[BaseModel] = StudySpec
) -> list[tuple[str, str]]:
    """pydantic errors as (dotted field path, reason) pairs, e.g.
    ("search_space.learning_rate.low", "Input should be a valid number").

    `model` is the class that was validated (a `StudySpec` unless told otherwise); it is
    used to drop the union-member steps pydantic puts in its locations. Errors about the
    whole document get the field "spec".
    """
    messages: list[tuple[str, str]] = []
    for error in exc.errors(include_url=False):
        path, owner, end = _walk(tuple(error["loc"]), model)
        extra, reason = _reason(error, owner, end)
        if extra:
            path.append(extra)
        item = (dotted(path) or "spec", reason)
        if item not in messages:
            messages.append(item)
    return messages


# ---------------------------------------------------------------------------- check_spec


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def limits_text(knob: Knob) -> str:
    """What a knob accepts, in words: 'an integer in [1, 4096]', "one of 'adamw', 'sgd'"."""
    if knob.type == "bool":
        text = "true or false"
    elif knob.type == "categorical":
        text = "one of " + ", ".join(repr(c) for c in knob.choices or ())
    else:
        lo = "(-inf" if knob.low is None else ("[" if knob.low_inclusive else "(") + _num(knob.low)
        hi = "inf)" if knob.high is None else _num(knob.high) + ("]" if knob.high_inclusive else ")")
        text = f"{'an integer' if knob.type == 'int' else 'a number'} in {lo}, {hi}"
        if knob.choices:
            text += " or " + " or ".join(repr(c) for c in knob.choices)
    return text + (" or null" if knob.nullable else "")


def _unknown_knob(name: str, knobs: dict[str, Knob]) -> str:
    return f"unknown knob {name!r}; known knobs: {', '.join(knobs)}"


def choice_key(value: Scalar) -> tuple[str, Any]:
    # 1 and 1.0 are the same choice, 1 and true are not
    if isinstance(value, bool):
        return "bool", value
    if isinstance(value, int | float):
        return "number", value  # Python already equates (and hashes) 1 and 1.0; float() overflows
    return type(value).__name__, value


_DIMENSION_TYPES = {
    "float": ("float", "categorical"),
    "int": ("int", "categorical"),
    "categorical": ("categorical",),
    "bool": ("categorical",),
}


def _check_choices(name: str, dim: CategoricalDimension, knob: Knob) -> None:
    where = f"search_space.{name}.choices"
    seen: set[tuple[str, Any]] = set()
    for i, choice in enumerate(dim.choices):
        if not knob.allows(choice):
            raise Invalid(f"{where}.{i}", f"{choice!r} is not a valid {name}: expected {limits_text(knob)}")
        key = choice_key(choice)
        if key in seen:
            raise Invalid(f"{where}.{i}", f"{choice!r} appears more than once")
        seen.add(key)


def _check_range(name: str, dim: FloatDimension | IntDimension, knob: Knob) -> None:
    where = f"search_space.{name}"
    if dim.low >= dim.high:
        raise Invalid(
            f"{where}.low",
            f"low ({_num(dim.low)}) must be below high ({_num(dim.high)}); to use one value, put {name} in fixed",
        )
    if dim.log and dim.low <= 0:
        raise Invalid(f"{where}.low", f"must be > 0 on a log scale (log: true), got {_num(dim.low)}")
    for end in ("low", "high"):
        value = getattr(dim, end)
        if not knob.in_range(float(value)):
            raise Invalid(f"{where}.{end}", f"{_num(value)} is outside the limits of {name}: {limits_text(knob)}")
    magnitude = max(abs(dim.low), abs(dim.high))
    for end in ("low", "high"):
        value = getattr(dim, end)
        if value and abs(value) < MIN_MAGNITUDE:
            raise Invalid(f"{where}.{end}", f"{_num(value)} is too close to 0: use 0 or at least {MIN_MAGNITUDE:g}")
    if dim.high - dim.low < MIN_RELATIVE_STEP * magnitude:
        raise Invalid(where, f"[{dim.low!r}, {dim.high!r}] is too narrow to sample; put {name} in fixed")
    step = dim.step
    # integers default to step 1, which is what a log scale steps by anyway
    if dim.log and step is not None and (dim.type == "float" or step != 1):
        raise Invalid(f"{where}.step", "cannot be combined with log: true; drop step or log")
    if step is not None and step > dim.high - dim.low:
        raise Invalid(f"{where}.step", f"{_num(step)} is larger than high - low ({_num(dim.high - dim.low)})")
    if step is not None and (dim.high - dim.low) / step > MAX_LATTICE:
        raise Invalid(
            f"{where}.step",
            f"{_num(step)} is too fine: more than {MAX_LATTICE:,} points between low and high; raise the step",
        )
    if step is not None and step < MIN_RELATIVE_STEP * magnitude:
        raise Invalid(f"{where}.step", f"{_num(step)} is too small for values as large as {_num(dim.high)}")


def _check_dimension(name: str, dim: AnyDimension, knobs: dict[str, Knob]) -> None:
    if name not in knobs:
        raise Invalid(f"search_space.{name}", _unknown_knob(name, knobs))
    knob = knobs[name]
    allowed = _DIMENSION_TYPES[knob.type]
    if dim.type not in allowed:
        raise Invalid(
            f"search_space.{name}.type",
            f"{name} is {'an int' if knob.type == 'int' else 'a ' + knob.type} knob ({limits_text(knob)}); "
            f"use type {' or '.join(allowed)}",
        )
    if isinstance(dim, CategoricalDimension):
        _check_choices(name, dim, knob)
    else:
        _check_range(name, dim, knob)


def _check_fixed(spec: StudySpec, knobs: dict[str, Knob]) -> None:
    for name, value in spec.fixed.items():
        if name not in knobs:
            raise Invalid(f"fixed.{name}", _unknown_knob(name, knobs))
        if name in spec.search_space:
            raise Invalid(f"fixed.{name}", f"{name} is also in search_space; a knob is either searched or fixed")
        if not knobs[name].allows(value):
            raise Invalid(f"fixed.{name}", f"{value!r} is not a valid {name}: expected {limits_text(knobs[name])}")


def _check_objectives(spec: StudySpec) -> None:
    seen: set[str] = set()
    for i, objective in enumerate(spec.objectives):
        if objective.metric in seen:
            raise Invalid(f"objectives.{i}.metric", f"{objective.metric!r} is already an objective")
        seen.add(objective.metric)


def _check_names(spec: StudySpec) -> None:
    """Named models and datasets must be registered; whether their package is installed is
    the worker's concern, since the API host need not have them."""
    try:
        if spec.model.kind == "named":
            registry.model_entry(spec.model.name)
    except registry.UnknownName as exc:
        raise Invalid("model.name", str(exc)) from None
    try:
        if spec.dataset.kind == "named":
            registry.dataset_entry(spec.dataset.name)
    except registry.UnknownName as exc:
        raise Invalid("dataset.name", str(exc)) from None
    if spec.dataset.kind == "files":
        # else every trial fails on open(); 'zip' and 'base64' are codecs but not text encodings
        try:
            "a".encode(spec.dataset.encoding)
        except LookupError as exc:
            raise Invalid("dataset.encoding", str(exc)) from None


def _check_text(node: Any, where: str) -> None:
    """PostgreSQL cannot store NUL in text, and paths holding one raise in every OS call."""
    if isinstance(node, str):
        if "\x00" in node:
            raise Invalid(where or "spec", "must not contain NUL characters (\\u0000)")
    elif isinstance(node, dict):
        for key, value in node.items():
            _check_text(key, where or "spec")
            _check_text(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_text(value, f"{where}.{i}")


def check_spec(spec: StudySpec, data_roots: Sequence[Path]) -> None:
    """Apply every rule the schema cannot express; raise `Invalid(field, reason)` on the first
    broken one. Dataset columns are not checked here: the trainer reads the data.

    Store and run `resolve_spec_paths(spec, data_roots)` afterwards, so trials get the
    resolved paths this check accepted.
    """
    from service.optuna_bridge import check_search  # optuna_bridge imports this module

    _check_text(spec.model_dump(), "")
    _check_objectives(spec)
    knobs = catalogue()
    for name, dim in spec.search_space.items():
        _check_dimension(name, dim, knobs)
    _check_fixed(spec, knobs)
    _check_names(spec)
    check_search(resolve_spec_paths(spec, data_roots))
