"""Optimizers, parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.knobs import Hyperparams
from trainer.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from trainer.outcome import ConfigError


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.dense = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.frozen = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        for p in self.frozen.parameters():
            p.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.dense(self.embed(x)) + self.frozen(self.embed(x))))


def test_param_groups_exempt_biases_and_norms_and_skip_frozen() -> None:
    model = Block()
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([model.embed.weight, model.dense.weight, model.head.weight])
    assert ids(no_decay["params"]) == ids([model.dense.bias, model.norm.weight, model.norm.bias, model.head.bias])
    frozen = ids(model.frozen.parameters())
    assert not frozen & (ids(decay["params"]) | ids(no_decay["params"]))


@pytest.mark.parametrize(
    ("name", "cls", "checks"),
    [
        ("adamw", torch.optim.AdamW, {"betas": (0.8, 0.99), "eps": 1e-7}),
        ("adam", torch.optim.Adam, {"betas": (0.8, 0.99), "eps": 1e-7}),
        ("sgd", torch.optim.SGD, {"momentum": 0.5}),
        ("rmsprop", torch.optim.RMSprop, {"momentum": 0.5, "eps": 1e-7}),
    ],
)
def test_optimizer_types(name: str, cls: type, checks: dict[str, object]) -> None:
    hp = Hyperparams(optimizer=name, learning_rate=0.01, beta1=0.8, beta2=0.99, eps=1e-7, momentum=0.5)
    model = Block()
    opt = build_optimizer(model, hp)
    assert type(opt) is cls
    for group in opt.param_groups:
        assert group["lr"] == 0.01
        for key, value in checks.items():
            assert group[key] == value
    # One step: trainable params move and get state; frozen ones get neither.
    before = model.frozen.weight.clone()
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    assert torch.equal(model.frozen.weight, before)
    assert model.frozen.weight not in opt.state
    assert model.dense.weight in opt.state  # sgd/rmsprop keep a momentum buffer, adam(w) moments


def test_no_trainable_parameters_is_a_config_error() -> None:
    model = nn.Linear(2, 2)
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(model, Hyperparams())


def lrs(hp: Hyperparams, total: int, per_epoch: int = 10) -> list[float]:
    """The learning rate each optimizer step actually uses, through a real optimizer + scheduler."""
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, hp)
    sched = build_scheduler(opt, hp, total, per_epoch)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_linear_with_warmup() -> None:
    hp = Hyperparams(learning_rate=1.0, scheduler="linear", warmup_ratio=0.2)
    seen = lrs(hp, 10)  # 2 warmup steps
    assert seen[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert seen[3:] == pytest.approx([7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert lr_factor(hp, 10, 10, 10) == 0.0


def test_cosine_with_warmup() -> None:
    hp = Hyperparams(learning_rate=0.8, scheduler="cosine", warmup_ratio=0.1)
    seen = lrs(hp, 20)  # 2 warmup steps, then 18 of cosine
    assert seen[:2] == pytest.approx([0.4, 0.8])
    for k in range(2, 20):
        assert seen[k] == pytest.approx(0.8 * 0.5 * (1 + math.cos(math.pi * (k - 2) / 18)))
    assert seen[11] == pytest.approx(0.4)  # halfway down
    assert all(a >= b for a, b in zip(seen[1:], seen[2:], strict=False))


def test_step_schedule_counts_epochs() -> None:
    hp = Hyperparams(learning_rate=1.0, scheduler="step", step_size=2, gamma=0.5, warmup_ratio=0.3)
    seen = lrs(hp, 12, per_epoch=2)  # decays every 2 epochs = 4 optimizer steps; no warmup
    assert seen == pytest.approx([1.0] * 4 + [0.5] * 4 + [0.25] * 4)


def test_constant_with_and_without_warmup() -> None:
    assert lrs(Hyperparams(learning_rate=0.3, scheduler="constant"), 5) == pytest.approx([0.3] * 5)
    warm = lrs(Hyperparams(learning_rate=0.3, scheduler="constant", warmup_ratio=0.5), 8)
    assert warm == pytest.approx([0.075, 0.15, 0.225, 0.3, 0.3, 0.3, 0.3, 0.3])


def test_fused_kernels_where_they_exist() -> None:
    for name in ("adamw", "adam", "sgd"):
        assert build_optimizer(Block(), Hyperparams(optimizer=name), "cpu").defaults["fused"] is True
    assert build_optimizer(Block(), Hyperparams(optimizer="rmsprop"), "cpu").defaults["foreach"] is True


@pytest.mark.gpu
def test_adamw_is_fused_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = Block().cuda()
    opt = build_optimizer(model, Hyperparams(optimizer="adamw"), "cuda")
    assert opt.defaults["fused"] is True
