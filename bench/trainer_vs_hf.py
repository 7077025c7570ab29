"""Our training loop against transformers.Trainer: same model, data, batch size and steps.

    .venv/bin/python bench/trainer_vs_hf.py                     # MiniLM, tweets, CPU: ~2-3 minutes
    .venv/bin/python bench/trainer_vs_hf.py --steps 100 --batch-size 32 --seq-len 128   # on a GPU

Both sides train the model our `build_model` builds (so truncation and dropout are
identical) on the rows our data pipeline tokenised (HF gets them as lists and pads
with DataCollatorWithPadding, the same dynamic padding), in fp32 on CPU and bf16 on
CUDA. Throughput is timed between the end of step `--warmup` and the end of the last
step, so model loading, the first steps (allocator, compile) and the final evaluation
are outside the window. Prints samples/s for each and the ratio ours / HF.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from trainer.config import TrialConfig  # noqa: E402
from trainer.data import prepare_data  # noqa: E402
from trainer.loop import resolve_device, train  # noqa: E402
from trainer.modeling.build import build_model, load_tokenizer, tokenizer_fingerprint  # noqa: E402
from trainer.runtime import Runtime  # noqa: E402


def make_config(args: argparse.Namespace) -> TrialConfig:
    model: dict[str, Any] = {"kind": "named", "name": args.model}
    if Path(args.model).is_dir():
        model = {"kind": "pretrained", "path": args.model}
    return TrialConfig.model_validate(
        {
            "model": model,
            "dataset": {"kind": "named", "name": "tweets-sentiment"},
            "data": {"max_train_examples": args.steps * args.batch_size, "max_eval_examples": 64},
            "hparams": {
                "learning_rate": 5e-5, "batch_size": args.batch_size, "epochs": 1, "max_seq_len": args.seq_len,
                "num_layers": args.num_layers, "scheduler": "linear", "warmup_ratio": 0.0,
            },
            "run": {"seed": 0, "max_steps": args.steps, "checkpoint_every_eval": False},
        }
    )


class StepClock:
    """Timestamps of the end of each optimizer step; syncs CUDA only at the two window edges."""

    def __init__(self, device: torch.device, warmup: int, last: int) -> None:
        self.device, self.warmup, self.last = device, warmup, last
        self.t0 = self.t1 = self.c0 = self.c1 = 0.0

    def __call__(self, step: int) -> None:
        if step in (self.warmup, self.last):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            if step == self.warmup:
                self.t0, self.c0 = time.perf_counter(), time.process_time()
            else:
                self.t1, self.c1 = time.perf_counter(), time.process_time()

    def rates(self, batch_size: int) -> tuple[float, float]:
        """(samples per wall second, samples per CPU second of this process).

        On a CPU shared with other work, wall time also counts their work; CPU time
        counts ours, so the second figure is the fairer comparison there."""
        samples = (self.last - self.warmup) * batch_size
        return samples / (self.t1 - self.t0), samples / max(self.c1 - self.c0, 1e-9)


def run_ours(config: TrialConfig, device: torch.device, work: Path, warmup: int) -> tuple[float, float]:
    clock = StepClock(device, warmup, config.run.max_steps or 0)
    runtime = Runtime(
        work_dir=work / "ours", cache_dir=work / "cache", device=str(device), on_step=lambda s, t: clock(s)
    )
    train(config, runtime, lambda step, metrics: False)
    return clock.rates(config.hparams.batch_size)


def run_hf(config: TrialConfig, device: torch.device, work: Path, warmup: int) -> tuple[float, float]:
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    tokenizer = load_tokenizer(config)
    data = prepare_data(config, tokenizer, work / "cache", tokenizer_key=tokenizer_fingerprint(tokenizer))
    split = data.train
    rows = [
        {"input_ids": split.ids[s : s + n].tolist(), "labels": int(y)}
        for s, n, y in zip(split.starts, split.lengths, split.labels, strict=True)
    ]
    built = build_model(config, len(data.labels), data.labels.id2label)
    clock = StepClock(device, warmup, config.run.max_steps or 0)

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock(state.global_step)

    hp = config.hparams
    targs = TrainingArguments(
        output_dir=str(work / "hf"),
        per_device_train_batch_size=hp.batch_size,
        max_steps=config.run.max_steps or 1,
        learning_rate=hp.learning_rate,
        weight_decay=hp.weight_decay,
        lr_scheduler_type="linear",
        max_grad_norm=hp.max_grad_norm,
        bf16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=config.run.seed,
    )
    trainer = Trainer(
        model=built.model, args=targs, train_dataset=rows, data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[Clock()],
    )
    trainer.train()
    return clock.rates(hp.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all-minilm-l6-v2", help="registry name or model folder")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the timing window")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    device = resolve_device(args.device)
    config = make_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # Warm the tokenisation cache and the weight files' page cache, outside both measurements.
        tokenizer = load_tokenizer(config)
        prepare_data(config, tokenizer, work / "cache", tokenizer_key=tokenizer_fingerprint(tokenizer))
        # Alternate the order, so neither side always runs on a cooler (or busier) machine.
        ours1 = run_ours(config, device, work, args.warmup)
        hf = run_hf(config, device, work, args.warmup)
        ours2 = run_ours(config, device, work, args.warmup)
    ours = ((ours1[0] + ours2[0]) / 2, (ours1[1] + ours2[1]) / 2)
    print(f"\nmodel {args.model}, device {device}, batch {args.batch_size}, seq <= {args.seq_len}, "
          f"{args.steps} steps ({args.steps - args.warmup} timed), threads {torch.get_num_threads()}")
    print("| loop | samples/s (wall) | samples per CPU-s |\n| --- | --- | --- |")
    print(f"| ours (run 1 / run 2) | {ours1[0]:.1f} / {ours2[0]:.1f} | {ours1[1]:.1f} / {ours2[1]:.1f} |")
    print(f"| transformers.Trainer | {hf[0]:.1f} | {hf[1]:.1f} |")
    print(f"| ratio ours / HF | {ours[0] / hf[0]:.2f}x | {ours[1] / hf[1]:.2f}x |")


if __name__ == "__main__":
    main()
