"""trainer.client.TuneForgeClient against a real server: every method, and its errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from api_test_helpers import params, record_trial

from service.context import ServiceContext
from trainer.client import ClientError, ServerUnavailable, TuneForgeClient, resolve_token

Spec = Callable[..., dict[str, Any]]


@pytest.fixture
def tf(live_server: str, user_token: str) -> Iterator[TuneForgeClient]:
    with TuneForgeClient(live_server, user_token, timeout=10) as client:
        yield client


def test_every_endpoint(tf: TuneForgeClient, minilm_spec_data: Spec, ctx: ServiceContext) -> None:
    assert tf.health() == {"status": "ok"} and tf.ready() == {"status": "ready"}
    study = tf.create_study(minilm_spec_data())
    sid = study["id"]
    assert tf.list_studies()["count"] == 1
    assert tf.list_studies(status="cancelled")["data"] == []
    assert tf.enqueue(sid, [params(1e-4)])["trial_numbers"] == [0]
    record_trial(ctx, sid, params(2e-4), [0.8], duration_s=3.0)
    assert tf.get_study(sid)["counts"]["complete"] == 1
    assert [t["number"] for t in tf.list_trials(sid, sort="value", order="desc")["data"]] == [1, 0]
    assert tf.list_trials(sid, state="waiting")["count"] == 1
    assert tf.get_trial(sid, 1)["values"] == [0.8]
    assert [t["number"] for t in tf.best(sid)["trials"]] == [1]
    assert tf.cancel_study(sid)["status"] == "cancelled"
    tf.delete_study(sid)
    assert tf.list_studies()["count"] == 0


def test_client_error_carries_status_field_and_reason(tf: TuneForgeClient, minilm_spec_data: Spec) -> None:
    with pytest.raises(ClientError) as err:
        tf.create_study(minilm_spec_data(budget={"n_trials": 0}))
    assert err.value.status_code == 422
    assert err.value.field == "budget.n_trials" and "greater than or equal to 1" in err.value.reason
    assert str(err.value).startswith("budget.n_trials: ")

    with pytest.raises(ClientError) as err:
        tf.get_study(12345)
    assert (err.value.status_code, err.value.field) == (404, "study_id")


def test_bad_token_is_a_401_client_error(live_server: str) -> None:
    with TuneForgeClient(live_server, "tf_nope") as client, pytest.raises(ClientError) as err:
        client.list_studies()
    assert err.value.status_code == 401 and err.value.field == "authorization"


def test_unreachable_server_is_server_unavailable() -> None:
    with TuneForgeClient("http://127.0.0.1:1", "tf_x", timeout=2) as client, pytest.raises(ServerUnavailable):
        client.health()


def test_token_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNEFORGE_TOKEN", raising=False)
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path))
    assert resolve_token() is None
    (tmp_path / "admin-token").write_text("tf_from_file\n")
    assert resolve_token() == "tf_from_file"
    monkeypatch.setenv("TUNEFORGE_TOKEN", "tf_from_env")
    assert resolve_token() == "tf_from_env"
    assert resolve_token("tf_given") == "tf_given"
