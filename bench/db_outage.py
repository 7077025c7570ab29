"""What a database outage costs a running study: trials redone and seconds lost.

Runs a real server (uvicorn in a thread) and a real worker agent (one CPU slot) on a
small study of the tests' tiny BERT, once without an outage and once with the API's
database unreachable for `--outage` seconds from the moment the first trial reports
(every statement on the API's engines fails like a dropped connection; the database
server itself keeps running). Prints, per run: wall time, trials completed, attempts
beyond the first (work redone), and the seconds lost beyond the outage itself.

    python bench/db_outage.py [--outage 60] [--lease 15] [--trials 3] [--epochs 8] [--pg URL]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "trainer"), str(ROOT / "tests" / "worker")]

import sqlalchemy as sa  # noqa: E402
from db_outage_helpers import DbOutage  # noqa: E402
from trainer_test_helpers import build_tiny_bert, separable_rows, write_csv  # noqa: E402
from worker_test_helpers import Server  # noqa: E402

from service import auth  # noqa: E402
from service.context import ServiceContext  # noqa: E402
from service.migrate import upgrade  # noqa: E402
from service.models import Role  # noqa: E402
from service.settings import Settings  # noqa: E402
from trainer.client import TuneForgeClient  # noqa: E402
from trainer.worker.agent import Agent, WorkerOptions  # noqa: E402


def run(tmp: Path, db_url: str, *, outage_s: float, lease_s: float, trials: int, epochs: int) -> dict[str, Any]:
    data = tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    build_tiny_bert(data / "tiny-bert")
    write_csv(data / "train.csv", separable_rows(120, seed=3))
    settings = Settings(
        environment="local",
        database_url=db_url,
        data_roots=[data],
        home=tmp / "home",
        artifact_dir=tmp / "home" / "artifacts",
        lease_timeout_s=lease_s,
        reaper_interval_s=1.0,
    )
    upgrade(settings)
    ctx = ServiceContext.build(settings)
    user = auth.create_token(ctx.db, "alice", Role.USER, owner="alice")
    worker = auth.create_token(ctx.db, "node", Role.WORKER, owner="ops")
    ctx.close()
    server = Server(settings)
    server.start()
    api = TuneForgeClient(server.url, token=user)
    spec = {
        "name": "outage",
        "model": {"kind": "pretrained", "path": "tiny-bert"},
        "dataset": {"kind": "files", "train": "train.csv"},
        "run": {"seed": 0, "eval_every_steps": 3},
        "objective": {"metric": "loss"},
        "search_space": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "fixed": {"batch_size": 12, "epochs": epochs, "max_seq_len": 16},
        "sampler": {"name": "random", "seed": 0},
        "budget": {"n_trials": trials, "max_parallel": 1, "max_retries": 3},
    }
    study = api.create_study(spec)
    agent = Agent(
        WorkerOptions(
            server=server.url,
            token=worker,
            cache_dir=tmp / "cache",
            work_dir=tmp / "work",
            idle_poll_s=0.3,
            slot_log_level=logging.WARNING,  # the table is the output
            burst=True,
            linger_s=3.0,
        )
    )
    started = time.monotonic()
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    outage_window: tuple[float, float] | None = None
    if outage_s > 0:
        while not any(t["attempts"] for t in api.list_trials(study["id"])["data"]):
            time.sleep(0.2)
        time.sleep(2.0)  # into the first trial
        app_ctx = server._server.config.app.state.ctx
        outage = DbOutage(app_ctx.db.engine, app_ctx.storage.engine)
        outage.down = True
        down_at = time.monotonic()
        time.sleep(outage_s)
        outage.down = False
        outage_window = (down_at - started, time.monotonic() - started)
    thread.join(timeout=3600)
    wall = time.monotonic() - started
    rows = api.list_trials(study["id"], limit=200)["data"]
    detail = api.get_study(study["id"])
    api.close()
    server.stop()
    return {
        "outage_s": outage_s,
        "outage_window_s": outage_window,
        "wall_s": round(wall, 1),
        "status": detail["status"],
        "complete": detail["n_complete"],
        "failed": detail["n_failed"],
        "attempts_beyond_first": sum(max(0, r["attempts"] - 1) for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outage", type=float, default=60.0)
    parser.add_argument("--lease", type=float, default=15.0)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--pg", help="a PostgreSQL server URL: each run gets a fresh database there (default: a temporary SQLite file)"
    )
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    results = []
    for outage_s in (0.0, args.outage):
        with tempfile.TemporaryDirectory() as tmp, _database(args.pg, Path(tmp)) as url:
            results.append(
                run(Path(tmp), url, outage_s=outage_s, lease_s=args.lease, trials=args.trials, epochs=args.epochs)
            )
    base, hit = results
    hit["seconds_lost_beyond_outage"] = round(hit["wall_s"] - base["wall_s"] - args.outage, 1)
    backend = "PostgreSQL" if args.pg else "SQLite"
    print(f"{backend}, lease {args.lease:g} s, {args.trials} trials of {args.epochs} epochs")
    print(f"{'run':<22}{'wall s':>8}{'complete':>10}{'failed':>8}{'redone':>8}{'lost s':>8}")
    for name, r in (("no outage", base), (f"{args.outage:g} s DB outage", hit)):
        lost = r.get("seconds_lost_beyond_outage", "-")
        print(
            f"{name:<22}{r['wall_s']:>8}{r['complete']:>10}{r['failed']:>8}{r['attempts_beyond_first']:>8}{lost:>8}"
        )
    if args.json:
        print(json.dumps({"lease_timeout_s": args.lease, "baseline": base, "with_outage": hit}, indent=2))


@contextlib.contextmanager
def _database(pg_server: str | None, tmp: Path) -> Iterator[str]:
    """A fresh database for one run: users and study names must not collide across runs."""
    if pg_server is None:
        yield f"sqlite:///{tmp / 'tf.db'}"
        return
    server = sa.engine.make_url(pg_server)
    name = f"tf_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
