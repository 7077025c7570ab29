"""The trial boundary: every way a trial ends becomes a classified outcome, and the process lives on."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_test_helpers import separable_rows, write_csv

import trainer.loop as loop
from trainer.boundary import is_oom, run_trial
from trainer.protocol import FailureReason


def never(step: int, metrics: dict[str, float]) -> bool:
    return False


def failing_forward(monkeypatch: pytest.MonkeyPatch, exc: BaseException, after: int = 2) -> list[Any]:
    """Make the next built model raise `exc` on its (after+1)-th forward; returns weakrefs to the models."""
    real = loop.build_model
    models: list[Any] = []

    def build(*args: Any, **kwargs: Any) -> Any:
        built = real(*args, **kwargs)
        count = {"n": 0}

        def hook(module: torch.nn.Module, inputs: Any) -> None:
            count["n"] += 1
            if count["n"] > after:
                raise exc

        built.model.register_forward_pre_hook(hook)
        models.append(weakref.ref(built.model))
        monkeypatch.setattr(loop, "build_model", real)  # only the first trial fails
        return built

    monkeypatch.setattr(loop, "build_model", build)
    return models


def test_complete(make_config: Callable[..., Any], make_runtime: Callable[..., Any]) -> None:
    outcome = run_trial(make_config(run={"max_steps": 3}), make_runtime(), never)
    assert outcome.state == "complete" and outcome.reason is None
    assert outcome.result is not None and outcome.step == outcome.result.step == 3


def test_simulated_oom_is_classified_memory_freed_and_next_trial_runs(
    make_config: Callable[..., Any], make_runtime: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    models = failing_forward(monkeypatch, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    outcome = run_trial(make_config(), make_runtime(work_dir=tmp_path / "a"), never)
    assert outcome.state == "failed" and outcome.reason == FailureReason.OOM
    assert "out of memory" in outcome.message and outcome.traceback
    assert outcome.error_type == "OutOfMemoryError"
    # Nothing holds the failed trial's model any more (traceback frames, exception, locals).
    gc.collect()
    assert models and models[0]() is None
    # The same process runs the next trial.
    nxt = run_trial(make_config(run={"max_steps": 2}), make_runtime(work_dir=tmp_path / "b"), never)
    assert nxt.state == "complete" and nxt.step == 2


def test_runtime_error_saying_out_of_memory_is_oom(
    make_config: Callable[..., Any], make_runtime: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    failing_forward(monkeypatch, RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be ..."))
    outcome = run_trial(make_config(), make_runtime(), never)
    assert outcome.reason == FailureReason.OOM
    assert outcome.message == "RuntimeError: CUDA error: out of memory"
    assert is_oom(MemoryError()) and not is_oom(RuntimeError("shape mismatch"))


def test_unexpected_error_keeps_its_traceback(
    make_config: Callable[..., Any], make_runtime: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    failing_forward(monkeypatch, KeyError("boom"))
    outcome = run_trial(make_config(), make_runtime(), never)
    assert outcome.state == "failed" and outcome.reason == FailureReason.ERROR
    assert outcome.message == "KeyError: 'boom'"
    assert outcome.traceback is not None and "Traceback" in outcome.traceback and "hook" in outcome.traceback


def test_pruned(make_config: Callable[..., Any], make_runtime: Callable[..., Any]) -> None:
    outcome = run_trial(make_config(run={"eval_every_steps": 2}), make_runtime(), lambda step, m: step >= 4)
    assert outcome.state == "pruned" and outcome.step == 4 and outcome.reason is None


def test_stopped_is_preempted(make_config: Callable[..., Any], make_runtime: Callable[..., Any]) -> None:
    outcome = run_trial(make_config(), make_runtime(should_stop=lambda: True), never)
    assert outcome.state == "failed" and outcome.reason == FailureReason.PREEMPTED and outcome.step == 1


def test_nan_is_classified(
    make_config: Callable[..., Any], make_runtime: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_ce = loop.F.cross_entropy

    def nan_loss(logits: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        loss = real_ce(logits, labels, **kwargs)
        return loss * float("nan") if torch.is_grad_enabled() else loss  # training diverges, evaluation not

    monkeypatch.setattr(loop.F, "cross_entropy", nan_loss)
    outcome = run_trial(make_config(), make_runtime(), never)
    assert outcome.state == "failed" and outcome.reason == FailureReason.NAN and outcome.step == 1
    assert "NaN" in outcome.message


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ({"dataset": {"text_column": "body"}}, "no column 'body'; available columns: 'text', 'label'"),
        ({"rows": [{"text": "good film", "label": "pos"}] * 20}, "has a single class ('pos')"),
        ({"rows": []}, "the file is empty"),
    ],
    ids=["unknown-column", "single-class", "empty-file"],
)
def test_bad_config_fails_before_training_with_one_line(
    setup: dict[str, Any], message: str, make_config: Callable[..., Any], make_runtime: Callable[..., Any],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[int] = []
    real = loop.build_model
    monkeypatch.setattr(loop, "build_model", lambda *a, **k: built.append(1) or real(*a, **k))
    train = tmp_path / "train.csv"
    if "rows" in setup:
        if setup["rows"]:
            write_csv(train, setup["rows"])
        else:
            train.write_text("")
    else:
        write_csv(train, separable_rows(20))
    steps: list[int] = []
    config = make_config(train=train, dataset=setup.get("dataset"))
    outcome = run_trial(config, make_runtime(on_step=lambda s, t: steps.append(s)), never)
    assert outcome.state == "failed" and outcome.reason == FailureReason.ERROR
    assert outcome.error_type == "ConfigError" and outcome.traceback is None
    assert message in outcome.message and "\n" not in outcome.message
    assert not steps and not built  # failed while reading data: no model was even loaded
