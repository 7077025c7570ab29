"""Trial packing through the real stack: a `tuneforge serve` process, one worker agent with
warm slots on one GPU, and MiniLM studies run with 1, 4, 8 and 16 trials at once.

    python bench/gpu_packing.py                # on a GPU node: about 3-5 minutes
    python bench/gpu_packing.py --smoke        # CPU: a tiny built-in model, 1 and 2 slots

One agent holds the most slots asked for (16); each phase is one study whose
`max_parallel` sets how many of them train at once, so slot start-up (imports, CUDA
context) and `torch.compile` are paid once, in a warm-up study, not in every phase.

Per phase it reports:
- samples_per_s: optimizer-step samples of all trials / (last trial end - first trial's
  first step): the wall-clock rate with the gaps and the tail included;
- sum_trial_rates_per_s: each trial's own rate summed (the upper bound the DESIGN.md
  anchor table reports for separate processes);
- slot gap: from a trial's end to the next trial's first optimizer step on the same slot
  (complete, the next lease, model build, data from the cache, the first step).
Targets on one H200: >= 11,000 samples/s at 8 slots, more at 16, slot gap < 1 s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(home: Path, port: int) -> tuple[subprocess.Popen[bytes], str, str, str]:
    """`tuneforge serve` on SQLite in `home`; returns (process, url, admin token, worker token)."""
    from service import auth
    from service.db import Database
    from service.migrate import local_setup
    from service.models import Role
    from service.settings import Settings

    env = {
        **os.environ,
        "TUNEFORGE_ENVIRONMENT": "local",
        "TUNEFORGE_DATABASE_URL": f"sqlite:///{home / 'tuneforge.db'}",
        "TUNEFORGE_HOME": str(home),
        "TUNEFORGE_ARTIFACT_DIR": str(home / "artifacts"),
        "TUNEFORGE_DATA_ROOTS": str(home),
    }
    settings = Settings(
        environment="local",
        database_url=env["TUNEFORGE_DATABASE_URL"],
        home=home,
        artifact_dir=home / "artifacts",
        data_roots=[home],
    )
    local_setup(settings)
    db = Database(settings)
    try:
        worker_token = auth.create_token(db, "bench", Role.WORKER, owner="bench")
    finally:
        db.dispose()
    admin_token = settings.admin_token_file.read_text().strip()
    log_file = (home / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli.main", "serve", "--port", str(port), "--log-level", "warning"],
        cwd=REPO,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    from trainer.client import ServerUnavailable, TuneForgeClient

    with TuneForgeClient(url, token=admin_token) as client:
        deadline = time.monotonic() + 120
        while True:
            try:
                client.health()
                break
            except ServerUnavailable:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"server did not start: {(home / 'server.log').read_text()[-2000:]}") from None
                time.sleep(0.2)
    return proc, url, admin_token, worker_token


def study_spec(name: str, n_trials: int, parallel: int, steps: int, smoke: bool) -> dict[str, Any]:
    if smoke:
        model: dict[str, Any] = {"kind": "builtin"}
        fixed: dict[str, Any] = {
            "batch_size": 16,
            "max_seq_len": 32,
            "epochs": 1,
            "num_layers": 1,
            "num_heads": 2,
            "hidden_size": 32,
            "ffn_size": 64,
        }
        run: dict[str, Any] = {"precision": "fp32", "compile": False}
        data = {"max_train_examples": 400, "max_eval_examples": 64}
    else:
        model = {"kind": "named", "name": "all-minilm-l6-v2"}
        fixed = {"batch_size": 32, "max_seq_len": 128, "epochs": 1}
        # bf16 and compiled once per warm slot: DESIGN.md's measured best packing mode.
        run = {"precision": "bf16", "compile": True}
        data = {"max_train_examples": 8000, "max_eval_examples": 256}
    return {
        "name": name,
        "model": model,
        "dataset": {"kind": "named", "name": "tweets-sentiment"},
        "data": data,
        # One evaluation at the end, no resumable checkpoints: the phase measures training.
        "run": {"seed": 0, "max_steps": steps, "checkpoint_every_eval": False, **run},
        "objective": {"metric": "loss"},
        "search_space": {"learning_rate": {"type": "float", "low": 3e-5, "high": 1e-4, "log": True}},
        "fixed": fixed,
        "sampler": {"name": "random", "seed": 0},
        "budget": {"n_trials": n_trials, "max_parallel": parallel, "max_retries": 0},
    }


def run_study(client: Any, agent: Any, spec: dict[str, Any], timeout_s: float) -> tuple[dict[str, Any], float]:
    t0 = time.monotonic()
    study = client.create_study(spec)
    while True:
        study = client.get_study(study["id"])
        if study["status"] != "running":
            return study, time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            log.error("study %s still running after %.0f s; cancelling it", spec["name"], timeout_s)
            client.cancel_study(study["id"])
            return client.get_study(study["id"]), time.monotonic() - t0
        time.sleep(0.25)


def phase_figures(agent: Any, study_id: int, batch: int) -> dict[str, Any]:
    records = [r for r in agent.records() if r.study_id == study_id and r.state == "complete"]
    if not records:
        return {"trials": 0}
    starts = [r.first_step_at for r in records if r.first_step_at is not None]
    samples = sum((r.step or 0) * batch for r in records)
    window = max(r.ended_at for r in records) - min(starts)
    # Each trial's own rate: the steps after its first (the first includes any compile) over its span.
    rates = [
        ((r.step or 1) - 1) * batch / (r.ended_at - r.first_step_at)
        for r in records
        if r.first_step_at is not None and r.ended_at > r.first_step_at
    ]
    by_slot: dict[str, list[Any]] = {}
    for r in sorted(records, key=lambda r: r.ended_at):
        by_slot.setdefault(r.slot, []).append(r)
    # Gaps inside this phase only: the first trial of a slot in a phase follows an idle wait.
    gaps = [r.gap_s for rs in by_slot.values() for r in rs[1:] if r.gap_s is not None]
    return {
        "trials": len(records),
        "slots_used": len(by_slot),
        "samples": samples,
        "samples_per_s": round(samples / window) if window > 0 else None,
        "sum_trial_rates_per_s": round(sum(rates) / max(1, len(rates)) * len(by_slot)) if rates else None,
        "slot_gap_median_s": round(statistics.median(gaps), 3) if gaps else None,
        "slot_gap_max_s": round(max(gaps), 3) if gaps else None,
        "slot_gaps": len(gaps),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU check: tiny built-in model, 1 and 2 slots.")
    parser.add_argument("--slots", default=None, help="Comma-separated slot counts (default 1,4,8,16; smoke 1,2).")
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps per trial (default 200; smoke 12).")
    parser.add_argument("--trials-per-slot", type=int, default=3)
    parser.add_argument("--gpu", default="0", help="CUDA_VISIBLE_DEVICES value of the GPU to pack.")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default $OUT/gpu_packing.json).")
    parser.add_argument("--phase-timeout", type=float, default=150.0)
    parser.add_argument(
        "--budget-s", type=float, default=330.0, help="Skip the phases left once this much time has passed."
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    counts = [int(c) for c in (args.slots or ("1,2" if args.smoke else "1,4,8,16")).split(",")]
    steps = args.steps or (12 if args.smoke else 200)
    batch = 16 if args.smoke else 32
    out = args.out or Path(os.environ.get("OUT", ".")) / "gpu_packing.json"

    from trainer.client import TuneForgeClient
    from trainer.worker.agent import Agent, WorkerOptions

    result: dict[str, Any] = {"mode": "smoke" if args.smoke else "gpu", "steps_per_trial": steps, "batch": batch}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tf-bench-") as tmp:
        home = Path(tmp)
        server, url, admin_token, worker_token = start_server(home, free_port())
        most = max(counts)
        options = WorkerOptions(
            server=url,
            token=worker_token,
            gpus=None if args.smoke else [args.gpu],
            slots_per_gpu=most,
            cpu_slots=most,
            cache_dir=home / "cache",
            work_dir=home / "work",
            idle_poll_s=0.2,
            slot_log_level=logging.WARNING,
        )
        agent = Agent(options)
        thread = threading.Thread(target=agent.run, name="agent", daemon=True)
        thread.start()
        client = TuneForgeClient(url, token=admin_token)
        try:
            # Warm-up: one short trial per slot, so every slot has imported, built CUDA
            # state, tokenised (the shared cache) and compiled before anything is timed.
            warm_spec = study_spec("warm-up", most, most, max(4, steps // 20), args.smoke)
            study, took = run_study(client, agent, warm_spec, min(args.phase_timeout * 2, args.budget_s))
            result["warmup_s"] = round(took, 1)
            result["slot_start_s"] = [round(r.slot.warm_s or 0, 1) for r in agent.runners]
            log.info("warm-up: %s in %.1f s", study["status"], took)
            phases: list[dict[str, Any]] = []
            for k in counts:
                left = args.budget_s - (time.monotonic() - t_start)
                if left < 20:
                    phases.append({"slots": k, "skipped": f"time budget of {args.budget_s:.0f} s spent"})
                    log.warning("skipping %d slots: time budget spent", k)
                    continue
                spec = study_spec(f"pack-{k}", k * args.trials_per_slot, k, steps, args.smoke)
                study, took = run_study(client, agent, spec, min(args.phase_timeout, left))
                figures = {"slots": k, "status": study["status"], "wall_s": round(took, 1)}
                figures.update(phase_figures(agent, study["id"], batch))
                phases.append(figures)
                log.info("%s", json.dumps(figures))
            result["phases"] = phases
        finally:
            client.close()
            agent.shutdown()
            thread.join(timeout=120)
            server.terminate()
            server.wait(timeout=30)
    result["total_s"] = round(time.monotonic() - t_start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
