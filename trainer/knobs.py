"""The knob catalogue: every hyperparameter a trial can be given, with its limits.

One source of truth for what can be tuned. `Hyperparams` is the typed record a
trial runs with; `catalogue()` reads the same fields back as data, so the
service validates a search space against exactly what the trainer accepts.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

OptimizerName = Literal["adamw", "adam", "sgd", "rmsprop"]
SchedulerName = Literal["linear", "cosine", "step", "constant"]
MAX_LAYERS = 128
# bounded in the type itself, so a trainer config file is held to the catalogue's limits too
UnfreezeDepth = Annotated[int, Field(ge=0, le=MAX_LAYERS)] | Literal["all"]

# Knobs whose natural search is on a log scale; the service accepts `log: true` for any
# positive float range, this only marks what the catalogue recommends.
_LOG_RECOMMENDED = {"learning_rate", "weight_decay", "eps"}


class Hyperparams(BaseModel):
    """A resolved value for every knob. Defaults are what a trial gets when a knob is
    neither searched nor fixed in the spec."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    learning_rate: float = Field(5e-5, gt=0.0, le=1.0, description="Peak learning rate of the optimizer.")
    batch_size: int = Field(32, ge=1, le=4096, description="Examples per optimizer step (before accumulation).")
    grad_accum_steps: int = Field(1, ge=1, le=256, description="Micro-batches accumulated per optimizer step.")
    epochs: int = Field(3, ge=1, le=1000, description="Passes over the training data.")
    max_seq_len: int = Field(128, ge=8, le=8192, description="Tokens kept per example; longer texts are truncated.")
    num_layers: int | None = Field(
        None, ge=1, le=MAX_LAYERS,
        description="Encoder layers kept (the first N of a pretrained model); null keeps them all.",
    )
    num_heads: int | None = Field(
        None, ge=1, le=128,
        description=(
            "Attention heads per layer: pruned from a pretrained model, built for the built-in one; null keeps all."
        ),
    )
    unfreeze_depth: UnfreezeDepth = Field(
        "all",
        description="Top encoder layers trained with the head: 0 trains the head only, 'all' trains everything.",
    )
    hidden_size: int = Field(256, ge=8, le=8192, description="Built-in model only: width of the encoder.")
    ffn_size: int = Field(1024, ge=8, le=32768, description="Built-in model only: width of the feed-forward block.")
    dropout: float = Field(0.1, ge=0.0, le=0.9, description="Dropout probability in the encoder and the head.")
    optimizer: OptimizerName = Field("adamw", description="Optimizer: adamw, adam, sgd (with momentum) or rmsprop.")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="Weight decay (decoupled for adamw).")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="adam/adamw first-moment decay.")
    beta2: float = Field(0.999, ge=0.0, lt=1.0, description="adam/adamw second-moment decay.")
    eps: float = Field(1e-8, gt=0.0, le=1e-2, description="adam/adamw/rmsprop epsilon.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd and rmsprop momentum.")
    scheduler: SchedulerName = Field("linear", description="Learning-rate schedule: linear, cosine, step or constant.")
    warmup_ratio: float = Field(0.0, ge=0.0, le=0.5, description="Share of steps spent warming up (linear, cosine).")
    step_size: int = Field(1, ge=1, le=1000, description="step scheduler: epochs between decays.")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="step scheduler: decay factor.")
    max_grad_norm: float = Field(1.0, ge=0.0, le=1000.0, description="Gradient clipping norm; 0 disables clipping.")
    label_smoothing: float = Field(0.0, ge=0.0, le=0.5, description="Label smoothing of the cross-entropy loss.")
    class_balanced: bool = Field(
        False, description="Sample training batches so that every class is drawn equally often."
    )


KnobType = Literal["float", "int", "categorical", "bool"]


@dataclass(frozen=True)
class Knob:
    """One entry of the catalogue, as data: what the service validates a search space with."""

    name: str
    type: KnobType
    low: float | None
    high: float | None
    low_inclusive: bool
    high_inclusive: bool
    choices: tuple[Any, ...] | None
    default: Any
    nullable: bool
    log_recommended: bool
    description: str

    def allows(self, value: Any) -> bool:
        """Whether a fixed value is acceptable for this knob (bounds and choices)."""
        if value is None:
            return self.nullable
        if self.type == "bool":
            return isinstance(value, bool)
        if self.type == "categorical":
            return self.choices is not None and value in self.choices
        if isinstance(value, bool) or not isinstance(value, int | float):
            # unfreeze_depth is an int that also accepts 'all'
            return self.choices is not None and value in self.choices
        if self.type == "int" and not float(value).is_integer():
            return False
        return self.in_range(float(value))

    def in_range(self, x: float) -> bool:
        if self.low is not None and (x < self.low or (x == self.low and not self.low_inclusive)):
            return False
        if self.high is not None and (x > self.high or (x == self.high and not self.high_inclusive)):  # noqa: SIM103
            return False
        return True


def _bounds(metadata: list[Any]) -> tuple[float | None, float | None, bool, bool]:
    low = high = None
    low_inc = high_inc = True
    for m in metadata:
        for attr, inclusive in (("ge", True), ("gt", False)):
            if getattr(m, attr, None) is not None:
                low, low_inc = float(getattr(m, attr)), inclusive
        for attr, inclusive in (("le", True), ("lt", False)):
            if getattr(m, attr, None) is not None:
                high, high_inc = float(getattr(m, attr)), inclusive
    return low, high, low_inc, high_inc


def _describe(name: str, annotation: Any) -> tuple[KnobType, tuple[Any, ...] | None, bool]:
    """Map a field annotation to (type, extra choices, nullable)."""
    if typing.get_origin(annotation) is Literal:
        return "categorical", typing.get_args(annotation), False
    args = typing.get_args(annotation)
    nullable = type(None) in args
    members = [a for a in args if a is not type(None)] or [annotation]
    literals: list[Any] = []
    base: type | None = None
    for m in members:
        if typing.get_origin(m) is Annotated:
            m = typing.get_args(m)[0]
        if typing.get_origin(m) is Literal:
            literals.extend(typing.get_args(m))
        elif m in (int, float, bool):
            base = m
    if base is bool:
        return "bool", None, nullable
    if base is float:
        return "float", None, nullable
    if base is int:
        return "int", (tuple(literals) or None), nullable
    if literals:
        return "categorical", tuple(literals), nullable
    raise TypeError(f"knob {name}: unsupported annotation {annotation!r}")


def catalogue() -> dict[str, Knob]:
    """Every knob by name, read from `Hyperparams`' fields."""
    knobs: dict[str, Knob] = {}
    for name, field in Hyperparams.model_fields.items():
        ktype, choices, nullable = _describe(name, field.annotation)
        low, high, low_inc, high_inc = _bounds(field.metadata)
        if name == "unfreeze_depth":
            low, high = 0.0, float(MAX_LAYERS)
        knobs[name] = Knob(
            name=name,
            type=ktype,
            low=low,
            high=high,
            low_inclusive=low_inc,
            high_inclusive=high_inc,
            choices=choices,
            default=field.default,
            nullable=nullable,
            log_recommended=name in _LOG_RECOMMENDED,
            description=field.description or "",
        )
    return knobs
