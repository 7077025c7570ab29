"""What a trial needs from the process that runs it, beyond its config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Metrics = dict[str, float]
# Called after each evaluation with the optimizer step and validation metrics;
# returns True when the trial should be pruned (stop now, cleanly).
ReportFn = Callable[[int, Metrics], bool]


def _never() -> bool:
    return False


@dataclass
class Runtime:
    """Per-trial runtime: where to write, where to resume from, when to stop."""

    work_dir: Path
    """Checkpoints and exports of this trial go here."""
    cache_dir: Path
    """Tokenised-data cache, shared by every trial on this machine."""
    device: str = "auto"
    """'auto' picks cuda when available, else cpu."""
    resume_from: Path | None = None
    """A checkpoint folder written by an earlier attempt of the same trial."""
    should_stop: Callable[[], bool] = field(default=_never)
    """Polled between steps: True means checkpoint now and raise TrialStopped (preemption)."""
    on_checkpoint: Callable[[Path, int], None] | None = None
    """Called with (folder, step) after each resumable checkpoint is written."""
    on_step: Callable[[int, int], None] | None = None
    """Progress: called with (step, total_steps) after each optimizer step."""
