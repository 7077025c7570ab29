"""Shared by the fuzz conftest and tests (importable by name, like sched_test_helpers):
the seeded study's spec, the `Seeded` ids, a small checkpoint tar."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from typing import Any

API = "/api/v1"

SPEC: dict[str, Any] = {
    "name": "fuzz",
    "model": {"kind": "named", "name": "all-minilm-l6-v2"},
    "dataset": {"kind": "named", "name": "tweets-sentiment"},
    "objectives": [{"metric": "accuracy", "direction": "maximize"}],
    "search_space": {
        "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
        "batch_size": {"type": "categorical", "choices": [16, 32, 64]},
        "num_layers": {"type": "int", "low": 2, "high": 6},
    },
    "sampler": {"name": "random", "seed": 7},
    "pruner": {"name": "median", "options": {"n_startup_trials": 2, "n_warmup_steps": 0}},
    "budget": {"n_trials": 50, "max_parallel": 3, "max_retries": 1},
}


@dataclass(frozen=True)
class Seeded:
    """Ids of real objects: `study_id` (the user's), `done_number` (a complete trial with a
    checkpoint), `number`/`lease_id` (a running trial and the worker's live lease on it)."""

    study_id: int
    done_number: int
    number: int
    lease_id: str


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def checkpoint_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b'{"step": 1}'
        info = tarfile.TarInfo("state.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
