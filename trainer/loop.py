"""The training loop of one trial: `train(config, runtime, report) -> TrialResult`.

Read it top to bottom: data, model, optimizer, schedule, resume, then the loop of
optimizer steps with evaluation, reporting, checkpoints and stop requests, then
the final evaluation and export. Helpers are defined just before their first use.

Host-device syncs are few and on purpose. On CUDA the loop never calls `.item()`
per step: losses and the non-finite flag stay on the device and are read at an
evaluation, a checkpoint, or every `_SYNC_EVERY` steps. Each sync is marked.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from trainer.checkpoint import TrainState, export, load_checkpoint, read_config, save_checkpoint
from trainer.config import TrialConfig
from trainer.data import PreparedData, TokenizedSplit, epoch_order, eval_batches, prepare_data
from trainer.modeling.build import build_model, load_tokenizer, tokenizer_fingerprint
from trainer.optim import build_optimizer, build_scheduler
from trainer.outcome import ConfigError, NonFiniteLoss, TrialPruned, TrialResult, TrialStopped
from trainer.runtime import Metrics, ReportFn, Runtime

log = logging.getLogger(__name__)

_SYNC_EVERY = 50
"""On CUDA, read the device-side non-finite flag this often (one sync) besides at evaluations."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but CUDA is not available here")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type != "cuda":
        return batch
    # Pinned host memory lets the copy run asynchronously, overlapping the previous step's kernels.
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


_fingerprints: dict[tuple[object, ...], str] = {}


def cached_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """`tokenizer_fingerprint`, remembered per tokenizer folder and file versions.

    Hashing serialises the whole vocabulary (~0.3 s for MiniLM); a warm process pays it
    once per tokenizer, not once per trial.
    """
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if not folder.is_dir():
        return tokenizer_fingerprint(tokenizer)
    files = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))
    key = (str(folder.resolve()), type(tokenizer).__name__, files)
    if key not in _fingerprints:
        _fingerprints[key] = tokenizer_fingerprint(tokenizer)
    return _fingerprints[key]


def train(config: TrialConfig, runtime: Runtime, report: ReportFn) -> TrialResult:
    """Fine-tune one trial's model to the end of its budget and return its final metrics.

    Raises TrialPruned when `report` says so, TrialStopped (after a checkpoint) when
    `runtime.should_stop()` turns true, NonFiniteLoss when the loss diverges, and
    ConfigError before training when data, model or knobs cannot work together.
    """
    started = time.perf_counter()
    hp, run = config.hparams, config.run
    device = resolve_device(runtime.device)
    work_dir, cache_dir = Path(runtime.work_dir), Path(runtime.cache_dir)  # callers may pass str
    work_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(run.seed)
    if device.type == "cuda":
        # TF32 matmuls for whatever runs in fp32 (the loss, fp32 trials): ~free precision-wise for fine-tuning.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- data: tokenised once per machine, then read from the cache -----------------------------
    tokenizer = load_tokenizer(config)
    data: PreparedData = prepare_data(
        config, tokenizer, cache_dir, tokenizer_key=cached_fingerprint(tokenizer)
    )
    num_labels = len(data.labels)
    log.info(
        "data: %d train / %d validation rows, %d classes, cache %s (%.2fs)",
        len(data.train), len(data.validation), num_labels,
        "hit" if data.info["cache_hit"] else "miss", time.perf_counter() - started,
    )

    # ---- model ----------------------------------------------------------------------------------
    built = build_model(config, num_labels, data.labels.id2label)
    model = built.model.to(device)
    model.train()
    longest = int(max(data.train.lengths.max(), data.validation.lengths.max()))
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_positions, int) and longest > max_positions:
        raise ConfigError(
            f"hparams.max_seq_len: rows of {longest} tokens exceed the model's {max_positions} positions; "
            f"set max_seq_len <= {max_positions}"
        )
    log.info(
        "model: %d layers, %d trainable parameters (%.2fs)",
        built.num_layers, built.trainable_params, time.perf_counter() - started,
    )

    # ---- optimisation plan: micro-batches of batch_size, grad_accum_steps per optimizer step ------
    n_train = len(data.train)
    micro_per_epoch = math.ceil(n_train / hp.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / hp.grad_accum_steps)
    total_steps = hp.epochs * steps_per_epoch
    if run.max_steps is not None:
        total_steps = min(total_steps, run.max_steps)
    optimizer = build_optimizer(model, hp, device)
    scheduler = build_scheduler(optimizer, hp, total_steps, steps_per_epoch)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]

    # ---- resume: model, optimizer, schedule, RNG and the position in the data order -------------
    state = TrainState()
    if runtime.resume_from is not None:
        resume_dir = Path(runtime.resume_from)
        _check_same_trial(config, resume_dir)
        state = load_checkpoint(resume_dir, model=model, optimizer=optimizer, scheduler=scheduler, labels=data.labels)
        log.info("resumed from %s at step %d (epoch %d)", runtime.resume_from, state.step, state.epoch)

    # ---- precision and compilation --------------------------------------------------------------
    use_bf16 = run.precision == "bf16" or (run.precision == "auto" and device.type == "cuda")
    if use_bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if run.precision == "bf16":
            raise ConfigError(f"run.precision: bf16 is not supported on {torch.cuda.get_device_name(device)}")
        use_bf16 = False  # pre-Ampere GPUs: fp32 rather than an emulated, slower bf16

    def autocast() -> contextlib.AbstractContextManager[None]:
        if use_bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # The compiled wrapper shares parameters with `model`; checkpoints and export use `model`.
    forward = torch.compile(model) if run.compile else model
    pad_multiple = 8 if device.type == "cuda" else 1  # tensor cores want multiples of 8

    def batches(split: TokenizedSplit, groups: list[np.ndarray]) -> Iterator[dict[str, torch.Tensor]]:
        for rows in groups:
            yield to_device(split.collate(rows, data.pad_id, pad_multiple), device)

    def logits_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with autocast():
            return forward(**inputs).logits.float()  # the loss and softmax in fp32 even under bf16

    # ---- evaluation: one host sync per evaluation ----------------------------------------------
    eval_groups = eval_batches(data.validation, hp.batch_size * 2)  # no activations kept: 2x fits

    @torch.no_grad()
    def evaluate() -> Metrics:
        model.eval()
        confusion = torch.zeros(num_labels * num_labels, dtype=torch.long, device=device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        for batch in batches(data.validation, eval_groups):
            logits = logits_of(batch)
            labels = batch["labels"]
            # Plain cross-entropy (no label smoothing), so losses compare across trials.
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            confusion += torch.bincount(labels * num_labels + logits.argmax(-1), minlength=num_labels**2)
        model.train()
        conf = confusion.view(num_labels, num_labels).cpu().double()  # sync: the evaluation's one read-back
        n = conf.sum().item()
        tp = conf.diag()
        fp, fn = conf.sum(0) - tp, conf.sum(1) - tp
        present = (tp + fp + fn) > 0  # classes in the labels or the predictions, as sklearn counts them
        f1 = (2 * tp / (2 * tp + fp + fn).clamp(min=1))[present]
        return {
            "loss": loss_sum.item() / n,
            "accuracy": tp.sum().item() / n,
            "f1_macro": f1.mean().item() if len(f1) else 0.0,
        }

    # ---- the loop -------------------------------------------------------------------------------
    # Running sums stay on the device; reading them is a sync, done only at evaluations.
    train_loss_sum = torch.tensor(state.train_loss_sum, dtype=torch.float32, device=device)  # (no float64 on MPS)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    checked_step = state.step

    def check_finite() -> None:
        nonlocal checked_step
        if bool(nonfinite):  # sync on CUDA: only at evaluations, checkpoints and every _SYNC_EVERY steps
            raise NonFiniteLoss(
                f"loss or gradient norm became NaN/inf between steps {checked_step} and {state.step}; "
                "lower the learning rate or enable clipping (max_grad_norm)",
                step=state.step,
            )
        checked_step = state.step

    def checkpoint() -> Path:
        check_finite()
        state.train_loss_sum = float(train_loss_sum)  # sync: checkpoints are rare
        state.elapsed_s = elapsed()
        folder = save_checkpoint(
            work_dir, model=model, optimizer=optimizer, scheduler=scheduler, state=state,
            config=config, labels=data.labels, tokenizer=built.tokenizer,
        )
        if runtime.on_checkpoint is not None:
            runtime.on_checkpoint(folder, state.step)
        return folder

    prior_elapsed = state.elapsed_s

    def elapsed() -> float:
        return prior_elapsed + time.perf_counter() - started

    def evaluate_and_report() -> Metrics:
        nonlocal train_loss_sum
        check_finite()
        metrics = evaluate()
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLoss(f"validation loss is {metrics['loss']} at step {state.step}", step=state.step)
        if state.train_loss_count:
            metrics["train_loss"] = float(train_loss_sum) / state.train_loss_count
        train_loss_sum = torch.zeros_like(train_loss_sum)
        state.train_loss_count = 0
        state.history.append((state.step, dict(metrics)))
        log.info("step %d/%d: %s", state.step, total_steps, _fmt(metrics))
        if report(state.step, dict(metrics)):
            raise TrialPruned(f"pruned at step {state.step}", step=state.step)
        return metrics

    last_eval_step = state.history[-1][0] if state.history else -1
    if state.step < total_steps:
        log.info("training %d steps (%d per epoch) on %s, first step at %.2fs",
                 total_steps, steps_per_epoch, device, time.perf_counter() - started)
    while state.step < total_steps:
        order = epoch_order(data.train, seed=run.seed, epoch=state.epoch, class_balanced=hp.class_balanced)
        micro = [order[i : i + hp.batch_size] for i in range(0, n_train, hp.batch_size)]
        epoch_done = False
        while not epoch_done and state.step < total_steps:
            group = micro[state.batch_in_epoch : state.batch_in_epoch + hp.grad_accum_steps]
            n_group = sum(len(rows) for rows in group)
            for batch in batches(data.train, group):
                labels = batch["labels"]
                loss = F.cross_entropy(logits_of(batch), labels, label_smoothing=hp.label_smoothing)
                # Weight by rows, so an accumulated step equals one big batch even when the last is short.
                (loss * (len(labels) / n_group)).backward()
                loss = loss.detach()
                nonfinite |= ~torch.isfinite(loss)
                train_loss_sum += loss * len(labels)
                state.train_loss_count += len(labels)
            if hp.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(trainable, hp.max_grad_norm)
                nonfinite |= ~torch.isfinite(norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            state.step += 1
            state.batch_in_epoch += len(group)
            if state.batch_in_epoch >= len(micro):
                state.epoch, state.batch_in_epoch, epoch_done = state.epoch + 1, 0, True
            if runtime.on_step is not None:
                runtime.on_step(state.step, total_steps)
            if device.type != "cuda" or state.step % _SYNC_EVERY == 0:
                check_finite()  # free on CPU; on CUDA a sync every _SYNC_EVERY steps

            due = state.step % run.eval_every_steps == 0 if run.eval_every_steps else epoch_done
            if due and state.step < total_steps:
                evaluate_and_report()
                last_eval_step = state.step
                if run.checkpoint_every_eval:
                    checkpoint()
            if state.step < total_steps and runtime.should_stop():
                folder = checkpoint()
                raise TrialStopped(f"stopped at step {state.step}; checkpoint {folder}", step=state.step)

    # ---- the end: final evaluation and export ---------------------------------------------------
    final_evaluated = state.history and last_eval_step == state.step
    metrics = dict(state.history[-1][1]) if final_evaluated else evaluate_and_report()
    exported = export(built, work_dir / "model", data.labels, config)
    # Resumable checkpoints are useless once the trial is complete, and large.
    shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)
    return TrialResult(
        metrics=metrics, step=state.step, history=list(state.history), checkpoint=exported, duration_s=elapsed()
    )


def _check_same_trial(config: TrialConfig, folder: Path) -> None:
    """A checkpoint continues only the trial it came from: same knobs, same seed."""
    try:
        saved = read_config(folder)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"resume_from: {folder} holds no readable config.json ({exc})") from None
    differ = [
        f"hparams.{name}" for name in type(config.hparams).model_fields
        if getattr(saved.hparams, name) != getattr(config.hparams, name)
    ]
    if saved.run.seed != config.run.seed:
        differ.append("run.seed")
    if differ:
        raise ConfigError(f"resume_from: the checkpoint belongs to another trial ({', '.join(differ[:5])} differ)")


def _fmt(metrics: Metrics) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
