"""The trial boundary: run one trial and say how it ended, whatever happened inside.

`run_trial` holds the project's one broad `except`. A warm slot process runs trial
after trial; a bug, a bad dataset or an out-of-memory in one trial must become a
classified outcome for the service, never a dead process.
"""

from __future__ import annotations

import gc
import logging
import traceback as tb
from dataclasses import dataclass
from typing import Literal

import torch

from trainer.config import TrialConfig
from trainer.loop import train
from trainer.outcome import ConfigError, NonFiniteLoss, TrialPruned, TrialResult, TrialStopped
from trainer.protocol import FailureReason
from trainer.runtime import ReportFn, Runtime

log = logging.getLogger(__name__)

TrialState = Literal["complete", "pruned", "failed"]


@dataclass
class TrialOutcome:
    """How one trial attempt ended."""

    state: TrialState
    result: TrialResult | None = None
    """Set when complete."""
    reason: FailureReason | None = None
    """Set when failed."""
    message: str = ""
    traceback: str | None = None
    """Only for unexpected errors; a ConfigError's message says it all."""
    step: int | None = None
    """The optimizer step the trial ended at, when known."""
    error_type: str | None = None
    """Class name of the exception that ended the trial ('ConfigError', 'OutOfMemoryError', ...)."""


def is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, host MemoryError, or a RuntimeError that says 'out of memory'
    (what other backends and older code paths raise)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory() -> None:
    """Give back what a failed trial held, so the next trial in this process starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _drop_tracebacks(exc: BaseException) -> None:
    """Cut an exception (and its causes) loose from the frames it was raised through.

    Those frames hold the model, optimizer state and activations; whoever keeps the
    exception object (a log record, a caller) would otherwise keep all of it alive.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if e.__traceback__ is not None:
            tb.clear_frames(e.__traceback__)
            e.__traceback__ = None
        todo += [e.__cause__, e.__context__]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def run_trial(config: TrialConfig, runtime: Runtime, report: ReportFn) -> TrialOutcome:
    """Train, and classify the ending: complete, pruned, or failed with a FailureReason."""
    try:
        result = train(config, runtime, report)
        return TrialOutcome(state="complete", result=result, step=result.step)
    except TrialPruned as exc:
        return TrialOutcome(state="pruned", message=str(exc), step=exc.step, error_type="TrialPruned")
    except TrialStopped as exc:
        return TrialOutcome(
            state="failed", reason=FailureReason.PREEMPTED, message=str(exc), step=exc.step, error_type="TrialStopped"
        )
    except NonFiniteLoss as exc:
        return TrialOutcome(
            state="failed", reason=FailureReason.NAN, message=str(exc), step=exc.step, error_type="NonFiniteLoss"
        )
    except ConfigError as exc:
        return TrialOutcome(
            state="failed", reason=FailureReason.ERROR, message=_one_line(exc), error_type="ConfigError"
        )
    # The one broad except of the project: whatever else a trial raises (a bug, a driver
    # error, an out-of-memory) must end as a classified outcome, so the warm slot process
    # survives to run the next trial and the service learns why this one failed.
    except Exception as exc:  # noqa: BLE001
        oom = is_oom(exc)
        outcome = TrialOutcome(
            state="failed",
            reason=FailureReason.OOM if oom else FailureReason.ERROR,
            message=f"{type(exc).__name__}: {_one_line(exc)}",
            traceback=tb.format_exc(),
            error_type=type(exc).__name__,
        )
        _drop_tracebacks(exc)
        if not oom:
            log.error("trial failed: %s", outcome.message)
    # Outside the except block: Python has dropped `exc` and its traceback by now.
    if oom:
        free_memory()
        log.warning("trial ran out of memory; memory released for the next trial: %s", outcome.message)
    return outcome
