"""The training loop end to end on the tiny model: learning, evaluation schedule, pruning,
stopping, divergence, accumulation and exact resume."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from trainer_test_helpers import write_csv
from transformers import AutoModelForSequenceClassification

import trainer.loop as loop
from trainer.checkpoint import latest_checkpoint
from trainer.outcome import ConfigError, NonFiniteLoss, TrialPruned, TrialStopped

Reports = list[tuple[int, dict[str, float]]]


def recorder(prune_at: int | None = None) -> tuple[Reports, Callable[[int, dict[str, float]], bool]]:
    seen: Reports = []

    def report(step: int, metrics: dict[str, float]) -> bool:
        seen.append((step, metrics))
        return step == prune_at

    return seen, report


def weights(result_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(result_dir / "model.safetensors"))


def test_learns_separable_data(make_config: Callable[..., Any], make_runtime: Callable[..., Any]) -> None:
    config = make_config(hparams={"learning_rate": 5e-3, "epochs": 3})
    steps: list[tuple[int, int]] = []
    reports, report = recorder()
    result = loop.train(config, make_runtime(on_step=lambda s, t: steps.append((s, t))), report)

    assert result.metrics["accuracy"] > 0.9 and result.metrics["f1_macro"] > 0.9
    # 180 training rows / batch 16 = 12 steps per epoch; evaluated at each epoch's end.
    assert [s for s, _ in result.history] == [12, 24, 36] == [s for s, _ in reports]
    assert steps[0] == (1, 36) and steps[-1] == (36, 36) and len(steps) == 36
    assert set(result.metrics) >= {"loss", "accuracy", "f1_macro"}
    assert result.history[0][1]["loss"] > result.metrics["loss"]
    assert result.step == 36 and result.duration_s > 0
    # The export is a folder from_pretrained loads, with the label map.
    assert result.checkpoint is not None
    model = AutoModelForSequenceClassification.from_pretrained(str(result.checkpoint), local_files_only=True)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    # Resumable checkpoints are cleaned up once the trial is complete.
    assert latest_checkpoint(result.checkpoint.parent) is None


def test_eval_every_steps_and_max_steps(make_config: Callable[..., Any], make_runtime: Callable[..., Any]) -> None:
    config = make_config(run={"eval_every_steps": 3, "max_steps": 7}, hparams={"epochs": 5})
    reports, report = recorder()
    result = loop.train(config, make_runtime(), report)
    assert result.step == 7
    assert [s for s, _ in reports] == [3, 6, 7]  # every 3 steps, and once at the end


def test_pruning_stops_at_the_asked_step(make_config: Callable[..., Any], make_runtime: Callable[..., Any]) -> None:
    config = make_config(run={"eval_every_steps": 2}, hparams={"epochs": 3})
    steps: list[int] = []
    reports, report = recorder(prune_at=4)
    with pytest.raises(TrialPruned) as info:
        loop.train(config, make_runtime(on_step=lambda s, t: steps.append(s)), report)
    assert info.value.step == 4
    assert [s for s, _ in reports] == [2, 4]
    assert steps[-1] == 4  # no step ran after the pruning decision


def nan_after(monkeypatch: pytest.MonkeyPatch, forwards: int) -> None:
    """Make the built model's training logits NaN after `forwards` forward passes."""
    real = loop.build_model

    def build(*args: Any, **kwargs: Any) -> Any:
        built = real(*args, **kwargs)
        count = {"n": 0}

        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
            count["n"] += 1
            if module.training and count["n"] > forwards:
                output.logits = output.logits * float("nan")
            return output

        built.model.register_forward_hook(hook)
        return built

    monkeypatch.setattr(loop, "build_model", build)


def test_nan_loss_raises_non_finite(
    make_config: Callable[..., Any], make_runtime: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    nan_after(monkeypatch, 3)
    runtime = make_runtime()
    with pytest.raises(NonFiniteLoss) as info:
        loop.train(make_config(hparams={"epochs": 2}), runtime, recorder()[1])
    assert info.value.step == 4  # caught on the step it happened (CPU checks every step)
    assert not (runtime.work_dir / "model").exists()


def test_stop_request_checkpoints_then_raises(
    make_config: Callable[..., Any], make_runtime: Callable[..., Any]
) -> None:
    polls = {"n": 0}

    def should_stop() -> bool:
        polls["n"] += 1
        return polls["n"] >= 3

    saved: list[tuple[Path, int]] = []
    runtime = make_runtime(should_stop=should_stop, on_checkpoint=lambda folder, step: saved.append((folder, step)))
    with pytest.raises(TrialStopped) as info:
        loop.train(make_config(), runtime, recorder()[1])
    assert info.value.step == 3
    folder = latest_checkpoint(runtime.work_dir)
    assert folder is not None and folder.name == "step-00000003"
    assert saved == [(folder, 3)]
    assert {p.name for p in folder.iterdir()} >= {
        "model.safetensors", "optimizer.safetensors", "rng.safetensors", "scheduler.json",
        "trainer_state.json", "config.json", "labels.json", "tokenizer",
    }


def test_grad_accumulation_equals_one_big_batch(
    make_config: Callable[..., Any], make_runtime: Callable[..., Any], tmp_path: Path
) -> None:
    # dropout 0, so the only difference would be how the accumulated loss is weighted
    # (the epoch's last step has a short micro-batch: 180 rows = 11 x 16 + 4).
    base = {"dropout": 0.0, "learning_rate": 3e-3, "optimizer": "sgd"}
    big = loop.train(
        make_config(hparams={**base, "batch_size": 16}), make_runtime(work_dir=tmp_path / "big"), recorder()[1]
    )
    accum = loop.train(
        make_config(hparams={**base, "batch_size": 8, "grad_accum_steps": 2}),
        make_runtime(work_dir=tmp_path / "accum"),
        recorder()[1],
    )
    assert big.step == accum.step == 12
    a, b = weights(big.checkpoint), weights(accum.checkpoint)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


@pytest.mark.parametrize("stop_at", [4, 6, 9])  # mid-epoch; epoch end (an evaluation checkpoint too); epoch 2
def test_resume_matches_uninterrupted_run(
    stop_at: int, make_config: Callable[..., Any], make_runtime: Callable[..., Any], tmp_path: Path
) -> None:
    # Dropout on, so RNG state matters; accumulation, so the position in the epoch matters.
    config = make_config(
        hparams={"epochs": 2, "grad_accum_steps": 2, "dropout": 0.2, "label_smoothing": 0.1, "warmup_ratio": 0.2}
    )
    full = loop.train(config, make_runtime(work_dir=tmp_path / "full"), recorder()[1])
    assert full.step == 12  # 180 rows / 16 = 12 micro-batches = 6 steps per epoch

    steps = iter(range(1, 100))
    stopper = make_runtime(work_dir=tmp_path / "first", should_stop=lambda: next(steps) >= stop_at)
    with pytest.raises(TrialStopped):
        loop.train(config, stopper, recorder()[1])
    ckpt = latest_checkpoint(tmp_path / "first")
    assert ckpt is not None and ckpt.name == f"step-{stop_at:08d}"

    resumed_reports, report = recorder()
    resumed = loop.train(config, make_runtime(work_dir=tmp_path / "second", resume_from=ckpt), report)
    assert resumed.step == full.step
    a, b = weights(full.checkpoint), weights(resumed.checkpoint)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=0), name
    assert resumed.metrics == pytest.approx(full.metrics)
    assert [s for s, _ in resumed.history] == [s for s, _ in full.history] == [6, 12]
    assert [s for s, _ in resumed_reports] == [s for s, _ in full.history if s > stop_at]


def test_other_optimizers_schedules_and_balanced_sampling(
    make_config: Callable[..., Any], make_runtime: Callable[..., Any]
) -> None:
    config = make_config(
        hparams={
            "optimizer": "rmsprop", "scheduler": "cosine", "learning_rate": 1e-3, "class_balanced": True,
            "label_smoothing": 0.1, "max_grad_norm": 0.0, "unfreeze_depth": 1,
        },
        run={"max_steps": 4, "precision": "bf16"},  # bf16 autocast also works on CPU
    )
    result = loop.train(config, make_runtime(), recorder()[1])
    assert result.step == 4
    assert all(v == v for v in result.metrics.values())  # finite, not NaN


def test_sequences_longer_than_the_model_accepts(
    make_config: Callable[..., Any], make_runtime: Callable[..., Any], tmp_path: Path
) -> None:
    rows = [{"text": " ".join(["good film"] * 80), "label": lab} for lab in ["pos", "neg"] * 10]
    path = write_csv(tmp_path / "long.csv", rows)
    steps: list[int] = []
    with pytest.raises(ConfigError, match=r"max_seq_len: rows of 162 tokens exceed the model's 128 positions"):
        loop.train(
            make_config(train=path, hparams={"max_seq_len": 200}),
            make_runtime(on_step=lambda s, t: steps.append(s)),
            recorder()[1],
        )
    assert not steps


@pytest.mark.gpu
def test_cuda_bf16_compiled(make_config: Callable[..., Any], make_runtime: Callable[..., Any]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    config = make_config(hparams={"learning_rate": 5e-3, "epochs": 3}, run={"compile": True})
    result = loop.train(config, make_runtime(device="cuda"), recorder()[1])
    assert result.metrics["accuracy"] > 0.9


def test_resume_refuses_another_trials_checkpoint(
    make_config: Callable[..., Any], make_runtime: Callable[..., Any], tmp_path: Path
) -> None:
    with pytest.raises(TrialStopped):
        loop.train(make_config(), make_runtime(work_dir=tmp_path / "a", should_stop=lambda: True), recorder()[1])
    ckpt = latest_checkpoint(tmp_path / "a")
    assert ckpt is not None
    other = make_config(hparams={"learning_rate": 1e-4})
    with pytest.raises(ConfigError, match=r"another trial \(hparams.learning_rate differ\)"):
        loop.train(other, make_runtime(work_dir=tmp_path / "b", resume_from=ckpt), recorder()[1])
