"""Resumable checkpoints and the final export, without pickle.

A checkpoint is a folder `<work_dir>/checkpoints/step-00000123/` holding:

- `model.safetensors`       the model's state (shared tensors stored once)
- `optimizer.safetensors`   every optimizer state tensor, flattened as `state.<param>.<name>`;
                            param groups and non-tensor values in its JSON metadata
- `rng.safetensors`         torch CPU/CUDA generator states and numpy's; python's in metadata
- `scheduler.json`          the LR scheduler's counters
- `trainer_state.json`      step, epoch, position in the epoch, history, running train loss
- `config.json`             the effective TrialConfig
- `labels.json`             class names in id order
- `tokenizer/`              the tokenizer's own files

It is written into a temporary folder beside the target and renamed into place,
so a reader (a resuming attempt, an uploader) never sees half a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from transformers import PreTrainedTokenizerBase

from trainer.config import TrialConfig
from trainer.data import LabelMap
from trainer.modeling.build import BuiltModel, export_model
from trainer.outcome import ConfigError

CHECKPOINT_FORMAT = "tuneforge-checkpoint/1"
_STEP_PREFIX = "step-"


@dataclass
class TrainState:
    """Where the loop is: enough, with the tensors, to continue as if never interrupted."""

    step: int = 0
    """Optimizer steps completed."""
    epoch: int = 0
    batch_in_epoch: int = 0
    """Micro-batches of `epoch` already consumed."""
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    train_loss_sum: float = 0.0
    """Sum of micro-batch losses since the last evaluation, and their count."""
    train_loss_count: int = 0
    elapsed_s: float = 0.0
    """Training time of earlier attempts, so a resumed trial reports its whole duration."""


def checkpoint_dir(work_dir: Path, step: int) -> Path:
    return work_dir / "checkpoints" / f"{_STEP_PREFIX}{step:08d}"


def latest_checkpoint(work_dir: Path) -> Path | None:
    """The newest complete checkpoint under `work_dir`, if any."""
    folder = work_dir / "checkpoints"
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(_STEP_PREFIX))
    return found[-1] if found else None


def save_checkpoint(
    work_dir: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    config: TrialConfig,
    labels: LabelMap,
    tokenizer: PreTrainedTokenizerBase,
    keep: int = 1,
) -> Path:
    """Write a resumable checkpoint for `state.step` atomically; keep the newest `keep` of them."""
    target = checkpoint_dir(work_dir, state.step)
    if target.is_dir():
        # Same step, same weights and RNG (an evaluation checkpoint followed by a stop request).
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"))
        _save_optimizer(optimizer, tmp / "optimizer.safetensors")
        _save_rng(tmp / "rng.safetensors")
        _write_json(tmp / "scheduler.json", scheduler.state_dict())
        _write_json(tmp / "trainer_state.json", {"format": CHECKPOINT_FORMAT, **asdict(state)})
        (tmp / "config.json").write_text(config.model_dump_json(indent=2), encoding="utf-8")
        _write_json(tmp / "labels.json", list(labels.names))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune_old(target.parent, keep)
    return target


def load_checkpoint(
    folder: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    labels: LabelMap,
) -> TrainState:
    """Restore model, optimizer, scheduler and RNG states in place; return the loop state.

    Call after building the model, optimizer and scheduler exactly as the first
    attempt did. ConfigError when the folder is not a checkpoint of this trial.
    """
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        raise ConfigError(f"resume_from: {folder} is not a checkpoint (no trainer_state.json)")
    raw = json.loads(state_file.read_text(encoding="utf-8"))
    if raw.pop("format", None) != CHECKPOINT_FORMAT:
        raise ConfigError(f"resume_from: {folder} was written by an incompatible trainer version")
    saved_labels = tuple(json.loads((folder / "labels.json").read_text(encoding="utf-8")))
    if saved_labels != labels.names:
        raise ConfigError(
            f"resume_from: the checkpoint's labels {list(saved_labels)} differ from the data's {list(labels.names)}"
        )
    try:
        load_model(model, str(folder / "model.safetensors"), strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"resume_from: the checkpoint does not fit the model: {exc}") from None
    _load_optimizer(optimizer, folder / "optimizer.safetensors")
    scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text(encoding="utf-8")))
    _load_rng(folder / "rng.safetensors")
    raw["history"] = [(int(s), dict(m)) for s, m in raw.get("history", [])]
    return TrainState(**raw)


def read_config(folder: Path) -> TrialConfig:
    """The TrialConfig a checkpoint or export was written with."""
    return TrialConfig.model_validate_json((folder / "config.json").read_text(encoding="utf-8"))


def export(built: BuiltModel, out_dir: Path, labels: LabelMap, config: TrialConfig | None = None) -> Path:
    """Write the final model as a folder `from_pretrained` loads, replacing `out_dir` atomically."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex}"
    try:
        written = Path(export_model(built, tmp, labels.id2label))
        _write_json(tmp / "labels.json", list(labels.names))
        if config is not None:
            (tmp / "trial_config.json").write_text(config.model_dump_json(indent=2), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / written.relative_to(tmp) if written.is_relative_to(tmp) else out_dir


# ---------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    def refuse(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return value.item()
        raise TypeError(f"cannot store {type(value).__name__} in {path.name}")

    path.write_text(json.dumps(obj, default=refuse), encoding="utf-8")


def _prune_old(folder: Path, keep: int) -> None:
    found = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(_STEP_PREFIX))
    for old in found[: max(0, len(found) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def _save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    save_file(tensors, str(path), metadata=meta)


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for key, value in json.loads(meta.get("scalars", "{}")).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = json.loads(meta["param_groups"])
    for g in groups:  # JSON turned tuples such as betas into lists
        for k, v in g.items():
            if k != "params" and isinstance(v, list):
                g[k] = tuple(v)
    # load_state_dict moves each state tensor to its parameter's device (and dtype, except `step`).
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _save_rng(path: Path) -> None:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    meta = {
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]),
    }
    save_file(tensors, str(path), metadata=meta)


def _load_rng(path: Path) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
