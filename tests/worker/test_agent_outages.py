"""Outages longer than a lease (issue 14), with a real agent: neither an API restart nor a
database the API cannot reach throws away a running or finished trial.

The lease timeout is the worker fixtures' 3 s; each outage lasts well past it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from db_outage_helpers import DbOutage
from worker_test_helpers import Server, wait_for

from trainer.client import TuneForgeClient

pytestmark = pytest.mark.slow

SQLITE_ONLY = pytest.mark.parametrize("upgraded_db_url", ["sqlite"], indirect=True)


def reports(trial: dict[str, Any], attempt: int) -> list[int]:
    return sorted(r["step"] for r in trial["reports"] if r["attempt"] == attempt)


def started(api: TuneForgeClient, study_id: int) -> list[dict[str, Any]]:
    rows = api.list_trials(study_id, limit=200)["data"]
    return [api.get_trial(study_id, r["number"]) for r in rows if r["attempts"] >= 1]


def reporting_trial(api: TuneForgeClient, study_id: int) -> dict[str, Any] | None:
    for t in started(api, study_id):
        if t["state"] == "running" and reports(t, t["attempts"]):
            return t
    return None


@SQLITE_ONLY
def test_api_down_longer_than_the_lease_keeps_the_running_trial(
    api: TuneForgeClient, make_spec, run_agent, server: Server, lease_timeout: float
) -> None:
    study = api.create_study(make_spec("restart", fixed={"epochs": 6}, budget={"n_trials": 1, "max_retries": 2}))
    agent, thread = run_agent(burst=True, linger_s=2.0)
    n = wait_for(lambda: reporting_trial(api, study["id"]), 300, "a trial to report")["number"]
    server.stop()
    time.sleep(2 * lease_timeout + 1.0)  # every heartbeat of two lease periods is lost
    server.start()
    thread.join(timeout=400)
    assert not thread.is_alive()
    t = api.get_trial(study["id"], n)
    assert (t["state"], t["attempts"]) == ("complete", 1), t
    assert reports(t, 1) == list(range(3, 9 * 6 + 1, 3)), "every evaluation reached the server"
    assert [a["outcome"] for a in t["attempt_history"]] == ["complete"]
    assert api.get_study(study["id"])["status"] == "completed"


def test_a_trial_that_finishes_while_the_database_is_down_keeps_its_result(
    api: TuneForgeClient, make_spec, run_agent, server: Server, lease_timeout: float, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tuneforge.worker")
    study = api.create_study(make_spec("dbdown", fixed={"epochs": 3}, budget={"n_trials": 1, "max_retries": 2}))
    agent, thread = run_agent(burst=True, linger_s=2.0)
    n = wait_for(lambda: reporting_trial(api, study["id"]), 300, "a trial to report")["number"]
    ctx = server._server.config.app.state.ctx
    outage = DbOutage(ctx.db.engine, ctx.storage.engine)
    with outage.active():
        # The slot is free once training ended; the agent still holds the lease and
        # keeps trying to land its last checkpoint and then the result.
        wait_for(lambda: not agent.views(), 300, "the trial to finish training")
        time.sleep(2 * lease_timeout + 1.0)  # the lease would have expired twice over
        assert any("503" in r.getMessage() for r in caplog.records)
    thread.join(timeout=120)
    assert not thread.is_alive()
    t = api.get_trial(study["id"], n)
    assert (t["state"], t["attempts"]) == ("complete", 1), t
    assert [a["outcome"] for a in t["attempt_history"]] == ["complete"], "no retry ran"
    assert reports(t, 1) == list(range(3, 9 * 3 + 1, 3))
    s = api.get_study(study["id"])
    assert (s["status"], s["n_complete"], s["n_started"], s["n_failed"]) == ("completed", 1, 1, 0)
