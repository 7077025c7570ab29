"""Control-plane benchmark: the lease API against plain Optuna, on PostgreSQL.

    python bench/control_plane.py             # 1, 16 and 64 agents; fresh study and 10,000 trials
    python bench/control_plane.py --quick     # 1 and 16 agents, smaller studies (a few minutes)

One command, no GPU, no training. It creates a throwaway database on the server given by
--pg (default: TUNEFORGE_TEST_PG_URL, else postgresql+psycopg://postgres@127.0.0.1:5432/test),
starts the API under uvicorn (--workers processes), and for each number of agents:

- TuneForge: N simulated async agents (httpx) run zero-length trials: lease, REPORTS
  reports (each answered with the pruning decision), complete. Per call type it
  records latency (p50/p99, successful calls; a 204 "no work" is counted apart).
- Baseline: the same study shape through plain Optuna: N processes running
  `study.optimize` on RDBStorage on the same database (TPE with constant liar, the
  same median pruner, the same define-by-run space via service.optuna_bridge). Its
  "lease" is ask (from the previous tell to the objective's start), "report" is
  report + should_prune, "complete" is tell.

trials/s counts finished trials (complete + pruned) over the wall time from the first
lease (first ask) to the last finished trial. Both sides are measured warm: processes
load the study before the clock starts, and the API serves one warm-up trial first.
The "10k" rows run on a study already holding 10,000 finished trials (inserted in bulk
through Optuna's tables, plus the tf_* rows), where a cold Optuna process needs seconds
just to read the study.

Targets (DESIGN.md): at 16 agents at least the baseline's trials/s; p99 lease latency
under 100 ms at 10,000 trials.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import multiprocessing as mp
import os
import queue
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

REPORTS = 10
SPEC: dict[str, Any] = {
    "name": "bench",
    "model": {"kind": "named", "name": "all-minilm-l6-v2"},
    "dataset": {"kind": "named", "name": "tweets-sentiment"},
    "objective": {"metric": "accuracy", "direction": "maximize"},
    "search_space": {
        "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
        "batch_size": {"type": "categorical", "choices": [16, 32, 64]},
        "num_layers": {"type": "int", "low": 2, "high": 6},
        "unfreeze_depth": {"type": "int", "low": 0, "high": 6},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    },
    "sampler": {"name": "tpe"},
    "pruner": {"name": "median", "options": {"n_startup_trials": 5, "n_warmup_steps": 3}},
    "budget": {"n_trials": 100, "max_parallel": 64, "max_retries": 1},
}


def app_factory() -> Any:
    """`uvicorn --factory bench.control_plane:app_factory`: the app from TUNEFORGE_* env."""
    from service.api.app import create_app
    from service.settings import Settings

    return create_app(Settings())


def accuracy(params: dict[str, Any], step: int | None = None) -> float:
    """Zero-length synthetic objective, so the benchmark measures the control plane only."""
    import math

    lr = params.get("learning_rate", 1e-4)
    value = 0.95 - 0.1 * (math.log10(lr) + 4) ** 2 - 0.3 * (params.get("dropout", 0.1) - 0.1) ** 2
    value -= 0.02 * (params.get("num_layers", 4) - 4) ** 2
    return value if step is None else value * (step + 1) / REPORTS


# ---------------------------------------------------------------------------- results


@dataclass
class Level:
    system: str
    scenario: str
    agents: int
    trials: int = 0
    elapsed: float = 0.0
    lat: dict[str, list[float]] = field(default_factory=lambda: {"lease": [], "report": [], "complete": []})
    no_work: int = 0
    server_errors: int = 0
    transport_errors: int = 0
    retried: int | None = None

    @property
    def rate(self) -> float:
        return self.trials / self.elapsed if self.elapsed else 0.0

    def pct(self, kind: str, q: float) -> str:
        values = sorted(self.lat[kind])
        if not values:
            return "-"
        k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
        return f"{1000 * values[k]:.0f}"


def print_table(levels: list[Level]) -> None:
    head = (
        f"{'system':<10} {'study':<6} {'agents':>6} {'trials':>6} {'trials/s':>8} "
        f"{'lease p50/p99 ms':>17} {'report p50/p99 ms':>18} {'complete p50/p99 ms':>20} "
        f"{'204s':>5} {'5xx':>4} {'conn':>4}"
    )
    print(head)
    print("-" * len(head))
    for lv in levels:
        cols = [f"{lv.pct(k, 0.5)}/{lv.pct(k, 0.99)}" for k in ("lease", "report", "complete")]
        print(
            f"{lv.system:<10} {lv.scenario:<6} {lv.agents:>6} {lv.trials:>6} {lv.rate:>8.1f} "
            f"{cols[0]:>17} {cols[1]:>18} {cols[2]:>20} {lv.no_work:>5} {lv.server_errors:>4} {lv.transport_errors:>4}"
        )


# ---------------------------------------------------------------------------- database


def pg_server_url(arg: str | None) -> str:
    return arg or os.environ.get("TUNEFORGE_TEST_PG_URL") or "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def create_database(server_url: str) -> tuple[str, str]:
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    name = f"tf_bench_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return name, make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, name: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def preload(db_url: str, optuna_name: str, n: int, tf_study_id: int | None, seed: int = 0) -> None:
    """Insert `n` finished trials (COMPLETE, a few PRUNED) with REPORTS intermediate values
    each, straight into Optuna's tables (valid for `optuna.load_study`), and the matching
    tf_trials rows and counters when `tf_study_id` is given. Seconds instead of minutes."""
    import optuna
    import sqlalchemy as sa
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models as om

    from service import optuna_bridge
    from service.models import Study, Trial, TrialState
    from service.spec import StudySpec

    spec = StudySpec.model_validate(SPEC)
    space = optuna_bridge._Space.of(spec)
    rng = random.Random(seed)
    engine = sa.create_engine(db_url)
    storage = optuna.storages.RDBStorage(db_url)
    optuna_study_id = storage.get_study_id_from_name(optuna_name)
    storage.engine.dispose()
    now = datetime.now(UTC).replace(tzinfo=None)
    trial_rows, params_by_trial, values, states = [], [], [], []
    for i in range(n):
        params: dict[str, Any] = {}
        for name in space.order:
            dist = space.distribution(name, params)
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                params[name] = rng.choice(dist.choices)
            elif isinstance(dist, optuna.distributions.IntDistribution):
                params[name] = rng.randint(dist.low, dist.high)
            elif dist.log:
                import math

                params[name] = math.exp(rng.uniform(math.log(dist.low), math.log(dist.high)))
            else:
                params[name] = rng.uniform(dist.low, dist.high)
        dists = optuna_bridge.distributions(spec, params)
        pruned = rng.random() < 0.2
        state = optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE
        start = now - timedelta(seconds=(n - i) * 2)
        trial_rows.append(
            {
                "number": i,
                "study_id": optuna_study_id,
                "state": state,
                "datetime_start": start,
                "datetime_complete": start + timedelta(seconds=1),
            }
        )
        params_by_trial.append((params, dists))
        values.append(accuracy(params))
        states.append(state)
    with engine.begin() as conn:
        ids = (
            conn.execute(
                sa.insert(om.TrialModel.__table__).returning(
                    om.TrialModel.__table__.c.trial_id, sort_by_parameter_order=True
                ),
                trial_rows,
            )
            .scalars()
            .all()
        )
        param_rows, value_rows, inter_rows = [], [], []
        for trial_id, (params, dists), value, state in zip(ids, params_by_trial, values, states, strict=True):
            for name, dist in dists.items():
                param_rows.append(
                    {
                        "trial_id": trial_id,
                        "param_name": name,
                        "param_value": dist.to_internal_repr(params[name]),
                        "distribution_json": distribution_to_json(dist),
                    }
                )
            last = REPORTS if state == optuna.trial.TrialState.COMPLETE else 4
            for step in range(last):
                inter_rows.append(
                    {
                        "trial_id": trial_id,
                        "step": step,
                        "intermediate_value": value * (step + 1) / REPORTS,
                        "intermediate_value_type": om.TrialIntermediateValueModel.TrialIntermediateValueType.FINITE,
                    }
                )
            if state == optuna.trial.TrialState.COMPLETE:
                value_rows.append(
                    {
                        "trial_id": trial_id,
                        "objective": 0,
                        "value": value,
                        "value_type": om.TrialValueModel.TrialValueType.FINITE,
                    }
                )
        conn.execute(sa.insert(om.TrialParamModel.__table__), param_rows)
        conn.execute(sa.insert(om.TrialValueModel.__table__), value_rows)
        conn.execute(sa.insert(om.TrialIntermediateValueModel.__table__), inter_rows)
        if tf_study_id is not None:
            tf_rows = []
            for i, (trial_id, (params, _), value, state) in enumerate(
                zip(ids, params_by_trial, values, states, strict=True)
            ):
                done = state == optuna.trial.TrialState.COMPLETE
                tf_rows.append(
                    {
                        "study_id": tf_study_id,
                        "number": i,
                        "state": TrialState.COMPLETE if done else TrialState.PRUNED,
                        "params": params,
                        "optuna_trial_id": trial_id,
                        "attempts": 1,
                        "values": [value] if done else None,
                        "value": value if done else None,
                        "created_at": trial_rows[i]["datetime_start"],
                        "finished_at": trial_rows[i]["datetime_complete"],
                        "duration_s": 1.0,
                    }
                )
            conn.execute(sa.insert(Trial.__table__), tf_rows)
            n_complete = sum(1 for s in states if s == optuna.trial.TrialState.COMPLETE)
            conn.execute(
                sa.update(Study.__table__)
                .where(Study.__table__.c.id == tf_study_id)
                .values(n_started=n, n_complete=n_complete, n_pruned=n - n_complete, n_trials=n + 1)
            )
    engine.dispose()


# ---------------------------------------------------------------------------- the API


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Api:
    def __init__(self, db_url: str, workers: int, home: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "api.log"
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "TUNEFORGE_DATABASE_URL": db_url,
            "TUNEFORGE_ENVIRONMENT": "local",
            "TUNEFORGE_HOME": str(home),
            "TUNEFORGE_ARTIFACT_DIR": str(home / "artifacts"),
            "TUNEFORGE_DATA_ROOTS": str(home),
            # Several processes share the server's 100 connections with the baseline.
            "TUNEFORGE_DB_POOL_SIZE": "4",
            "TUNEFORGE_DB_MAX_OVERFLOW": "8",
        }
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "bench.control_plane:app_factory"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers), "--log-level", "warning"]
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._out, stderr=subprocess.STDOUT)
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the API exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.3)
        raise RuntimeError("the API did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._out.close()


async def _agent(client: Any, name: str, done: asyncio.Event, lv: Level) -> None:
    import httpx

    while not done.is_set():
        try:
            await _one_trial(client, name, lv)
        except httpx.TransportError:
            lv.transport_errors += 1
            await asyncio.sleep(0.5)


async def _one_trial(client: Any, name: str, lv: Level) -> None:
    """Lease, REPORTS reports (stop when told to prune), complete; latencies of 2xx answers."""
    t0 = time.perf_counter()
    r = await client.post("/api/v1/leases", json={"worker_id": name})
    if r.status_code >= 500:
        lv.server_errors += 1
        await asyncio.sleep(0.1)
        return
    if r.status_code == 204:
        lv.no_work += 1
        await asyncio.sleep(0.05)
        return
    r.raise_for_status()
    lv.lat["lease"].append(time.perf_counter() - t0)
    grant = r.json()
    base = f"/api/v1/leases/{grant['lease_id']}"
    params = grant["config"]["hparams"]
    for step in range(REPORTS):
        t0 = time.perf_counter()
        body = {"step": step, "metrics": {"accuracy": accuracy(params, step)}}
        r = await client.post(f"{base}/report", json=body)
        lv.server_errors += r.status_code >= 500
        if r.status_code != 200:
            return  # 409: taken back; nothing more to send
        lv.lat["report"].append(time.perf_counter() - t0)
        if r.json()["prune"]:
            return
    t0 = time.perf_counter()
    body = {"metrics": {"accuracy": accuracy(params)}, "step": REPORTS, "duration_s": 0.0}
    r = await client.post(f"{base}/complete", json=body)
    lv.server_errors += r.status_code >= 500
    if r.status_code == 200:
        lv.lat["complete"].append(time.perf_counter() - t0)


async def _run_agents(api: Api, worker_token: str, user_token: str, study_id: int, lv: Level, count: int) -> None:
    """Run lv.agents agents until `count` more trials of the study have finished."""
    import httpx

    done = asyncio.Event()
    limits = httpx.Limits(max_connections=lv.agents + 4, max_keepalive_connections=lv.agents + 4)
    headers = {"Authorization": f"Bearer {worker_token}"}
    async with (
        httpx.AsyncClient(base_url=api.url, headers=headers, limits=limits, timeout=120) as client,
        httpx.AsyncClient(base_url=api.url, headers={"Authorization": f"Bearer {user_token}"}, timeout=300) as user,
    ):

        async def finished() -> tuple[int, str]:
            while True:
                try:
                    study = (await user.get(f"/api/v1/studies/{study_id}")).json()
                    return study["n_complete"] + study["n_pruned"] + study["n_failed"], study["status"]
                except httpx.TransportError:
                    await asyncio.sleep(0.5)  # a saturated server: ask again

        first, _ = await finished()
        start = time.perf_counter()
        tasks = [asyncio.create_task(_agent(client, f"agent-{i}", done, lv)) for i in range(lv.agents)]
        while True:
            now, status = await finished()
            if status != "running" or now - first >= count:
                break
            await asyncio.sleep(0.1)
        lv.elapsed = time.perf_counter() - start
        lv.trials = now - first
        done.set()  # agents finish the trial in hand, then stop
        await asyncio.gather(*tasks)


def run_tuneforge(api: Api, tokens: dict[str, str], study_id: int, agents: int, count: int, scenario: str) -> Level:
    lv = Level("tuneforge", scenario, agents)
    asyncio.run(_run_agents(api, tokens["worker"], tokens["user"], study_id, lv, count))
    return lv


def create_study(api: Api, user_token: str, name: str, n_trials: int) -> tuple[int, str]:
    import httpx

    spec = copy.deepcopy(SPEC)
    spec["name"] = name
    spec["budget"] = {**spec["budget"], "n_trials": n_trials}
    r = httpx.post(
        f"{api.url}/api/v1/studies", json=spec, headers={"Authorization": f"Bearer {user_token}"}, timeout=60
    )
    r.raise_for_status()
    return int(r.json()["id"]), str(r.json()["optuna_name"])


def set_budget(db_url: str, study_id: int, n_trials: int) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        # A bench-only budget change: reopen the study if it completed on the old budget.
        conn.execute(
            sa.text("UPDATE tf_studies SET n_trials = :n, status = 'running', finished_at = NULL WHERE id = :id"),
            {"n": n_trials, "id": study_id},
        )
    engine.dispose()


def warm_up(api: Api, worker_token: str) -> None:
    """One trial through the API, so that its process has loaded the study."""
    import httpx

    h = {"Authorization": f"Bearer {worker_token}"}
    for _ in range(200):
        r = httpx.post(f"{api.url}/api/v1/leases", json={"worker_id": "warm-up"}, headers=h, timeout=120)
        if r.status_code == 200:
            g = r.json()
            httpx.post(
                f"{api.url}/api/v1/leases/{g['lease_id']}/complete",
                json={"metrics": {"accuracy": 0.5}, "step": 0, "duration_s": 0},
                headers=h,
                timeout=120,
            ).raise_for_status()
            return
        time.sleep(0.1)
    raise RuntimeError("warm-up got no lease")


# ---------------------------------------------------------------------------- baseline


def _baseline_proc(db_url: str, optuna_name: str, total: int, barrier: Any, out: Any) -> None:
    import logging

    import optuna

    from service import optuna_bridge
    from service.spec import StudySpec

    optuna.logging.set_verbosity(logging.ERROR)
    spec = StudySpec.model_validate({**SPEC, "budget": {**SPEC["budget"], "max_parallel": 64}})
    # One connection per process: 64 of them must fit in the server's 100 with the API's.
    storage = optuna.storages.RDBStorage(db_url, engine_kwargs={"pool_size": 1, "max_overflow": 1})
    study = optuna.load_study(
        study_name=optuna_name,
        storage=storage,
        sampler=optuna_bridge.make_sampler(spec, parallel=True),
        pruner=optuna_bridge.make_pruner(spec),
    )
    study.get_trials(deepcopy=False)  # load before the clock starts, like the warm API
    lat: dict[str, list[float]] = {"lease": [], "report": [], "complete": []}
    mark = {"told": 0.0, "returned": 0.0}

    def objective(trial: optuna.Trial) -> float:
        if mark["told"]:
            lat["lease"].append(time.perf_counter() - mark["told"])
        params = optuna_bridge.suggest_params(trial, spec)
        for step in range(REPORTS):
            t0 = time.perf_counter()
            trial.report(accuracy(params, step), step)
            prune = trial.should_prune()
            lat["report"].append(time.perf_counter() - t0)
            if prune:
                mark["returned"] = 0.0
                raise optuna.TrialPruned()
        mark["returned"] = time.perf_counter()
        return accuracy(params)

    def after_tell(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        now = time.perf_counter()
        if mark["returned"]:
            lat["complete"].append(now - mark["returned"])
        mark["told"] = now

    barrier.wait()
    mark["told"] = time.perf_counter()
    stop = optuna.study.MaxTrialsCallback(total, states=None)
    study.optimize(objective, callbacks=[after_tell, stop], gc_after_trial=False)
    out.put(lat)


def run_baseline(db_url: str, optuna_name: str, procs: int, trials: int, existing: int, scenario: str) -> Level:
    import optuna

    lv = Level("optuna", scenario, procs)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs + 1)
    out = ctx.Queue()
    workers = [
        ctx.Process(target=_baseline_proc, args=(db_url, optuna_name, existing + trials, barrier, out))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    results: list[dict[str, list[float]]] = []
    while len(results) < procs:
        try:
            results.append(out.get(timeout=2))
        except queue.Empty:
            if not any(w.is_alive() for w in workers) and out.empty():
                lv.transport_errors = procs - len(results)  # processes that died (e.g. no connection)
                break
    lv.elapsed = time.perf_counter() - start
    for w in workers:
        w.join()
    for r in results:
        for k in lv.lat:
            lv.lat[k].extend(r[k])
    storage = optuna.storages.RDBStorage(db_url)
    study_id = storage.get_study_id_from_name(optuna_name)
    finished = storage.get_all_trials(
        study_id, deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    )
    storage.engine.dispose()
    lv.trials = len(finished) - existing
    return lv


def create_plain_study(db_url: str, name: str) -> str:
    import optuna

    from service import optuna_bridge
    from service.spec import StudySpec

    spec = StudySpec.model_validate(SPEC)
    storage = optuna.storages.RDBStorage(db_url)
    optuna_bridge.create_optuna_study(spec, storage, name)
    storage.engine.dispose()
    return name


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 and 16 agents, smaller studies")
    parser.add_argument("--pg", help="PostgreSQL server URL (a throwaway database is created on it)")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--agents", help="comma-separated agent counts (default 1,16,64; quick 1,16)")
    parser.add_argument("--big", type=int, default=None, help="trials already in the big study (default 10000)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the database")
    args = parser.parse_args()

    import logging

    import optuna
    import sqlalchemy as sa  # noqa: F401  (fail early if the env lacks it)

    from service import auth
    from service.db import Database
    from service.migrate import upgrade
    from service.models import Role
    from service.settings import Settings

    optuna.logging.set_verbosity(logging.WARNING)
    agents = [int(a) for a in (args.agents or ("1,16" if args.quick else "1,16,64")).split(",")]
    big = args.big if args.big is not None else 10_000
    per_level = {1: 20 if args.quick else 40}
    default_trials = 100 if args.quick else 200

    server = pg_server_url(args.pg)
    db_name, db_url = create_database(server)
    home = Path(tempfile.mkdtemp(prefix="tf-bench-"))
    levels: list[Level] = []
    api: Api | None = None
    try:
        settings = Settings(database_url=db_url, home=home, data_roots=[home])
        upgrade(settings)
        db = Database(settings)
        tokens = {
            "user": auth.create_token(db, "bench-user", Role.USER, owner="bench"),
            "worker": auth.create_token(db, "bench-worker", Role.WORKER, owner="ops"),
        }
        db.dispose()
        print(f"database {db_name}; API with {args.workers} uvicorn workers; {REPORTS} reports per trial", flush=True)
        api = Api(db_url, args.workers, home)

        # The big study first, before any worker asked for work (so nothing pre-asks into
        # it while it is filled): `big` finished trials, then a budget that allows none.
        plain_name = None
        big_id = 0
        if big:
            big_id, optuna_name = create_study(api, tokens["user"], "big", big + 1)
            t0 = time.perf_counter()
            preload(db_url, optuna_name, big, big_id)
            set_budget(db_url, big_id, big)
            if not args.no_baseline:
                plain_name = create_plain_study(db_url, f"plain-big-{uuid.uuid4().hex[:6]}")
                preload(db_url, plain_name, big, None)
            print(f"inserted {big} trials (twice) in {time.perf_counter() - t0:.1f}s", flush=True)

        # Fresh studies: one per level.
        for n in agents:
            trials = per_level.get(n, default_trials)
            study_id, _ = create_study(api, tokens["user"], f"fresh-{n}", trials + 1)
            warm_up(api, tokens["worker"])
            lv = run_tuneforge(api, tokens, study_id, n, trials, "fresh")
            levels.append(lv)
            print_progress(lv)
            if not args.no_baseline:
                name = create_plain_study(db_url, f"plain-fresh-{n}-{uuid.uuid4().hex[:6]}")
                bl = run_baseline(db_url, name, n, trials, 0, "fresh")
                levels.append(bl)
                print_progress(bl)

        # The big study: a restarted API warms it in the background at start-up; a few
        # warm-up trials make sure every worker process has it loaded before the clock,
        # and the budget leaves room all along, so the pre-asked buffers stay full
        # between levels as they would in a long study.
        if big:
            api.stop()
            api = Api(db_url, args.workers, home)
            total = sum(per_level.get(n, default_trials) for n in agents)
            set_budget(db_url, big_id, big + 2 * args.workers + total + 2 * max(agents))
            for _ in range(2 * args.workers):
                warm_up(api, tokens["worker"])
            time.sleep(5)  # the buffers fill
            plain_done = big
            for n in agents:
                trials = per_level.get(n, default_trials)
                lv = run_tuneforge(api, tokens, big_id, n, trials, "10k")
                levels.append(lv)
                print_progress(lv)
                if plain_name is not None:
                    bl = run_baseline(db_url, plain_name, n, trials, plain_done, "10k")
                    plain_done += bl.trials
                    levels.append(bl)
                    print_progress(bl)
                time.sleep(3)
    finally:
        if api is not None:
            api.stop()
        if not args.keep:
            drop_database(server, db_name)
    print()
    print_table(levels)


def print_progress(lv: Level) -> None:
    print(
        f"  {lv.system:<9} {lv.scenario:<5} {lv.agents:>3} agents: {lv.trials} trials in {lv.elapsed:.1f}s "
        f"= {lv.rate:.1f}/s, lease p99 {lv.pct('lease', 0.99)} ms",
        flush=True,
    )


if __name__ == "__main__":
    main()
