"""Fixtures for the OpenAPI fuzz: an app with no background work (so runs are
repeatable) and `seed`, which makes real objects through the API for fuzzed
requests to reach: a study owned by the user token, a trial completed with a
checkpoint, and a live lease held by the worker token.

The parent conftest parametrises `client` (and so everything here) over SQLite
and PostgreSQL.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fuzz_helpers import API, SPEC, Seeded, bearer, checkpoint_tar


@pytest.fixture
def app_hooks() -> list[Any]:
    # No trial buffer or reaper threads: what the fuzz sees depends on its requests only.
    return []


@pytest.fixture
def seed(client: TestClient, user_token: str, worker_token: str) -> Callable[[], Seeded]:
    """`seed()` makes a fresh study through the API (a new name each call), completes one
    trial with a checkpoint and leaves a second one leased; returns their ids.
    `seed(cancelled=True)` cancels the study afterwards (the lease stays live)."""
    names = itertools.count()
    user, worker = bearer(user_token), bearer(worker_token)

    def make(*, cancelled: bool = False) -> Seeded:
        spec = copy.deepcopy(SPEC)
        spec["name"] = f"fuzz-{next(names)}"
        r = client.post(f"{API}/studies", json=spec, headers=user)
        assert r.status_code == 201, r.text
        study_id = int(r.json()["id"])

        def take() -> dict[str, Any]:
            # Grants go to the study with the fewest running trials: ask until ours answers.
            for _ in range(20):
                g = client.post(f"{API}/leases", json={"worker_id": "fuzz:1", "slot": "0"}, headers=worker)
                assert g.status_code == 200, g.text
                if g.json()["study_id"] == study_id:
                    return g.json()
            raise AssertionError(f"no lease on study {study_id}")

        done = take()
        base = f"{API}/leases/{done['lease_id']}"
        r = client.put(
            f"{base}/checkpoint", content=checkpoint_tar(), headers={**worker, "X-Checkpoint-Step": "1"}
        )
        assert r.status_code == 200, r.text
        r = client.post(
            f"{base}/complete", json={"metrics": {"accuracy": 0.75}, "step": 1, "duration_s": 1.0}, headers=worker
        )
        assert r.status_code == 200, r.text
        live = take()
        if cancelled:
            r = client.post(f"{API}/studies/{study_id}/cancel", headers=user)
            assert r.status_code == 200, r.text
        return Seeded(study_id, int(done["trial_number"]), int(live["trial_number"]), str(live["lease_id"]))

    return make
