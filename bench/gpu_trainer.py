"""MiniLM through our loop on a GPU: samples/s and peak memory, eager and compiled bf16.

    python bench/gpu_trainer.py            # one GPU run, batch 16/32/64 x eager/compiled, < 5 minutes
    python bench/gpu_trainer.py --smoke    # tiny settings on CPU, to know the script works

Every row is a real trial through `trainer.loop.train` (data cache, dynamic padding,
fused AdamW, bf16 autocast, optional torch.compile), on texts long enough to fill
`--seq-len` tokens so the numbers compare with DESIGN.md's fixed-length table.
Timing runs from the end of step `--warmup` (after compilation) to the last step,
with a CUDA sync at both edges only. Writes a JSON copy to $OUT when it is set.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from trainer.config import TrialConfig  # noqa: E402
from trainer.data import read_table  # noqa: E402
from trainer.loop import resolve_device, train  # noqa: E402
from trainer.registry import dataset_path  # noqa: E402
from trainer.runtime import Runtime  # noqa: E402


def long_texts_csv(path: Path, rows: int, words: int, seed: int = 0) -> Path:
    """Rows of `words` words drawn from real tweets (so real vocabulary), labelled like their first tweet."""
    table = read_table(dataset_path("tweets-sentiment"), ["text", "sentiment"], "latin-1")
    tweets = [(t, s) for t, s in zip(table["text"], table["sentiment"], strict=True) if t and s]
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for _ in range(rows):
            text, label = rng.choice(tweets)
            pool = text.split()
            while len(pool) < words:
                pool += rng.choice(tweets)[0].split()
            writer.writerow([" ".join(pool[:words]), label])
    return path


def run_one(args: argparse.Namespace, work: Path, data: Path, batch: int, compiled: bool) -> dict[str, Any]:
    device = resolve_device(args.device)
    model = {"kind": "named", "name": args.model}
    if Path(args.model).is_dir():
        model = {"kind": "pretrained", "path": args.model}
    config = TrialConfig.model_validate(
        {
            "model": model,
            "dataset": {"kind": "files", "train": str(data)},
            "data": {"max_train_examples": args.steps * batch, "max_eval_examples": 64},
            "hparams": {"batch_size": batch, "epochs": 1, "max_seq_len": args.seq_len, "learning_rate": 5e-5},
            "run": {"max_steps": args.steps, "compile": compiled, "precision": "auto", "checkpoint_every_eval": False},
        }
    )
    marks: dict[int, float] = {}

    def on_step(step: int, total: int) -> None:
        if step in (args.warmup, args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()  # only at the window's edges
            marks[step] = time.perf_counter()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    runtime = Runtime(work_dir=work / f"b{batch}-{int(compiled)}", cache_dir=work / "cache", device=str(device),
                      on_step=on_step)
    train(config, runtime, lambda step, metrics: False)
    wall = time.perf_counter() - started
    rate = (args.steps - args.warmup) * batch / (marks[args.steps] - marks[args.warmup])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {
        "mode": ("bf16 compiled" if compiled else "bf16 eager") if device.type == "cuda" else
        ("fp32 compiled" if compiled else "fp32 eager"),
        "batch": batch, "samples_per_s": rate, "peak_gib": peak, "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all-minilm-l6-v2", help="registry name or model folder")
    parser.add_argument("--batch-sizes", default="16,32,64")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=15, help="steps before timing starts (compile happens here)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run: batch 4, 4 steps, seq 32, eager")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.device, args.batch_sizes, args.modes = "cpu", "4", "eager"
        args.steps, args.warmup, args.seq_len = 4, 1, 32
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    batches = [int(b) for b in args.batch_sizes.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = long_texts_csv(work / "long.csv", rows=args.steps * max(batches) + 200, words=args.seq_len)
        for mode in modes:
            for batch in batches:
                row = run_one(args, work, data, batch, compiled=mode == "compiled")
                results.append(row)
                print(f"{row['mode']:>14} batch {batch:>3}: {row['samples_per_s']:8.1f} samples/s, "
                      f"peak {row['peak_gib']:.2f} GiB, {row['wall_s']:.1f}s", flush=True)

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print(f"\n{args.model} on {name}, seq {args.seq_len} (filled), {args.steps} steps "
          f"({args.steps - args.warmup} timed), total {time.perf_counter() - t0:.0f}s")
    print("| mode | batch | samples/s | peak GiB |\n| --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['mode']} | {r['batch']} | {r['samples_per_s']:.0f} | {r['peak_gib']:.2f} |")
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_trainer.json").write_text(json.dumps({"device": name, "results": results}, indent=2))


if __name__ == "__main__":
    main()
