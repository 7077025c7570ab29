"""The scheduler: leases over HTTP, retries, the reaper, and the warm Optuna state behind them.

No FastAPI here: routes call `Scheduler` methods, which raise domain errors.

- `warm.py`: per-study Optuna objects kept loaded in this API process.
- `buffer.py`: pre-asked trials, so a lease only claims a ready row.
- `leases.py`: grant, heartbeat, report, complete, fail (`Scheduler`).
- `sync.py`: applying tf_* outcomes to Optuna after each commit, idempotently.
- `reaper.py`: expired leases, study timeouts, repairs; the background loop.
- `checkpoints.py`: checkpoint uploads and downloads on disk.
- `release.py`: an admin takes a lease back from its worker.
"""

from __future__ import annotations

from service.scheduler.leases import Scheduler, get_scheduler

__all__ = ["Scheduler", "get_scheduler"]
