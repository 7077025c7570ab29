"""Property-based fuzz of the whole published OpenAPI (schemathesis over hypothesis).

For every operation of `create_app(settings).openapi()`, on SQLite and PostgreSQL:
positive and negative cases (schema-valid and schema-breaking parameters and bodies),
sent with the token of the role the operation is for most of the time, and with
another role's, a bogus one or none otherwise; path parameters point at real seeded
objects (the user's study, a complete trial with a checkpoint, the worker's live
lease) half of the time. Every response must

- not be a 5xx (`not_a_server_error`; an exception escaping the app counts too),
- have a documented status code, the documented content type, and a body matching
  the documented schema (`status_code_conformance`, `content_type_conformance`,
  `response_schema_conformance`, `response_headers_conformance`).

Each body-taking operation also gets one request over the body-size limit (413).

Sized for CI on two busy cores: FUZZ_EXAMPLES cases per operation and mode,
derandomized (the same cases every run), no deadline, no example database, no
shrinking (a failure is recorded with its curl line and the run goes on, so one run
reports every failing operation at once). TUNEFORGE_FUZZ_EXAMPLES raises the count
for a longer local run.
"""

from __future__ import annotations

import copy
import os
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from types import SimpleNamespace
from typing import Annotated, Any

import hypothesis.strategies as st
import pytest
import schemathesis
from fastapi import APIRouter, FastAPI, Path
from fastapi.responses import JSONResponse
from fuzz_helpers import SPEC, Seeded, checkpoint_tar
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.python.asgi import ASGIClient
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.api.app import create_app
from service.settings import Settings

FUZZ_EXAMPLES = int(os.environ.get("TUNEFORGE_FUZZ_EXAMPLES", "25"))
VERBOSE = bool(os.environ.get("TUNEFORGE_FUZZ_VERBOSE"))  # print every response (with -s)
# Exploration runs only: new cases each run instead of the same ones (CI leaves it unset).
EXPLORE = bool(os.environ.get("TUNEFORGE_FUZZ_EXPLORE"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Checkpoint uploads are raw bytes: send generated strings as they are.
schemathesis.serializer.alias("application/x-tar", "application/octet-stream")
MODES = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=not EXPLORE,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        print_blob=False,
    )


# Bodies near the valid ones, for the routes whose schema alone rarely yields an accepted
# request (the spec's cross-field rules, the seeded study's search space, the objective
# metric): hypothesis varies them, the route decides. Keyed by (method, path).
_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=24)
_FLOAT = st.floats(allow_nan=False, allow_infinity=False)
_SMALL = st.integers(min_value=-2, max_value=2_000)
_SCALAR = st.one_of(st.none(), st.booleans(), _SMALL, _FLOAT, _NAME)


def _spec_bodies(seeded: Seeded) -> st.SearchStrategy[dict[str, Any]]:
    lr = st.fixed_dictionaries(
        {"type": st.just("float"), "low": _FLOAT, "high": _FLOAT},
        optional={"log": st.booleans(), "step": _FLOAT},
    )
    layers = st.fixed_dictionaries(
        {"type": st.just("int"), "low": _SMALL, "high": _SMALL}, optional={"log": st.booleans(), "step": _SMALL}
    )
    batch = st.fixed_dictionaries({"type": st.just("categorical"), "choices": st.lists(_SCALAR, max_size=4)})
    options = st.dictionaries(_NAME, _SCALAR, max_size=2)
    return st.fixed_dictionaries(
        {
            "name": _NAME.map(lambda name: f"h-{name}"),
            "model": st.just(SPEC["model"]),
            "dataset": st.just(SPEC["dataset"]),
            "objectives": st.lists(
                st.fixed_dictionaries(
                    {
                        "metric": st.sampled_from(["accuracy", "f1_macro", "loss", "nope"]),
                        "direction": st.sampled_from(["maximize", "minimize"]),
                    }
                ),
                min_size=1,
                max_size=3,
            ),
            "search_space": st.fixed_dictionaries(
                {}, optional={"learning_rate": lr, "num_layers": layers, "batch_size": batch}
            ),
            "sampler": st.fixed_dictionaries(
                {"name": st.sampled_from(["tpe", "random", "grid", "cmaes", "gp", "qmc", "nsga2"])},
                optional={"seed": _SMALL, "options": options},
            ),
            "pruner": st.fixed_dictionaries(
                {
                    "name": st.sampled_from(
                        ["none", "median", "percentile", "successive_halving", "asha", "hyperband", "wilcoxon"]
                    )
                },
                optional={"options": options},
            ),
            "budget": st.fixed_dictionaries(
                {"n_trials": st.one_of(st.integers(1, 100), _SMALL)},
                optional={
                    "max_parallel": st.integers(1, 4),
                    "max_retries": st.integers(0, 3),
                    "timeout_s": st.one_of(st.floats(1, 1e5), _FLOAT),
                    "trial_timeout_s": st.floats(1, 1e5),
                },
            ),
        },
        optional={
            "fixed": st.dictionaries(st.sampled_from(["weight_decay", "warmup_ratio", "epochs", "zzz"]), _SCALAR),
            "warm_start_from": st.fixed_dictionaries(
                {"study": st.sampled_from([seeded.study_id, "fuzz-0", 10**6])}, optional={"n_best": _SMALL}
            ),
        },
    )


def _realistic_bodies(seeded: Seeded) -> dict[tuple[str, str], st.SearchStrategy[Any]]:
    config = st.fixed_dictionaries(
        {
            "learning_rate": st.one_of(st.floats(1e-5, 1e-3), _FLOAT),
            "batch_size": st.sampled_from([16, 32, 64, 7, "x"]),
            "num_layers": st.integers(0, 8),
        },
        optional={"unknown": _SCALAR},
    )
    metrics = st.dictionaries(st.sampled_from(["accuracy", "loss", "f1"]), _FLOAT, min_size=1)
    step = st.integers(0, 10**6)
    return {
        ("POST", "/api/v1/studies"): _spec_bodies(seeded),
        ("POST", "/api/v1/studies/{study_id}/enqueue"): st.fixed_dictionaries(
            {"configurations": st.lists(config, min_size=1, max_size=3)}
        ),
        ("POST", "/api/v1/leases/{lease_id}/heartbeat"): st.fixed_dictionaries({}, optional={"step": step}),
        ("POST", "/api/v1/leases/{lease_id}/report"): st.fixed_dictionaries({"step": step, "metrics": metrics}),
        ("POST", "/api/v1/leases/{lease_id}/complete"): st.fixed_dictionaries(
            {"step": step, "metrics": metrics, "duration_s": st.floats(0, 1e6)}
        ),
        ("POST", "/api/v1/leases/{lease_id}/fail"): st.fixed_dictionaries(
            {"reason": st.sampled_from(["oom", "nan", "timeout", "error", "preempted"])},
            optional={"message": st.text(max_size=50), "step": step, "traceback": st.text(max_size=50)},
        ),
        ("PUT", "/api/v1/leases/{lease_id}/checkpoint"): st.sampled_from([checkpoint_tar(), b"not a tar"]),
    }


def _role(path: str) -> str:
    return "worker" if path.startswith("/api/v1/leases") else "user"


def _seeded_path(operation: Any, seeded: Seeded) -> dict[str, Any]:
    names = {p.name for p in operation.path_parameters}
    values: dict[str, Any] = {"study_id": seeded.study_id, "lease_id": seeded.lease_id}
    # A trial checkpoint exists for the complete trial; every other trial route reads either.
    values["number"] = seeded.done_number if operation.path.endswith("/checkpoint") else seeded.number
    return {name: values[name] for name in names if name in values}


class Findings:
    """Failures by (operation, title), each with its first reproduction."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, str], str] = {}
        self.sent = 0
        self.statuses: dict[str, Counter[int]] = defaultdict(Counter)

    def add(self, label: str, title: str, detail: str) -> None:
        self.items.setdefault((label, title), detail)

    def report(self) -> str:
        return "\n\n".join(f"[{label}] {title}\n{detail}" for (label, title), detail in sorted(self.items.items()))


def _fuzz_operation(
    operation: Any,
    tokens: dict[str, str],
    seeded: Seeded,
    session: ASGIClient,
    findings: Findings,
    examples: int = FUZZ_EXAMPLES,
) -> None:
    label = operation.label
    role = _role(operation.path)
    other = "user" if role == "worker" else "worker"
    # Mostly the right role (the owner, sometimes the admin), sometimes the wrong one,
    # another user (bob: the seeded objects are not his), a token nobody issued, or none.
    auth = st.sampled_from([role] * 6 + ["admin", other, "bob", "bogus", None])
    seeded_path = _seeded_path(operation, seeded)
    realistic = _realistic_bodies(seeded).get((operation.method.upper(), operation.path))

    other_input = len(operation.body) or len(operation.query) or len(operation.headers)
    for mode in MODES:
        negative = mode is schemathesis.GenerationMode.NEGATIVE
        if negative and not (other_input or seeded_path):
            continue  # nothing to break (GET /healthz)
        strategies = [operation.as_strategy(generation_mode=mode)]
        if seeded_path and (other_input or not negative):
            # With the path fixed, a negative case must break something else.
            strategies.append(operation.as_strategy(generation_mode=mode, path_parameters=seeded_path))
        if realistic is not None and not negative:

            def near_valid(body: Any, operation: Any = operation) -> st.SearchStrategy[Any]:
                headers = {"X-Checkpoint-Step": "1"} if operation.method.upper() == "PUT" else None
                return operation.as_strategy(path_parameters=seeded_path, body=body, headers=headers)

            strategies.append(realistic.flatmap(near_valid))
        cases = st.one_of(*strategies)

        @_settings(examples)
        @given(case=cases, who=auth)
        def run(case: Any, who: str | None) -> None:
            headers = {"Authorization": f"Bearer {tokens[who]}"} if who else {}
            findings.sent += 1
            try:
                response = case.call(session=session, headers=headers)
            except Exception as exc:  # the app raised after (or instead of) answering: a 500
                where = "".join(traceback.format_exception(exc, limit=-6))
                findings.add(label, f"exception {type(exc).__name__}", f"{case.as_curl_command(headers)}\n{where}")
                return
            findings.statuses[label][response.status_code] += 1
            if VERBOSE:
                print(f"{label} who={who} -> {response.status_code} {response.text[:200]}")
            try:
                case.validate_response(response, checks=CHECKS, headers=headers)
            except FailureGroup as group:
                for failure in group.exceptions:
                    findings.add(label, failure.title, f"{case.as_curl_command(headers)}\n{failure.message}")

        run()


def _oversized(schema: Any, session: ASGIClient, token: str, limit: int, findings: Findings) -> None:
    """One body over the limit per body-taking operation: 413 with the documented Problem body."""
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.body is None or not len(operation.body):
            continue
        if operation.path.endswith("/checkpoint"):
            continue  # its limit is max_checkpoint_bytes (gigabytes); tests/service covers it
        media_type = operation.body[0].media_type
        path = {p.name: 1 for p in operation.path_parameters}
        body = "x" * (limit + 1)
        case = schema.make_case(operation=operation, path_parameters=path, body=body, media_type=media_type)
        headers = {"Authorization": f"Bearer {token}"}
        response = case.call(session=session, headers=headers)
        if response.status_code != 413:
            findings.add(operation.label, "oversized body not 413", f"got {response.status_code}: {response.text}")
            continue
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except FailureGroup as group:
            for failure in group.exceptions:
                findings.add(operation.label, f"413: {failure.title}", failure.message)


def _load_schema(app: FastAPI) -> Any:
    published = copy.deepcopy(app.openapi())
    # Tokens are ours to choose (see _fuzz_operation): without the security requirement
    # schemathesis neither generates nor strips the Authorization header. The 401/403
    # responses stay documented, so they are still checked.
    for item in published["paths"].values():
        for op in item.values():
            op.pop("security", None)
    schema = schemathesis.openapi.from_dict(published)
    schema.app = app
    return schema


_planted = APIRouter()


@_planted.get("/boom/{n}")
def _planted_bugs(n: Annotated[int, Path(ge=0, le=1000)]) -> dict[str, int]:
    if n % 3 == 1:
        raise RuntimeError("planted")
    if n % 3 == 2:
        return JSONResponse({"n": "not an int"})  # type: ignore[return-value]
    return {"n": n}


def test_the_harness_reports_5xx_and_schema_mismatches(settings: Settings, user_token: str) -> None:
    """A route with planted bugs: the same machinery must report each kind, or a clean
    run of the real API would prove nothing."""
    planted_app = create_app(settings, routers=[_planted], lifespan_hooks=[])
    schema = _load_schema(planted_app)
    findings = Findings()
    tokens = {"user": user_token, "worker": user_token, "admin": user_token, "bob": user_token, "bogus": "x"}
    seeded = SimpleNamespace(study_id=1, done_number=0, number=0, lease_id="x")
    try:
        _fuzz_operation(schema["/api/v1/boom/{n}"]["GET"], tokens, seeded, ASGIClient(planted_app), findings)
    finally:
        planted_app.state.ctx.close()
    titles = {title for _label, title in findings.items}
    assert "exception RuntimeError" in titles, titles
    assert any("schema" in title.lower() for title in titles), titles


@pytest.mark.timeout(900)
def test_fuzz_the_whole_api(
    app: FastAPI,
    client: Any,  # runs the app's lifespan; the fuzz calls the app in-process
    settings: Settings,
    seed: Callable[[], Seeded],
    user_token: str,
    worker_token: str,
    admin_token: str,
    other_token: str,
) -> None:
    schema = _load_schema(app)
    tokens = {
        "user": user_token,
        "worker": worker_token,
        "admin": admin_token,
        "bob": other_token,
        "bogus": "tf_" + "0" * 40,
    }
    # Not entered as a context manager: the `client` fixture owns the app's lifespan.
    session = ASGIClient(app)
    findings = Findings()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 19, [op.label for op in operations]
    for operation in operations:
        # Fresh objects per operation: an earlier one may have deleted or finished them.
        _fuzz_operation(operation, tokens, seed(), session, findings)
    # A shorter second pass where the objects sit in a cancelled study: the lease is
    # still live, its heartbeats say stop, enqueue and cancel are conflicts.
    for operation in operations:
        if len(operation.path_parameters):
            _fuzz_operation(operation, tokens, seed(cancelled=True), session, findings, max(FUZZ_EXAMPLES // 5, 2))
    _oversized(schema, session, user_token, settings.max_body_bytes, findings)
    assert findings.sent >= len(operations) * FUZZ_EXAMPLES
    if VERBOSE:
        for label, counts in sorted(findings.statuses.items()):
            print(f"{label}: {dict(sorted(counts.items()))}")
    # The fuzz must get past authentication and lookups to prove much: most operations
    # have to have answered a 2xx at least once.
    never = sorted(label for label, counts in findings.statuses.items() if not any(200 <= c < 300 for c in counts))
    assert len(never) <= len(operations) // 4, f"no 2xx answer from {never}: is the seeding still right?"
    assert not findings.items, f"{len(findings.items)} fuzz failures:\n\n{findings.report()}"
