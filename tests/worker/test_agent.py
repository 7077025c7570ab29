"""The worker agent against a real server over HTTP: studies run to the end, pruning,
cancellation, and the recoveries (a killed slot, a killed agent, SIGTERM, an outage).

Each agent starts a real slot process (spawn, imports torch), so these tests take
seconds each; trials are sized in steps of a tiny BERT so that "mid-trial" is a state
a test can wait for (a checkpoint uploaded, the trial still running).
"""

from __future__ import annotations

import io
import logging
import re
import signal
import tarfile
import time
from typing import Any

import pytest
from worker_test_helpers import alive, children_of, kill9, wait_for

from trainer.client import TuneForgeClient

pytestmark = pytest.mark.slow

# A long trial: 108 rows / batch 12 = 9 steps an epoch; evaluations and checkpoints every 3 steps.
LONG = {"epochs": 12}


def reports(trial: dict[str, Any], attempt: int) -> list[int]:
    return sorted(r["step"] for r in trial["reports"] if r["attempt"] == attempt)


def started_trials(api: TuneForgeClient, study_id: int) -> list[dict[str, Any]]:
    """Details of the study's trials that a worker has leased at least once, by number.

    Tests never assume trial numbers: the scheduler asks Optuna ahead of demand, and a
    pre-asked trial it drops keeps its number."""
    rows = api.list_trials(study_id, limit=200)["data"]
    return [api.get_trial(study_id, r["number"]) for r in rows if r["attempts"] >= 1]


def running_trial(
    api: TuneForgeClient, study_id: int, *, checkpoint_at_least: int = 0, reported: bool = False
) -> dict[str, Any] | None:
    """The first running trial that has uploaded a checkpoint of at least that step (and reported)."""
    for t in started_trials(api, study_id):
        if t["state"] != "running" or (t["checkpoint_step"] or 0) < checkpoint_at_least:
            continue
        if reported and not reports(t, t["attempts"]):
            continue
        return t
    return None


def only_trial(api: TuneForgeClient, study_id: int) -> dict[str, Any]:
    started = started_trials(api, study_id)
    assert len(started) == 1, started
    return started[0]


def resumed_step(caplog: pytest.LogCaptureFixture, number: int, attempt: int) -> int | None:
    pattern = re.compile(rf"trial #{number} attempt {attempt} .*resuming from step (\d+)")
    for record in caplog.records:
        match = pattern.search(record.getMessage())
        if match:
            return int(match.group(1))
    return None


def test_burst_worker_runs_a_study_to_completion(api: TuneForgeClient, make_spec, run_agent, server) -> None:
    study = api.create_study(make_spec("burst", budget={"n_trials": 3}))
    agent, thread = run_agent(burst=True)
    thread.join(timeout=400)
    assert not thread.is_alive(), "a burst worker exits once the study has no work left"

    done = api.get_study(study["id"])
    assert done["status"] == "completed"
    assert (done["n_complete"], done["n_pruned"], done["n_failed"]) == (3, 0, 0)
    trials = started_trials(api, study["id"])
    assert len(trials) == 3
    for detail in trials:
        assert detail["state"] == "complete"
        assert detail["value"] == pytest.approx(detail["metrics"]["loss"])
        # 9 steps, evaluations at 3 and 6 and the final one at 9: the learning curve is stored.
        assert reports(detail, 1) == [3, 6, 9]
        assert detail["checkpoint_step"] == 9  # the final model, uploaded after complete
    # The final model is downloadable as a tar that from_pretrained can load once extracted.
    response = api.http.get(f"/api/v1/studies/{study['id']}/trials/{trials[0]['number']}/checkpoint")
    assert response.status_code == 200 and response.headers["x-checkpoint-step"] == "9"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        assert "config.json" in tar.getnames()
    assert agent.ended == {"complete": 3}
    assert agent.slot_gaps() and max(agent.slot_gaps()) < 5.0

    # `tuneforge study watch` follows it to the end: here it has ended, so it says so and exits 0.
    from typer.testing import CliRunner

    from service.cli.main import app

    watched = CliRunner().invoke(
        app, ["study", "watch", str(study["id"]), "--server", server.url, "--token", api.token]
    )
    assert watched.exit_code == 0, watched.output
    assert "burst (completed): 3 complete, 0 pruned, 0 failed" in watched.output


def test_pruning_answer_and_trial_timeout_stop_trials(api: TuneForgeClient, make_spec, run_agent) -> None:
    # The threshold pruner prunes any loss above `upper` once past its warm-up steps: the
    # report at step 3 is inside the warm-up, the one at step 6 is pruned.
    pruned = api.create_study(
        make_spec(
            "prune",
            pruner={"name": "threshold", "options": {"upper": 1e-6, "n_warmup_steps": 5}},
            fixed={"epochs": 3},
            budget={"n_trials": 1},
        )
    )
    # A trial running past its study's trial_timeout_s is stopped and failed as a timeout.
    timed = api.create_study(
        make_spec("timeout", fixed=LONG, budget={"n_trials": 1, "max_retries": 0, "trial_timeout_s": 2.0})
    )
    agent, thread = run_agent(burst=True)
    thread.join(timeout=400)
    assert not thread.is_alive()

    t = only_trial(api, pruned["id"])
    assert t["state"] == "pruned"
    assert reports(t, 1) == [3, 6], "training stopped at the report that was answered prune=True"
    assert api.get_study(pruned["id"])["status"] == "completed"

    t = only_trial(api, timed["id"])
    assert t["state"] == "failed" and t["failure_reason"] == "timeout"
    assert max(reports(t, 1), default=0) < 9 * LONG["epochs"], "stopped long before the end of its budget"
    assert agent.ended == {"pruned": 1, "failed": 1}


def test_killed_slot_is_replaced_and_the_retry_resumes(
    api: TuneForgeClient, make_spec, run_agent, caplog: pytest.LogCaptureFixture, lease_timeout: float
) -> None:
    caplog.set_level(logging.INFO, logger="tuneforge.worker")
    study = api.create_study(make_spec("slotkill", fixed=LONG, budget={"n_trials": 2, "max_retries": 1}))
    agent, thread = run_agent(burst=True, linger_s=5.0)
    first = wait_for(lambda: running_trial(api, study["id"], checkpoint_at_least=6), 300, "a checkpoint upload")
    n = first["number"]
    runner = agent.runners[0]
    old_pid = runner.slot.pid
    assert old_pid is not None
    kill9(old_pid)
    killed_at = time.monotonic()

    wait_for(lambda: api.get_trial(study["id"], n)["attempts"] >= 2, lease_timeout + 10, "the retry to start")
    assert time.monotonic() - killed_at < lease_timeout + 1.0 + 5.0  # lease timeout + one reaper pass, at most
    thread.join(timeout=400)
    assert not thread.is_alive()

    assert runner.slot.pid != old_pid and runner.slot.starts == 2, "the agent replaced the slot process"
    done = api.get_study(study["id"])
    assert done["status"] == "completed" and done["n_complete"] == 2
    t0 = api.get_trial(study["id"], n)
    assert t0["state"] == "complete" and t0["attempts"] == 2
    resume = resumed_step(caplog, n, 2)
    assert resume is not None and resume >= 6 and resume in reports(t0, 1)
    # The retry starts at the checkpoint's step: its first evaluation is the next one after it.
    assert reports(t0, 2)[0] == resume + 3


def test_killed_agent_trial_is_reaped_and_resumed_by_another_agent(
    api: TuneForgeClient, make_spec, spawn_agent, run_agent, lease_timeout: float
) -> None:
    study = api.create_study(make_spec("agentkill", fixed=LONG, budget={"n_trials": 1, "max_retries": 1}))
    first = spawn_agent()
    running = wait_for(lambda: running_trial(api, study["id"], checkpoint_at_least=6), 300, "a checkpoint upload")
    n = running["number"]
    slots = children_of(first.proc.pid)
    kill9(first.proc.pid)
    first.proc.wait(timeout=10)
    killed_at = time.monotonic()
    # The slots notice their agent is gone and exit instead of training for nobody.
    wait_for(lambda: not any(children_of(pid) or alive(pid) for pid in slots), 15, "the orphaned slots to exit")

    waiting = wait_for(
        lambda: (t := api.get_trial(study["id"], n))["state"] != "running" and t,
        lease_timeout + 10,
        "the reaper to take the trial back",
    )
    assert (
        time.monotonic() - killed_at <= lease_timeout + 0.5 + 4.0
    )  # lease timeout + one reaper pass (+ polling slack)
    assert waiting["state"] == "waiting" and waiting["failure_reason"] == "expired"
    checkpoint = waiting["checkpoint_step"]
    assert checkpoint is not None and checkpoint >= running["checkpoint_step"]

    agent, thread = run_agent(burst=True)
    thread.join(timeout=400)
    assert not thread.is_alive()
    t = api.get_trial(study["id"], n)
    assert t["state"] == "complete" and t["attempts"] == 2
    assert reports(t, 2)[0] == checkpoint + 3, "the retry resumed from the last uploaded checkpoint"
    assert api.get_study(study["id"])["status"] == "completed"


def test_sigterm_is_warm_then_cold(api: TuneForgeClient, make_spec, spawn_agent, run_agent) -> None:
    study = api.create_study(make_spec("sigterm", fixed=LONG, budget={"n_trials": 1, "max_retries": 1}))

    # First SIGTERM: the trial checkpoints where it is, is handed back as preempted, the agent exits 0.
    warm = spawn_agent()
    n = wait_for(lambda: running_trial(api, study["id"], checkpoint_at_least=3), 300, "a trial to run")["number"]
    warm.signal(signal.SIGTERM)
    assert warm.wait(timeout=60) == 0
    assert "warm shutdown" in warm.output() and "failed (preempted)" in warm.output()
    t = api.get_trial(study["id"], n)
    assert t["state"] == "waiting" and t["failure_reason"] == "preempted"
    stopped_at = t["checkpoint_step"]
    assert stopped_at is not None and stopped_at >= max(reports(t, 1))

    # The retry resumes at the stop step. A second SIGTERM right after the first: stop at once.
    cold = spawn_agent()
    t = wait_for(
        lambda: (t := api.get_trial(study["id"], n))["attempts"] == 2 and reports(t, 2) and t,
        300,
        "the retry to report",
    )
    first_eval = (stopped_at // 3 + 1) * 3
    assert reports(t, 2)[0] == first_eval, "the retry started at the step the first agent stopped at"
    slots = children_of(cold.proc.pid)
    cold.signal(signal.SIGTERM)
    time.sleep(0.2)
    cold.signal(signal.SIGTERM)
    t0 = time.monotonic()
    cold.wait(timeout=15)
    assert time.monotonic() - t0 < 10
    assert "cold shutdown" in cold.output()
    # Slots are SIGKILLed; multiprocessing's resource tracker follows once its pipe closes.
    wait_for(lambda: not any(alive(pid) for pid in slots), 5, "a cold shutdown to kill the slots")

    # The cold-stopped lease expires; the reaper retries it and a third agent finishes the study.
    agent, thread = run_agent(burst=True, linger_s=15.0)
    thread.join(timeout=400)
    assert not thread.is_alive()
    t = api.get_trial(study["id"], n)
    assert t["state"] == "complete" and t["attempts"] == 3
    assert api.get_study(study["id"])["status"] == "completed"


def test_cancelling_a_study_stops_its_running_trial(
    api: TuneForgeClient, make_spec, run_agent, lease_timeout: float
) -> None:
    study = api.create_study(make_spec("cancel", fixed=LONG, budget={"n_trials": 3}))
    agent, thread = run_agent(burst=True)
    n = wait_for(lambda: running_trial(api, study["id"], reported=True), 300, "a trial to report")["number"]
    api.cancel_study(study["id"])
    cancelled_at = time.monotonic()
    heartbeat = lease_timeout / 3
    wait_for(lambda: not agent.views(), heartbeat + 5, "the running trial to stop")
    assert time.monotonic() - cancelled_at < heartbeat + 3.0
    thread.join(timeout=60)
    assert not thread.is_alive()
    s = api.get_study(study["id"])
    assert s["status"] == "cancelled"
    assert s["n_started"] == 1, "no new trial of a cancelled study starts"
    t = api.get_trial(study["id"], n)
    assert t["state"] == "failed" and max(reports(t, 1)) < 9 * LONG["epochs"]



@pytest.mark.parametrize("lease_timeout", [30.0])
def test_server_outage_keeps_the_trial_and_its_result(
    api: TuneForgeClient, make_spec, run_agent, server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tuneforge.worker")
    study = api.create_study(make_spec("outage", fixed={"epochs": 12}, budget={"n_trials": 1}))
    agent, thread = run_agent(burst=True, linger_s=2.0)
    n = wait_for(lambda: running_trial(api, study["id"], reported=True), 300, "a trial to report")["number"]
    server.stop()
    time.sleep(4.0)
    server.start()
    thread.join(timeout=400)
    assert not thread.is_alive()
    assert any("kept for later" in r.getMessage() or "unreachable" in r.getMessage() for r in caplog.records)
    t = api.get_trial(study["id"], n)
    assert t["state"] == "complete" and t["attempts"] == 1, "the trial survived the outage under its first lease"
    # Every evaluation reached the server, those made during the outage included.
    assert reports(t, 1) == list(range(3, 9 * 12 + 1, 3))
    assert api.get_study(study["id"])["status"] == "completed"
