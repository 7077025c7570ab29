"""The worker agent: leases trials for free slots, keeps the leases alive, reports outcomes.

Threads of one agent process:
- the main thread leases work for idle slots and handles SIGTERM / Ctrl-C;
- one runner thread per slot hands a lease to its warm slot process, relays the
  trial's reports to the server and the pruning answers back, enforces the trial
  timeout and replaces a slot that died;
- one uploader thread per slot sends checkpoints while training goes on;
- a short-lived finisher thread per trial sends its end (complete or fail) after its
  last checkpoint is up, so the slot takes its next trial meanwhile;
- one heartbeat thread extends every held lease and passes stop signals (study
  cancelled, trial pruned) to the slots.

All HTTP goes through `trainer.client.TuneForgeClient`, which retries connection
errors and 5xx with backoff; the agent adds the outer loop for what must not be lost:
a finished trial's end is sent until the server answers or says the lease is gone.

Shutdown follows rq: the first SIGTERM (or Ctrl-C) is warm (running trials
checkpoint, stop and are handed back as `preempted`, so their retries resume), the
second is cold (slots are killed at once; the leases expire and the reaper retries).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TypeVar

from trainer.client import ClientError, ServerUnavailable, TuneForgeClient
from trainer.protocol import (
    MAX_MESSAGE,
    MAX_STEP,
    MAX_TRACEBACK,
    CompleteRequest,
    FailRequest,
    FailureReason,
    HeartbeatRequest,
    LeaseGrant,
    LeaseRequest,
    ReportRequest,
    clean_text,
    finite_metrics,
)
from trainer.worker.archive import UnsafeArchive, pack, unpack
from trainer.worker.slots import ENV_LOCK, Slot, SlotDied, SlotOutcome, SlotSpec, TrialJob

log = logging.getLogger("tuneforge.worker")

Metrics = dict[str, float]
ClientFactory = Callable[[], TuneForgeClient]
T = TypeVar("T")

# How long a trial gets, after being asked to stop, to checkpoint and return before its
# slot is killed. A checkpoint of a MiniLM-sized model takes well under a second.
STOP_GRACE_S = 30.0
# Longest wait between two tries of something that must reach the server.
RETRY_CAP_S = 10.0


def backoff(attempt: int, base: float = 0.5, cap: float = RETRY_CAP_S) -> float:
    """Exponential backoff with full jitter: agents that lost the server at the same
    moment do not all come back at the same moment."""
    return random.uniform(0, min(cap, base * 2**attempt))


def is_lease_lost(exc: ClientError) -> bool:
    """409: the lease expired (the reaper took the trial back) or is not ours; 404: gone."""
    return exc.status_code in (404, 409)


def parse_gpus(value: str) -> list[str] | None:
    """`--gpus`: 'auto' (the GPUs this process may see), 'none'/'cpu', or a list like '0,1'.

    'auto' reads CUDA_VISIBLE_DEVICES, else asks nvidia-smi; importing torch here would
    cost the agent seconds and a CUDA context it never uses.
    """
    value = value.strip().lower()
    if value in ("none", "cpu", ""):
        return None
    if value != "auto":
        return [part.strip() for part in value.split(",") if part.strip()] or None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [part.strip() for part in visible.split(",") if part.strip() and part.strip() != "-1"] or None
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    count = sum(1 for line in listing.splitlines() if line.startswith("GPU "))
    return [str(i) for i in range(count)] or None


@dataclass
class WorkerOptions:
    server: str
    token: str
    gpus: list[str] | None = None
    """CUDA_VISIBLE_DEVICES values, one per GPU; None runs slots on the CPU."""
    slots_per_gpu: int = 1
    cpu_slots: int = 1
    cache_dir: Path = Path(".tuneforge/worker/cache")
    work_dir: Path = Path(".tuneforge/worker/work")
    burst: bool = False
    """Exit when the server has no work and no trial runs here (tests, batch jobs), like rq's burst mode."""
    linger_s: float = 0.0
    """Burst mode keeps asking this long after the first empty answer (a retry appears after a reaper pass)."""
    idle_poll_s: float = 2.0
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    stop_grace_s: float = STOP_GRACE_S
    slot_log_level: int = logging.INFO

    def slot_specs(self) -> list[SlotSpec]:
        cache = self.cache_dir.resolve()
        if self.gpus:
            # GPU slots still use CPU threads (collation, the optimizer's host work,
            # torch.compile's workers): the node's cores are split between them too.
            threads = max(1, (os.cpu_count() or 1) // (len(self.gpus) * self.slots_per_gpu))
            return [
                SlotSpec(name=f"gpu{gpu}/{i}", gpu=gpu, cache_dir=cache, threads=threads, log_level=self.slot_log_level)
                for gpu in self.gpus
                for i in range(self.slots_per_gpu)
            ]
        threads = max(1, (os.cpu_count() or 1) // self.cpu_slots)
        return [
            SlotSpec(name=f"cpu/{i}", gpu=None, cache_dir=cache, threads=threads, log_level=self.slot_log_level)
            for i in range(self.cpu_slots)
        ]


@dataclass
class TrialView:
    """What the live view shows about a running trial (a copy, safe to read from any thread)."""

    slot: str
    study_id: int
    study_name: str
    trial_number: int
    attempt: int
    step: int
    total_steps: int | None
    metrics: Metrics
    elapsed_s: float


@dataclass(frozen=True)
class TrialRecord:
    """One trial as a slot of this agent ran it (benchmarks, tests). Times are time.monotonic."""

    slot: str
    study_id: int
    trial_number: int
    attempt: int
    state: str
    step: int | None
    first_step_at: float | None
    ended_at: float
    gap_s: float | None
    """From the slot's previous trial end to this trial's first optimizer step."""


class RunningTrial:
    """One lease held by this agent, from grant until the server took its end."""

    def __init__(self, grant: LeaseGrant, slot: str) -> None:
        self.grant = grant
        self.slot = slot
        self.granted_at = time.monotonic()
        self.started_at: float | None = None
        self.step = 0
        self.total_steps: int | None = None
        self.metrics: Metrics = {}
        self.stop_reason: str | None = None
        """Why the trial was asked to stop: 'timeout', 'preempted', 'lost' or the server's reason."""
        self.lost = False
        """The server said the lease is gone: nothing more is sent for it."""
        self.ending = False
        """The trial's end is being sent."""
        self.next_heartbeat = self.granted_at + grant.heartbeat_interval_s
        self.backlog: list[ReportRequest] = []
        """Reports the server did not take while it was unreachable, sent before the next one."""

    @property
    def lease_id(self) -> str:
        return self.grant.lease_id

    def label(self) -> str:
        g = self.grant
        return f"study {g.study_name!r} ({g.study_id}) trial #{g.trial_number} attempt {g.attempt}"


def retry_until_answered(call: Callable[[], T], what: str, give_up: threading.Event) -> T:
    """Call until the server answers; ClientError (an answer) propagates. `give_up` ends
    the wait with the last ServerUnavailable (a cold shutdown)."""
    attempt = 0
    while True:
        try:
            return call()
        except ServerUnavailable as exc:
            if give_up.is_set():
                raise
            log.warning("server unreachable for %s (%s); retrying", what, exc)
            give_up.wait(backoff(attempt))
            attempt += 1


class Uploader:
    """Uploads one slot's checkpoints in the background; per lease only the newest pending one matters."""

    def __init__(self, agent: Agent, name: str) -> None:
        self._agent = agent
        self._cond = threading.Condition()
        self._pending: dict[str, tuple[RunningTrial, Path, int]] = {}
        self._busy: str | None = None
        threading.Thread(target=self._loop, name=f"upload-{name}", daemon=True).start()

    def submit(self, trial: RunningTrial, archive: Path, step: int) -> None:
        with self._cond:
            older = self._pending.get(trial.lease_id)
            if older is not None:
                older[1].unlink(missing_ok=True)  # superseded: the server keeps only the newest anyway
            self._pending[trial.lease_id] = (trial, archive, step)
            self._cond.notify_all()

    def flush(self, lease_id: str, timeout_s: float) -> bool:
        """Wait until the lease has nothing pending or uploading; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while lease_id in self._pending or self._busy == lease_id:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _loop(self) -> None:
        client = self._agent.client_factory()
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                lease_id = next(iter(self._pending))
                trial, archive, step = self._pending.pop(lease_id)
                self._busy = lease_id
            try:
                self._upload(client, trial, archive, step)
            finally:
                archive.unlink(missing_ok=True)
                with self._cond:
                    self._busy = None
                    self._cond.notify_all()

    def _upload(self, client: TuneForgeClient, trial: RunningTrial, archive: Path, step: int) -> None:
        attempt = 0
        while not trial.lost and not self._agent.cold.is_set():
            try:
                client.upload_checkpoint(trial.lease_id, archive, step)
            except ServerUnavailable as exc:
                with self._cond:
                    if trial.lease_id in self._pending:
                        return  # a newer checkpoint of the lease is waiting; send that one instead
                log.warning("checkpoint upload for %s failed, retrying: %s", trial.label(), exc)
                self._agent.cold.wait(backoff(attempt))
                attempt += 1
                continue
            except ClientError as exc:
                trial.lost = trial.lost or is_lease_lost(exc)
                log.warning("checkpoint upload for %s refused: %s", trial.label(), exc)
                return
            except OSError as exc:
                log.warning("checkpoint archive for %s unreadable: %s", trial.label(), exc)
                return
            log.debug("checkpoint of step %d uploaded for %s", step, trial.label())
            return


@dataclass
class Ending:
    """What to tell the server about a trial that ended in a slot."""

    kind: str
    """complete | pruned | failed"""
    step: int | None
    duration_s: float
    metrics: Metrics = field(default_factory=dict)
    reason: FailureReason | None = None
    message: str = ""
    traceback: str | None = None
    note: str = ""
    """Extra words for the log line (slot gap)."""
    export_dir: Path | None = None
    """A complete trial's exported model, uploaded as its final checkpoint after `complete`."""

    @classmethod
    def from_outcome(cls, outcome: SlotOutcome, trial: RunningTrial) -> Ending:
        if outcome.state in ("complete", "pruned"):
            return cls(
                outcome.state, outcome.step, outcome.duration_s, dict(outcome.metrics), export_dir=outcome.export_dir
            )
        reason = _failure_reason(outcome.reason, trial.stop_reason)
        message = outcome.message
        if trial.stop_reason not in (None, "timeout", "preempted", "lost"):
            message = f"{message} (stopped by the server: {trial.stop_reason})".strip()
        return cls("failed", outcome.step, outcome.duration_s, {}, reason, message, outcome.traceback)


# Heartbeat stop reasons the agent reads as its own: the scheduler's trial timeout is a
# timeout failure; a lease the server already finished is a lost lease (nothing to send).
_SERVER_STOP_REASONS = {"trial timeout": "timeout", "trial finished": "lost", "trial pruned": "lost"}


def _failure_reason(reported: str | None, stop_reason: str | None) -> FailureReason:
    # A trial the agent stopped ends as TrialStopped (preempted); say why it was stopped.
    if stop_reason == "timeout":
        return FailureReason.TIMEOUT
    if reported is not None:
        with contextlib.suppress(ValueError):
            return FailureReason(reported)
    return FailureReason.ERROR


def _log_end(trial: RunningTrial, ending: Ending, answered: bool) -> None:
    """The one line per trial end: study, trial, attempt, outcome, duration, slot gap."""
    took = f" in {ending.duration_s:.1f} s"
    lost = "" if answered else " (not recorded: lease lost)"
    if ending.kind == "complete":
        outcome = f"complete {_fmt_metrics(ending.metrics)}"
    elif ending.kind == "pruned":
        outcome = f"pruned at step {ending.step}"
    else:
        outcome = f"failed ({ending.reason}) at step {ending.step}"
    detail = f": {ending.message[:300]}" if ending.kind == "failed" else ""
    log.info("trial end: %s: %s%s%s%s%s", trial.label(), outcome, took, ending.note, lost, detail)


def _fmt_metrics(metrics: Metrics) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def _finite(metrics: Metrics) -> Metrics:
    # JSON has no NaN; a diverged metric is left out rather than breaking the request.
    return finite_metrics(metrics)


class SlotRunner:
    """Owns one slot: runs the leases the agent assigns to it, one after another."""

    def __init__(self, agent: Agent, spec: SlotSpec) -> None:
        self.agent = agent
        self.spec = spec
        self.slot = Slot(spec)
        self.uploader = Uploader(agent, spec.name)
        self.client = agent.client_factory()
        self.current: RunningTrial | None = None
        self.last_end: float | None = None
        self.records: list[TrialRecord] = []
        self._assigned: LeaseGrant | None = None
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self.ready = threading.Event()
        self.exited = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"slot-{spec.name}", daemon=True)

    # -- called from other threads

    @property
    def idle(self) -> bool:
        with self._lock:
            return self.ready.is_set() and self._assigned is None and self.current is None

    def assign(self, grant: LeaseGrant) -> None:
        with self._lock:
            self._assigned = grant
        self._wake.set()

    def stop_trial(self, reason: str, lease_id: str | None = None) -> None:
        """Ask the running trial (only `lease_id`'s, if given) to checkpoint and stop; the first reason wins."""
        with self._lock:
            trial = self.current
            if trial is None or (lease_id is not None and trial.lease_id != lease_id):
                return
            if trial.stop_reason is None:
                trial.stop_reason = reason
            # Under the lock, so a stop meant for this trial cannot land on the next one.
            self.slot.request_stop()

    def wake(self) -> None:
        self._wake.set()

    def view(self) -> TrialView | None:
        trial = self.current
        if trial is None:
            return None
        g = trial.grant
        return TrialView(
            slot=self.spec.name,
            study_id=g.study_id,
            study_name=g.study_name,
            trial_number=g.trial_number,
            attempt=g.attempt,
            step=trial.step,
            total_steps=trial.total_steps,
            metrics=dict(trial.metrics),
            elapsed_s=time.monotonic() - (trial.started_at or trial.granted_at),
        )

    # -- the runner thread

    def _loop(self) -> None:
        try:
            while not self.agent.stopping.is_set():
                if not self.slot.alive and not self._start_slot():
                    continue
                if not self.ready.is_set():
                    self.ready.set()
                    self.agent.wake()  # the lease loop asks for work for this slot now
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                with self._lock:
                    grant, self._assigned = self._assigned, None
                    trial = self.current = RunningTrial(grant, self.spec.name) if grant else None
                    if trial is not None:
                        # Under the lock that stop_trial takes: from here on a stop is this trial's.
                        self.slot.clear_stop()
                if trial is None:
                    continue
                try:
                    self._run(trial)
                finally:
                    with self._lock:
                        self.current = None
                    self.agent.wake()
            # A lease granted while the shutdown began, not started yet: hand it back.
            with self._lock:
                grant, self._assigned = self._assigned, None
            if grant is not None:
                trial = RunningTrial(grant, self.spec.name)
                self.agent.hold(trial)
                self.agent.finish(
                    self, trial, Ending("failed", None, 0.0, reason=FailureReason.PREEMPTED, message="worker shut down")
                )
        finally:
            if self.agent.cold.is_set():
                self.slot.kill()
            else:
                self.slot.close()
            self.exited.set()
            self.agent.wake()

    def _start_slot(self) -> bool:
        self.ready.clear()
        try:
            self.slot.start()
        except SlotDied as exc:
            log.error("slot %s failed to start: %s; trying again", self.spec.name, exc)
            self.agent.stopping.wait(5.0)
            return False
        return True

    def _run(self, trial: RunningTrial) -> None:
        g = trial.grant
        self.agent.hold(trial)
        work = self.agent.work_dir(g.lease_id)
        work.mkdir(parents=True, exist_ok=True)
        resume = self._fetch_resume(trial, work) if g.resume_checkpoint else None
        if trial.lost:
            self.agent.release(trial)
            shutil.rmtree(work, ignore_errors=True)
            return
        log.info(
            "trial start: %s on slot %s (lease %s%s)",
            trial.label(),
            self.spec.name,
            g.lease_id,
            f", resuming from step {trial.step}" if resume else "",
        )
        job = TrialJob(
            lease_id=g.lease_id,
            config=g.config,
            work_dir=work / "trial",
            upload_dir=work / "uploads",
            resume_from=resume,
        )
        if trial.stop_reason is not None:
            # Stopped (a warm shutdown, a cancelled study) while its checkpoint was downloading.
            self.agent.finish(
                self,
                trial,
                Ending(
                    "failed",
                    trial.step or None,
                    0.0,
                    reason=FailureReason.PREEMPTED,
                    message=f"stopped before it started: {trial.stop_reason}",
                ),
            )
            return
        t0 = time.monotonic()
        try:
            if not self.slot.alive:
                # Died while idle (the kernel's OOM killer, an operator): not this trial's doing.
                log.warning("slot %s died while idle; starting it again", self.spec.name)
                self.slot.start()
            outcome = self.slot.run(job, _Events(self, trial))
        except SlotDied as exc:
            self.last_end = None
            self._slot_died(trial, exc, time.monotonic() - t0)
            return
        ended_at = time.monotonic()
        ending = Ending.from_outcome(outcome, trial)
        gap = None
        if outcome.first_step_at is not None and self.last_end is not None:
            gap = outcome.first_step_at - self.last_end
            ending.note = f", slot gap {gap:.2f} s"
        self.last_end = ended_at
        g = trial.grant
        self.records.append(
            TrialRecord(
                self.spec.name,
                g.study_id,
                g.trial_number,
                g.attempt,
                outcome.state,
                outcome.step,
                outcome.first_step_at,
                ended_at,
                gap,
            )
        )
        self.agent.finish(self, trial, ending)

    def _fetch_resume(self, trial: RunningTrial, work: Path) -> Path | None:
        archive = work / "resume.tar"
        try:
            step = retry_until_answered(
                lambda: self.client.download_checkpoint(trial.lease_id, archive),
                f"the checkpoint of {trial.label()}",
                self.agent.stopping,
            )
        except ServerUnavailable:
            return None  # shutting down; the trial is handed back before it starts
        except ClientError as exc:
            trial.lost = is_lease_lost(exc)
            log.warning("no checkpoint to resume %s from: %s", trial.label(), exc)
            return None
        if step is None:
            log.info("no checkpoint stored for %s yet: starting from scratch", trial.label())
            return None
        try:
            folder = unpack(archive, work / "resume", inside=work)
        except UnsafeArchive as exc:
            log.error("refusing the checkpoint of %s: %s; starting from scratch", trial.label(), exc)
            return None
        finally:
            archive.unlink(missing_ok=True)
        trial.step = step
        return folder

    def _slot_died(self, trial: RunningTrial, exc: SlotDied, elapsed: float) -> None:
        if self.agent.cold.is_set() or trial.lost:
            # Killed by us in a cold shutdown (the lease expires and the reaper retries the
            # trial), or the lease is gone anyway: nothing to tell the server.
            log.info("trial end: %s: slot stopped (%s), lease left to the reaper", trial.label(), exc)
            self.agent.release(trial)
            return
        if trial.stop_reason == "timeout":
            message = (
                f"trial did not stop within {self.agent.options.stop_grace_s:.0f} s of its "
                f"{trial.grant.trial_timeout_s} s timeout; slot killed"
            )
            ending = Ending("failed", trial.step, elapsed, reason=FailureReason.TIMEOUT, message=message)
        else:
            log.error("slot %s died during %s: %s; replacing it", self.spec.name, trial.label(), exc)
            # Not the trial's fault as far as we know (the kernel's OOM killer, an operator):
            # the retry resumes from the last checkpoint that reached the server.
            ending = Ending("failed", trial.step, elapsed, reason=FailureReason.ERROR, message=str(exc))
        self.agent.finish(self, trial, ending)


class _Events:
    """The runner's answers to one trial's messages (runs on the runner thread)."""

    def __init__(self, runner: SlotRunner, trial: RunningTrial) -> None:
        self.runner = runner
        self.trial = trial
        timeout = trial.grant.trial_timeout_s
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.kill_at: float | None = None

    def on_started(self, at: float) -> None:
        self.trial.started_at = at

    def on_step(self, step: int, total: int) -> None:
        self.trial.step, self.trial.total_steps = step, total

    def on_report(self, step: int, metrics: Metrics) -> bool:
        trial, client = self.trial, self.runner.client
        trial.step, trial.metrics = step, dict(metrics)
        if trial.lost:
            return False
        request = ReportRequest(step=min(step, MAX_STEP), metrics=_finite(metrics))
        if not self.runner.agent.flush_backlog(client, trial):
            trial.backlog.append(request)
            return False
        try:
            answer = client.report(trial.lease_id, request)
        except ServerUnavailable as exc:
            # Training goes on; the curve point is sent once the server is back, and the
            # pruner decides at the next report that gets through.
            log.warning("report of %s at step %d kept for later: %s", trial.label(), step, exc)
            trial.backlog.append(request)
            return False
        except ClientError as exc:
            if not is_lease_lost(exc):
                # A report the server cannot use (e.g. the objective's metric is missing) is
                # its answer, not a reason to stop training: the final result may still count.
                log.error("server refused the report of %s at step %d: %s", trial.label(), step, exc)
                return False
            log.warning("lease of %s lost (%s); stopping the trial", trial.label(), exc)
            trial.lost = True
            self.runner.stop_trial("lost", trial.lease_id)
            return False
        return answer.prune

    def on_checkpoint(self, archive: Path, step: int) -> None:
        if self.trial.lost:
            archive.unlink(missing_ok=True)
            return
        self.runner.uploader.submit(self.trial, archive, step)

    def on_tick(self) -> None:
        trial, runner = self.trial, self.runner
        now = time.monotonic()
        if runner.agent.cold.is_set():
            runner.slot.kill()
            return
        if self.deadline is not None and now >= self.deadline and trial.stop_reason != "timeout":
            log.warning("%s ran past its %s s timeout; stopping it", trial.label(), trial.grant.trial_timeout_s)
            with runner._lock:
                trial.stop_reason = "timeout"  # overrides an earlier reason: this one decides the outcome
                runner.slot.request_stop()
        if trial.stop_reason is not None and self.kill_at is None:
            self.kill_at = now + runner.agent.options.stop_grace_s
        if self.kill_at is not None and now >= self.kill_at:
            log.error("%s did not stop in time; killing slot %s", trial.label(), runner.spec.name)
            self.kill_at = math.inf
            runner.slot.kill()


class Agent:
    def __init__(self, options: WorkerOptions, client_factory: ClientFactory | None = None) -> None:
        self.options = options
        factory = client_factory or (lambda: TuneForgeClient(options.server, token=options.token))

        def make_client() -> TuneForgeClient:
            # httpx iterates os.environ (proxy settings) while building a client; a slot
            # starting in another thread adds and removes variables meanwhile, which once
            # killed the heartbeat thread with a KeyError.
            with ENV_LOCK:
                return factory()

        self.client_factory: ClientFactory = make_client
        self.stopping = threading.Event()
        """Warm shutdown: no new leases; running trials checkpoint and are handed back."""
        self.cold = threading.Event()
        """Cold shutdown: slots are killed at once, nothing more is sent."""
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._held: dict[str, RunningTrial] = {}
        """Leases this agent holds, from grant until the server took the trial's end: heartbeats go to these."""
        self._finishers: list[threading.Thread] = []
        self.runners = [SlotRunner(self, spec) for spec in options.slot_specs()]
        self.ended: dict[str, int] = {}
        """How trials ended here, by kind: the summary for tests and the live view."""

    # -- control, from any thread

    def wake(self) -> None:
        self._wake.set()

    def shutdown(self, *, cold: bool = False) -> None:
        if cold:
            log.warning("cold shutdown: killing slots")
            self.cold.set()
            for r in self.runners:
                r.slot.kill()
        elif not self.stopping.is_set():
            log.warning("warm shutdown: running trials checkpoint and are handed back (signal again for cold)")
        self.stopping.set()
        for r in self.runners:
            r.stop_trial("preempted")
            r.wake()
        self.wake()

    def views(self) -> list[TrialView]:
        return [v for v in (r.view() for r in self.runners) if v is not None]

    def records(self) -> list[TrialRecord]:
        return [rec for r in self.runners for rec in r.records]

    def slot_gaps(self) -> list[float]:
        """Seconds from one trial's end to the next one's first optimizer step, per slot."""
        return [rec.gap_s for rec in self.records() if rec.gap_s is not None]

    # -- leases held

    def hold(self, trial: RunningTrial) -> None:
        with self._lock:
            self._held[trial.lease_id] = trial

    def release(self, trial: RunningTrial) -> None:
        with self._lock:
            self._held.pop(trial.lease_id, None)

    def finish(self, runner: SlotRunner, trial: RunningTrial, ending: Ending) -> None:
        """Send the trial's end from a thread of its own, so the slot can take its next trial."""
        thread = threading.Thread(
            target=self._finish, args=(runner, trial, ending), name=f"finish-{trial.lease_id[:8]}", daemon=True
        )
        with self._lock:
            self._finishers = [t for t in self._finishers if t.is_alive()]
            self._finishers.append(thread)
        thread.start()

    def work_dir(self, lease_id: str) -> Path:
        """The scratch folder of one lease: the trial's files, checkpoint archives, a resume download."""
        return (self.options.work_dir / f"lease-{lease_id}").resolve()

    def _finish(self, runner: SlotRunner, trial: RunningTrial, ending: Ending) -> None:
        try:
            # The retry of a stopped or crashed trial resumes from its last checkpoint, so
            # that one must reach the server while the lease still accepts it.
            if not runner.uploader.flush(trial.lease_id, timeout_s=600):
                log.warning("checkpoint upload for %s still running at its end", trial.label())
            trial.ending = True  # no more heartbeats: the end itself settles the lease
            answered = self._send_end(trial, ending)
            _log_end(trial, ending, answered)
            with self._lock:
                self.ended[ending.kind] = self.ended.get(ending.kind, 0) + 1
            # A study at its max_parallel answers "no work" until this end has landed: ask again now.
            self.wake()
            if answered and ending.kind == "complete" and ending.export_dir is not None:
                self._upload_export(trial, ending)
        finally:
            self.release(trial)
            shutil.rmtree(self.work_dir(trial.lease_id), ignore_errors=True)

    def _upload_export(self, trial: RunningTrial, ending: Ending) -> None:
        """The final model of a complete trial, kept by the server as the trial's checkpoint.
        Sent after `complete`, so the result never waits for (or depends on) a large upload."""
        assert ending.export_dir is not None
        client = self.client_factory()
        try:
            archive = pack(ending.export_dir, self.work_dir(trial.lease_id) / "final.tar")
            step = ending.step or 0
            retry_until_answered(
                lambda: client.upload_checkpoint(trial.lease_id, archive, step),
                f"the model of {trial.label()}",
                self.cold,
            )
        except (ServerUnavailable, ClientError, OSError) as exc:
            log.warning("final model of %s not uploaded: %s", trial.label(), exc)
        finally:
            client.close()

    def _send_end(self, trial: RunningTrial, ending: Ending) -> bool:
        """Send until the server answers; False when the lease is gone (or a cold shutdown gave up)."""
        if ending.kind == "pruned":
            return True  # the report answered prune=True and ended the lease (and the Optuna trial) already
        if trial.lost or trial.stop_reason == "lost":
            return False
        client = self.client_factory()
        call: Callable[[], object]
        if ending.kind == "failed":
            assert ending.reason is not None
            request = FailRequest(
                reason=ending.reason,
                message=clean_text(ending.message, MAX_MESSAGE),
                traceback=(
                    None if ending.traceback is None else clean_text(ending.traceback, MAX_TRACEBACK, keep_end=True)
                ),
                step=None if ending.step is None else min(ending.step, MAX_STEP),
            )
            call = lambda: client.fail(trial.lease_id, request)  # noqa: E731
        else:
            done = CompleteRequest(
                metrics=_finite(ending.metrics), step=min(ending.step or 0, MAX_STEP), duration_s=ending.duration_s
            )
            call = lambda: client.complete(trial.lease_id, done)  # noqa: E731
        try:
            self.flush_backlog(client, trial)
            retry_until_answered(call, f"the end of {trial.label()}", self.cold)
        except ServerUnavailable:
            return False
        except ClientError as exc:
            if is_lease_lost(exc):
                trial.lost = True
                log.warning("server refused the end of %s: %s", trial.label(), exc)
                return False
            log.error("server refused the end of %s: %s", trial.label(), exc)
            return False
        finally:
            client.close()
        return True

    def flush_backlog(self, client: TuneForgeClient, trial: RunningTrial) -> bool:
        """Send reports the server missed while it was down, oldest first; False if it is still down."""
        while trial.backlog and not trial.lost:
            try:
                client.report(trial.lease_id, trial.backlog[0])
            except ServerUnavailable:
                return False
            except ClientError as exc:
                trial.lost = is_lease_lost(exc)
                log.warning("server refused a delayed report of %s: %s", trial.label(), exc)
            trial.backlog.pop(0)
        return True

    # -- the main thread

    def run(self) -> int:
        """Run until shut down (or, in burst mode, until there is no work); returns an exit code."""
        if threading.current_thread() is threading.main_thread():
            self._install_signals()
        self.options.work_dir.mkdir(parents=True, exist_ok=True)
        self.options.cache_dir.mkdir(parents=True, exist_ok=True)
        log.info(
            "worker %s: %d slot(s) %s, server %s%s",
            self.options.worker_id,
            len(self.runners),
            ", ".join(r.spec.name for r in self.runners),
            self.options.server,
            " (burst)" if self.options.burst else "",
        )
        for r in self.runners:
            r.thread.start()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        code = 0
        try:
            code = self._lease_loop()
        finally:
            self.stopping.set()
            for r in self.runners:
                r.wake()
            self._wait_for_runners()
        log.info("worker %s stopped (%s shutdown)", self.options.worker_id, "cold" if self.cold.is_set() else "warm")
        return code

    def _wait_for_runners(self) -> None:
        # Polls rather than joins, so the main thread still takes the second SIGTERM.
        for r in self.runners:
            while not r.exited.wait(0.2) and not self.cold.is_set():
                pass
        while not self.cold.is_set():
            with self._lock:
                pending = [t for t in self._finishers if t.is_alive()]
            if not pending:
                return
            pending[0].join(0.2)

    def _install_signals(self) -> None:
        def handle(signum: int, frame: FrameType | None) -> None:
            self.shutdown(cold=self.stopping.is_set())

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def _lease_loop(self) -> int:
        client = self.client_factory()
        failures = 0
        empty_since: float | None = None
        while not self.stopping.is_set():
            idle = [r for r in self.runners if r.idle]
            granted = False
            for runner in idle:
                if self.stopping.is_set():
                    break
                try:
                    grant = client.lease(LeaseRequest(worker_id=self.options.worker_id, slot=runner.spec.name))
                except ServerUnavailable as exc:
                    log.warning("cannot lease work: %s; retrying", exc)
                    self.stopping.wait(backoff(failures, base=1.0))
                    failures += 1
                    break
                except ClientError as exc:
                    log.error("lease request refused: %s", exc)
                    if exc.status_code in (401, 403):
                        return 2  # a bad token does not get better by asking again
                    self.stopping.wait(self.options.idle_poll_s)
                    break
                failures = 0
                if grant is None:
                    break
                granted = True
                runner.assign(grant)
            if granted:
                empty_since = None
                continue
            all_idle = all(r.idle for r in self.runners)
            if self.options.burst and all_idle and not self._held:
                # Two empty answers a poll apart (or `linger_s` of them), not one: a trial
                # whose end is still landing or a retry being scheduled can hide work for a moment.
                now = time.monotonic()
                if empty_since is None:
                    empty_since = now
                elif now - empty_since >= self.options.linger_s:
                    log.info("burst: no work left, exiting")
                    return 0
            else:
                empty_since = None
            # Woken early when a slot frees up, so its next trial starts without waiting for a poll.
            self._wake.wait(self.options.idle_poll_s)
            self._wake.clear()
        return 0

    def _heartbeat_loop(self) -> None:
        client = self.client_factory()
        while not self.cold.is_set():
            now = time.monotonic()
            with self._lock:
                held = list(self._held.values())
            for trial in held:
                if trial.lost or trial.ending or now < trial.next_heartbeat:
                    continue
                trial.next_heartbeat = now + trial.grant.heartbeat_interval_s
                try:
                    answer = client.heartbeat(trial.lease_id, HeartbeatRequest(step=trial.step))
                except ServerUnavailable as exc:
                    log.warning("heartbeat for %s failed: %s", trial.label(), exc)
                    continue
                except ClientError as exc:
                    if is_lease_lost(exc):
                        log.warning("lease of %s lost: %s; stopping the trial", trial.label(), exc)
                        trial.lost = True
                        self._stop(trial, "lost")
                    else:
                        log.error("heartbeat for %s refused: %s", trial.label(), exc)
                    continue
                if answer.stop:
                    log.info("server stops %s: %s", trial.label(), answer.reason)
                    self._stop(trial, _SERVER_STOP_REASONS.get(answer.reason or "", answer.reason or "server"))
            self.cold.wait(0.2)

    def _stop(self, trial: RunningTrial, reason: str) -> None:
        for r in self.runners:
            r.stop_trial(reason, trial.lease_id)
