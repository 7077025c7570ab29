"""Time from a warm process receiving a trial config to the end of its first training step.

    .venv/bin/python bench/first_step.py                 # MiniLM on tweets, CPU; target < 2 s

A warm slot process has torch and transformers imported and has run a trial before,
so the tokenised dataset is in the cache and the weight files are in the page cache.
This script gets there with one warm-up trial, then starts `--trials` new trials
(different seed and learning rate each, as a study would) and stops each right after
its first optimizer step. Phases come from the loop's own log lines.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from trainer.config import TrialConfig  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.runtime import Runtime  # noqa: E402

PHASES = {"data:": "data ready", "model:": "model built", "training": "loop starts"}
"""The loop's log lines that mark each phase; 'loop starts' is just before the first step runs."""


class FirstStep(Exception):
    """Raised from on_step to end a trial after its first step."""


class PhaseClock(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.marks: dict[str, tuple[float, float]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        for prefix, name in PHASES.items():
            if record.getMessage().startswith(prefix):
                self.marks[name] = (time.perf_counter(), time.process_time())


def config_for(args: argparse.Namespace, seed: int, lr: float) -> TrialConfig:
    model = {"kind": "named", "name": args.model}
    if Path(args.model).is_dir():
        model = {"kind": "pretrained", "path": args.model}
    return TrialConfig.model_validate(
        {
            "model": model,
            "dataset": {"kind": "named", "name": "tweets-sentiment"},
            "data": {"max_train_examples": args.train_examples, "max_eval_examples": 500},
            "hparams": {"learning_rate": lr, "batch_size": args.batch_size, "max_seq_len": args.seq_len},
            "run": {"seed": seed},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all-minilm-l6-v2", help="registry name or model folder")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--train-examples", type=int, default=5000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    clock = PhaseClock()
    loop_log = logging.getLogger("trainer.loop")
    loop_log.setLevel(logging.INFO)
    loop_log.addHandler(clock)

    def stop_after_first(step: int, total: int) -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()  # the step is done when the GPU is, not when it was queued
        raise FirstStep

    rows: list[dict[str, tuple[float, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for i in range(args.trials + 1):
            config = config_for(args, seed=i, lr=5e-5 * (1 + i))
            runtime = Runtime(work_dir=work / f"t{i}", cache_dir=work / "cache", device=args.device,
                              on_step=stop_after_first)
            clock.marks.clear()
            t0, c0 = time.perf_counter(), time.process_time()
            with contextlib.suppress(FirstStep):
                train(config, runtime, lambda step, metrics: False)
            done = (time.perf_counter(), time.process_time())
            if i == 0:
                print(f"warm-up trial (tokenises, fills the page cache): {done[0] - t0:.2f}s")
                continue
            marks = {**clock.marks, "first step done": done}
            rows.append({name: (wall - t0, cpu - c0) for name, (wall, cpu) in marks.items()})

    names = [*PHASES.values(), "first step done"]
    print(f"\nmodel {args.model}, device {args.device}, batch {args.batch_size}, seq <= {args.seq_len}, "
          f"threads {torch.get_num_threads()}; seconds since the config arrived, {len(rows)} trials")
    # CPU seconds of this process next to wall seconds: on a shared machine wall time also
    # counts other processes' work; with one thread, CPU time is the wall time of a quiet one.
    print("| phase | median wall s | max wall s | median CPU s |\n| --- | --- | --- | --- |")
    for name in names:
        walls = [r[name][0] for r in rows if name in r]
        cpus = [r[name][1] for r in rows if name in r]
        print(f"| {name} | {statistics.median(walls):.2f} | {max(walls):.2f} | {statistics.median(cpus):.2f} |")
    start = statistics.median(r["loop starts"][0] for r in rows)
    done = statistics.median(r["first step done"][0] for r in rows)
    print(f"\ntarget < 2 s from config to the first step (model load, warm cache): "
          f"{'meets' if start < 2.0 else 'misses'} ({start:.2f}s wall; the step itself ends at {done:.2f}s)")


if __name__ == "__main__":
    main()
