"""How a trial ends: the result of a finished trial and the exceptions that end one early."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.protocol import FailureReason

Metrics = dict[str, float]


@dataclass
class TrialResult:
    """A trial that ran to the end of its budget."""

    metrics: Metrics
    """Final validation metrics (loss, accuracy, f1_macro)."""
    step: int
    history: list[tuple[int, Metrics]] = field(default_factory=list)
    checkpoint: Path | None = None
    duration_s: float = 0.0


class TrialEnded(Exception):
    """Base of the exceptions that end a trial before its budget is spent."""

    reason: FailureReason | None = None

    def __init__(self, message: str = "", step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


class TrialPruned(TrialEnded):
    """The pruner said stop; not a failure."""


class TrialStopped(TrialEnded):
    """Asked to stop from outside (preemption, cancel); a checkpoint was written first."""

    reason = FailureReason.PREEMPTED


class NonFiniteLoss(TrialEnded):
    reason = FailureReason.NAN


class ConfigError(ValueError):
    """The config cannot run (bad column, single-class data, too many layers...).

    Raised before training starts; the message names the field and says what to do.
    """
