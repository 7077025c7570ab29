"""Checkpoints: exact round trip of every state, no pickle, atomic writes, export."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import trainer.checkpoint as ckpt_mod
from trainer.checkpoint import TrainState, export, latest_checkpoint, load_checkpoint, read_config, save_checkpoint
from trainer.config import TrialConfig
from trainer.data import LabelMap
from trainer.knobs import Hyperparams
from trainer.modeling.build import build_model
from trainer.optim import build_optimizer, build_scheduler
from trainer.outcome import ConfigError

LABELS = LabelMap(("neg", "pos"))


class Tied(nn.Module):
    """Input and output embeddings share one tensor, as language-model heads do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.mix = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 12, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(torch.relu(self.mix(self.embed(x)))))


def setup(optimizer: str, seed: int = 0) -> tuple[Tied, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = Tied()
    hp = Hyperparams(optimizer=optimizer, learning_rate=0.01, scheduler="cosine", warmup_ratio=0.2)
    opt = build_optimizer(model, hp)
    return model, opt, build_scheduler(opt, hp, total_steps=20, steps_per_epoch=5)


def train_steps(model: Tied, opt: torch.optim.Optimizer, sched: Any, n: int) -> None:
    for _ in range(n):
        x = torch.randint(0, 12, (4, 5))
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        opt.step()
        sched.step()
        opt.zero_grad()


@pytest.fixture(scope="module")
def tokenizer(tiny_bert_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(tiny_bert_dir), local_files_only=True)


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd", "rmsprop"])
def test_round_trip_restores_everything(
    optimizer: str, tmp_path: Path, tokenizer: Any, make_config: Callable[..., Any]
) -> None:
    model, opt, sched = setup(optimizer)
    train_steps(model, opt, sched, 3)
    state = TrainState(step=3, epoch=1, batch_in_epoch=2, history=[(2, {"loss": 0.5})], train_loss_sum=1.5,
                       train_loss_count=7, elapsed_s=4.0)
    lr_at_save = opt.param_groups[0]["lr"]
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    folder = save_checkpoint(
        tmp_path, model=model, optimizer=opt, scheduler=sched, state=state, config=make_config(),
        labels=LABELS, tokenizer=tokenizer,
    )
    # What the uninterrupted run does next.
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))
    train_steps(model, opt, sched, 2)

    model2, opt2, sched2 = setup(optimizer, seed=99)  # different init: everything must come from the folder
    random.seed(0)
    torch.manual_seed(0)
    restored = load_checkpoint(folder, model=model2, optimizer=opt2, scheduler=sched2, labels=LABELS)
    assert restored == state
    assert (random.random(), np.random.rand()) == expected_draws[:2]
    assert torch.equal(torch.rand(3), expected_draws[2])
    assert model2.out.weight is model2.embed.weight  # tying survives loading
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == lr_at_save
    # Continuing from the checkpoint reproduces the uninterrupted run exactly.
    train_steps(model2, opt2, sched2, 2)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_no_pickle_anywhere(
    tmp_path: Path, tokenizer: Any, make_config: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt, sched = setup("adamw")
    train_steps(model, opt, sched, 1)
    folder = save_checkpoint(
        tmp_path, model=model, optimizer=opt, scheduler=sched, state=TrainState(step=1), config=make_config(),
        labels=LABELS, tokenizer=tokenizer,
    )
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    assert {"model.safetensors", "optimizer.safetensors", "rng.safetensors"} <= names

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", refuse)
    model2, opt2, sched2 = setup("adamw", seed=5)
    load_checkpoint(folder, model=model2, optimizer=opt2, scheduler=sched2, labels=LABELS)
    assert torch.equal(model2.mix.weight, model.mix.weight)
    assert read_config(folder) == make_config()


def test_atomic_write_and_pruning(
    tmp_path: Path, tokenizer: Any, make_config: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt, sched = setup("adamw")
    common = {"model": model, "optimizer": opt, "scheduler": sched, "config": make_config(), "labels": LABELS,
              "tokenizer": tokenizer}
    first = save_checkpoint(tmp_path, state=TrainState(step=1), **common)
    # A write that fails half-way leaves nothing behind, and the previous checkpoint intact.
    monkeypatch.setattr(ckpt_mod, "_save_rng", lambda path: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, state=TrainState(step=2), **common)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]
    # A newer checkpoint replaces the older (keep=1); the same step again is the same folder.
    second = save_checkpoint(tmp_path, state=TrainState(step=5), **common)
    assert latest_checkpoint(tmp_path) == second and not first.exists()
    assert save_checkpoint(tmp_path, state=TrainState(step=5), **common) == second
    kept = save_checkpoint(tmp_path, state=TrainState(step=6), keep=2, **common)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000005", kept.name]


def test_load_refuses_a_foreign_checkpoint(tmp_path: Path, tokenizer: Any, make_config: Callable[..., Any]) -> None:
    model, opt, sched = setup("adamw")
    folder = save_checkpoint(
        tmp_path, model=model, optimizer=opt, scheduler=sched, state=TrainState(step=1), config=make_config(),
        labels=LABELS, tokenizer=tokenizer,
    )
    with pytest.raises(ConfigError, match="labels"):
        load_checkpoint(folder, model=model, optimizer=opt, scheduler=sched, labels=LabelMap(("a", "b", "c")))
    with pytest.raises(ConfigError, match="not a checkpoint"):
        load_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=sched, labels=LABELS)
    other = nn.Linear(3, 3)
    other_opt = build_optimizer(other, Hyperparams())
    other_sched = build_scheduler(other_opt, Hyperparams(), 10, 5)
    with pytest.raises(ConfigError, match="does not fit the model"):
        load_checkpoint(folder, model=other, optimizer=other_opt, scheduler=other_sched, labels=LABELS)


def test_export_loads_with_from_pretrained(tmp_path: Path, make_config: Callable[..., Any]) -> None:
    config = make_config()
    built = build_model(config, 2, LABELS.id2label)
    out = export(built, tmp_path / "model", LABELS, config)
    loaded = AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True)
    assert loaded.config.id2label == {0: "neg", 1: "pos"}
    assert torch.equal(loaded.classifier.weight, built.model.classifier.weight)
    assert (out / "labels.json").read_text() == '["neg", "pos"]'
    assert TrialConfig.model_validate_json((out / "trial_config.json").read_text()) == config
    # Exporting again replaces the folder whole.
    with torch.no_grad():
        built.model.classifier.weight.add_(1.0)
    export(built, tmp_path / "model", LABELS, config)
    again = AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True)
    assert torch.equal(again.classifier.weight, built.model.classifier.weight)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
