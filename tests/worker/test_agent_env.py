"""Clients are built while slots start: httpx reads the proxy settings by iterating
os.environ, and a slot start adds and removes CUDA_VISIBLE_DEVICES around its spawn.
Unlocked, the two once raced and killed an agent's heartbeat thread (KeyError)."""

from __future__ import annotations

import os
import sys
import threading

from trainer.worker.agent import Agent, WorkerOptions
from trainer.worker.slots import ENV_LOCK

VAR = "TUNEFORGE_TEST_SLOT_ENV"


def test_clients_are_never_built_while_a_slot_start_changes_the_environment() -> None:
    agent = Agent(WorkerOptions(server="http://127.0.0.1:9", token="tf_x"))
    done = threading.Event()

    def slot_starts() -> None:
        # What Slot.start does around each spawn, as fast as it can.
        while not done.is_set():
            with ENV_LOCK:
                os.environ[VAR] = "0"
                os.environ.pop(VAR, None)

    churn = threading.Thread(target=slot_starts, daemon=True)
    errors: list[BaseException] = []
    # Switch threads as often as possible, so an unlocked iteration is interrupted by the
    # other thread's change within a few clients (the default switches every 5 ms).
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    churn.start()
    try:
        for _ in range(100):
            try:
                agent.client_factory().http.close()
            except BaseException as exc:  # the race showed as KeyError or RuntimeError
                errors.append(exc)
    finally:
        done.set()
        churn.join(timeout=10)
        sys.setswitchinterval(interval)
    assert errors == []
    assert VAR not in os.environ
