"""Warm slot processes: one long-lived process per slot runs trials one after another.

A new process pays for importing torch and transformers and for creating a CUDA
context (12.8 s on the H200 node, DESIGN.md), and `torch.compile` caches live in the
process. So a slot is spawned once, imports torch once and keeps that state between
trials; only a crash (or a trial that will not stop) replaces it.

The agent talks to its slot over a duplex pipe, and stops a running trial through a
shared flag that the trainer polls between steps (`Runtime.should_stop`). All HTTP
stays in the agent: the slot is pure compute, so a slot that dies never leaves a
half-sent request behind, and the agent (which owns the lease) decides what a report
or a crash means.

Messages, slot -> agent:
    ("ready", pid, warm_s)             once, after the imports
    ("started", t)                     a trial began (t: time.monotonic, system-wide on Linux)
    ("step", step, total, t)           progress, at most about once a second
    ("report", step, metrics)          an evaluation; the agent answers ("prune", bool)
    ("checkpoint", archive, step)      a checkpoint was packed into `archive` for upload
    ("done", SlotOutcome)              the trial ended (any way run_trial classifies)
agent -> slot:
    ("trial", TrialJob) | ("prune", bool) | None (exit)
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol

from trainer.config import TrialConfig
from trainer.worker.archive import pack

log = logging.getLogger("tuneforge.worker.slot")

Metrics = dict[str, float]

# spawn, not fork: the agent runs threads (heartbeats, uploads, httpx pools) and a
# forked child would inherit their locks mid-flight; CUDA cannot be initialised again
# in a forked child; and a fresh interpreter is where CUDA_VISIBLE_DEVICES must be set,
# before torch is first imported.
SPAWN = multiprocessing.get_context("spawn")

# os.environ is process-global; slots started from several threads at once must not
# see each other's CUDA_VISIBLE_DEVICES, and nothing may iterate the environment while a
# slot start adds and removes a variable (see `Agent.client_factory`).
ENV_LOCK = threading.Lock()

# How often the child tells the agent its step (heartbeats carry it; the live view shows it).
_STEP_EVERY_S = 1.0

# Slots ignore SIGTERM (see _slot_main), so multiprocessing's own exit handler, which
# terminates daemonic children and then joins them, would wait forever on one still
# alive. This handler runs first (atexit is last-in, first-out) and kills them.
_LIVE: weakref.WeakSet[Slot] = weakref.WeakSet()


@atexit.register
def _kill_live_slots() -> None:
    for slot in list(_LIVE):
        slot.kill()


@dataclass(frozen=True)
class SlotSpec:
    name: str
    """Shown in logs and sent with lease requests, e.g. 'cpu/0' or 'gpu1/3'."""
    gpu: str | None
    """The CUDA_VISIBLE_DEVICES value of the slot; None runs on the CPU."""
    cache_dir: Path
    """Tokenised-data cache shared by every slot of the agent."""
    threads: int | None = None
    """torch intra-op threads (CPU slots split the cores between them); None keeps torch's default."""
    log_level: int = logging.INFO
    """The slot's own log level (the trainer logs each evaluation at INFO)."""


@dataclass(frozen=True)
class TrialJob:
    lease_id: str
    config: TrialConfig
    work_dir: Path
    upload_dir: Path
    """Where the slot packs checkpoints for the agent to upload."""
    resume_from: Path | None = None


@dataclass(frozen=True)
class SlotOutcome:
    """How a trial ended, as `trainer.boundary.run_trial` classified it, made picklable."""

    state: str
    """complete | pruned | failed"""
    metrics: Metrics
    step: int | None
    duration_s: float
    reason: str | None
    message: str
    traceback: str | None
    started_at: float
    first_step_at: float | None
    """time.monotonic when the first optimizer step began (estimated: its end less one regular step)."""
    export_dir: Path | None = None
    """A complete trial's exported model folder (in its work dir), uploaded as its final checkpoint."""


class SlotDied(RuntimeError):
    """The slot process exited (crashed, killed) or its pipe broke."""

    def __init__(self, name: str, exitcode: int | None) -> None:
        super().__init__(f"slot {name} process died (exit code {exitcode})")
        self.exitcode = exitcode


class TrialEvents(Protocol):
    """What the agent does with a running trial's messages."""

    def on_started(self, at: float) -> None: ...

    def on_step(self, step: int, total: int) -> None: ...

    def on_report(self, step: int, metrics: Metrics) -> bool:
        """Send the evaluation to the server; True prunes the trial."""
        ...

    def on_checkpoint(self, archive: Path, step: int) -> None: ...

    def on_tick(self) -> None:
        """Called at least every `tick_s` while the trial runs: timeouts live here."""
        ...


class Slot:
    """The agent's handle on one slot process. Not thread-safe: one runner thread owns it,
    except `request_stop` and `kill`, which other threads may call."""

    def __init__(self, spec: SlotSpec) -> None:
        self.spec = spec
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        # A flag in shared memory rather than a multiprocessing.Event: an Event takes a lock
        # to read, and a slot killed while polling it would leave that lock held forever.
        self._stop: Any = SPAWN.RawValue(ctypes.c_bool, False)
        self.starts = 0
        self.warm_s: float | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def start(self, timeout_s: float = 600.0) -> float:
        """Spawn the process and wait until it has imported torch; returns the seconds that took."""
        t0 = time.monotonic()
        self._drop_conn()
        parent, child = SPAWN.Pipe(duplex=True)
        stop = SPAWN.RawValue(ctypes.c_bool, self._stop.value)  # a stop asked for meanwhile still holds
        self._stop = stop
        proc = SPAWN.Process(
            target=_slot_main, args=(child, self._stop, self.spec), name=f"tuneforge-slot-{self.spec.name}", daemon=True
        )
        env = self._child_env()
        with ENV_LOCK:
            # The child inherits the environment at spawn time, before any import runs in it.
            saved = {name: os.environ.get(name) for name in env}
            os.environ.update(env)
            try:
                proc.start()
            finally:
                for name, value in saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
        child.close()  # our copy of the child's end; keeping it would hide the child's death from recv()
        self._proc, self._conn = proc, parent
        self.starts += 1
        _LIVE.add(self)
        ready = multiprocessing.connection.wait([parent, proc.sentinel], timeout=timeout_s)
        try:
            msg = parent.recv() if parent in ready else None
        except (EOFError, OSError):
            msg = None
        if msg is None or msg[0] != "ready":
            self.kill()
            raise self._died()
        self.warm_s = time.monotonic() - t0
        log.info("slot %s ready: pid %s, warm after %.1f s", self.spec.name, proc.pid, self.warm_s)
        return self.warm_s

    def _child_env(self) -> dict[str, str]:
        env = {"CUDA_VISIBLE_DEVICES": self.spec.gpu if self.spec.gpu is not None else ""}
        if self.spec.gpu is None and "OMP_WAIT_POLICY" not in os.environ:
            # OpenMP threads spin while waiting by default; on a CPU shared with other slots
            # (or other work) the spinning starves the threads doing the math: measured on
            # 2 busy cores, a tiny trial took 3.7-8.5 s spinning and 0.7-1.2 s passive.
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        if self.spec.threads is not None and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
            # torch.compile starts a pool of compile workers per process, one per core by
            # default: 16 slots on 16 cores would fork 256 of them while warming up.
            env["TORCHINDUCTOR_COMPILE_THREADS"] = str(self.spec.threads)
        return env

    def request_stop(self) -> None:
        """Ask the running trial to checkpoint and stop at its next step (TrialStopped)."""
        self._stop.value = True

    def clear_stop(self) -> None:
        """Forget a stop meant for an earlier trial; called when the next trial is assigned."""
        self._stop.value = False

    def run(self, job: TrialJob, events: TrialEvents, tick_s: float = 0.25) -> SlotOutcome:
        """Run one trial in the slot and relay its messages to `events` until it ends."""
        if self._proc is None or self._conn is None or not self._proc.is_alive():
            raise self._died()
        conn, proc = self._conn, self._proc
        try:
            conn.send(("trial", job))
        except OSError:
            raise self._died() from None
        while True:
            ready = multiprocessing.connection.wait([conn, proc.sentinel], timeout=tick_s)
            if conn in ready:
                try:
                    msg: tuple[Any, ...] = conn.recv()
                except (EOFError, OSError):
                    raise self._died() from None
                kind = msg[0]
                if kind == "done":
                    outcome: SlotOutcome = msg[1]
                    return outcome
                if kind == "report":
                    prune = events.on_report(msg[1], msg[2])
                    try:
                        conn.send(("prune", prune))
                    except OSError:
                        raise self._died() from None
                elif kind == "step":
                    events.on_step(msg[1], msg[2])
                elif kind == "checkpoint":
                    events.on_checkpoint(Path(msg[1]), msg[2])
                elif kind == "started":
                    events.on_started(msg[1])
            elif proc.sentinel in ready:
                raise self._died()
            events.on_tick()

    def kill(self) -> None:
        """SIGKILL the process (a trial that ignores stop, a cold shutdown). Safe from any thread:
        the pipe is left to the owning thread, which sees the death in `run` or `close`."""
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join(timeout=10)

    def close(self, timeout_s: float = 10.0) -> None:
        """Ask an idle slot to exit; kill it if it does not."""
        if self._conn is not None and self.alive:
            with contextlib.suppress(OSError):  # already gone: nothing to ask
                self._conn.send(None)
            assert self._proc is not None
            self._proc.join(timeout=timeout_s)
        self.kill()
        self._drop_conn()

    def _drop_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _died(self) -> SlotDied:
        proc = self._proc
        if proc is not None:
            proc.join(timeout=5)
        self._drop_conn()
        return SlotDied(self.spec.name, proc.exitcode if proc else None)


# ---------------------------------------------------------------------------
# Inside the slot process.


def _exit_with_parent() -> None:
    """Exit when the agent dies (kill -9 included): a slot must not train for a lease nobody holds."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(3)  # no cleanup: the agent is gone and so is the lease we trained for

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _slot_main(conn: Connection, stop: Any, spec: SlotSpec) -> None:
    # Ctrl-C in a terminal and systemd's control-group kill signal every process; the
    # agent alone decides between warm and cold shutdown and tells the slot.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with_parent()
    logging.basicConfig(
        level=spec.log_level, format=f"%(asctime)s slot {spec.name} %(levelname)s %(name)s: %(message)s"
    )
    t0 = time.monotonic()
    from trainer.worker import warm  # imports torch and transformers: the cost a warm slot pays once

    warm.prepare(gpu=spec.gpu is not None, threads=spec.threads, quiet=spec.log_level > logging.INFO)
    try:
        conn.send(("ready", os.getpid(), time.monotonic() - t0))
        while True:
            msg = conn.recv()
            if msg is None:
                return
            outcome = _run_one(conn, stop, spec, msg[1])
            conn.send(("done", outcome))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the agent closed the pipe: nothing left to do


def _run_one(conn: Connection, stop: Any, spec: SlotSpec, job: TrialJob) -> SlotOutcome:
    from trainer.boundary import run_trial
    from trainer.runtime import Runtime

    first_step_at: float | None = None  # when the first optimizer step ended
    second_step_at: float | None = None
    last_step_sent = 0.0
    packed = 0

    def report(step: int, metrics: Metrics) -> bool:
        # Blocks the training loop until the server's pruning decision is back; that is
        # the point of reporting (the step after an ASHA rung must not run if pruned).
        conn.send(("report", step, dict(metrics)))
        reply = conn.recv()
        return bool(reply[1])

    def on_checkpoint(folder: Path, step: int) -> None:
        # Packed here, synchronously, because the trainer may overwrite the folder at its
        # next checkpoint; the agent uploads the archive while training goes on.
        nonlocal packed
        packed += 1  # a stop right after an evaluation checkpoints the same step twice
        archive = pack(folder, job.upload_dir / f"step-{step:09d}-{packed}.tar")
        conn.send(("checkpoint", str(archive), step))

    def on_step(step: int, total: int) -> None:
        nonlocal first_step_at, second_step_at, last_step_sent
        now = time.monotonic()
        if first_step_at is None:
            first_step_at = now
        elif second_step_at is None:
            second_step_at = now
        if now - last_step_sent >= _STEP_EVERY_S:
            last_step_sent = now
            conn.send(("step", step, total, now))

    job.work_dir.mkdir(parents=True, exist_ok=True)
    runtime = Runtime(
        work_dir=job.work_dir,
        cache_dir=spec.cache_dir,
        device="auto" if spec.gpu is not None else "cpu",
        resume_from=job.resume_from,
        should_stop=lambda: bool(stop.value),
        on_checkpoint=on_checkpoint,
        on_step=on_step,
    )
    started_at = time.monotonic()
    conn.send(("started", started_at))
    outcome = run_trial(job.config, runtime, report)
    result = outcome.result
    return SlotOutcome(
        state=str(outcome.state),
        metrics=dict(result.metrics) if result is not None else {},
        step=outcome.step if outcome.step is not None else (result.step if result is not None else None),
        duration_s=result.duration_s if result is not None and result.duration_s else time.monotonic() - started_at,
        reason=str(outcome.reason) if outcome.reason is not None else None,
        message=outcome.message or "",
        traceback=outcome.traceback,
        started_at=started_at,
        # When training began: the first step's end less one regular step (the first one
        # may also hold a compile, which is start-up cost and stays in the gap).
        first_step_at=first_step_at - (second_step_at - first_step_at)
        if second_step_at and first_step_at
        else first_step_at,
        export_dir=result.checkpoint if result is not None else None,
    )
