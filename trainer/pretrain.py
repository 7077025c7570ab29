"""Masked-language-model pretraining of the built-in encoder on a plain text file.

One text per line. BERT's recipe: 15% of the real tokens are chosen; of those 80% become
[MASK], 10% a random token, 10% stay as they are; the loss is on the chosen tokens only.
The output folder (safetensors weights, config, tokenizer, a loss log) is what
`BuiltinModel(checkpoint=...)` fine-tunes from: the encoder loads, the classifier starts fresh.

Pretraining always uses AdamW (the optimizer knob is for fine-tuning searches; MLM from scratch
with SGD is rarely what anyone wants) with the knobs' learning rate, betas, eps and weight decay.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from trainer.knobs import Hyperparams
from trainer.outcome import ConfigError

MASK_PROB = 0.15
LOG_FILE = "pretrain_log.json"


def read_lines(text_path: Path) -> list[str]:
    try:
        with Path(text_path).open(encoding="utf-8") as f:
            texts = [line.strip() for line in f]
    except OSError as exc:
        raise ConfigError(f"text file {str(text_path)!r} cannot be read: {exc}") from None
    texts = [t for t in texts if t]
    if not texts:
        raise ConfigError(f"text file {str(text_path)!r} holds no non-empty lines")
    return texts


def mask_tokens(
    input_ids: torch.Tensor,
    special: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
    mask_prob: float = MASK_PROB,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for one batch; `special` marks padding and special tokens, never chosen.

    Every row with a real token gets at least one chosen token: short lines at 15% would often
    get none, and a batch of such rows would have no loss at all.
    """
    candidates = ~special
    noise = torch.rand(input_ids.shape, generator=generator)
    chosen = (noise < mask_prob) & candidates
    empty = ~chosen.any(dim=1) & candidates.any(dim=1)
    if empty.any():
        pick = torch.where(candidates, torch.rand(input_ids.shape, generator=generator), -1.0).argmax(dim=1)
        chosen[empty, pick[empty]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(input_ids.shape, generator=generator)
    inputs = input_ids.clone()
    inputs[chosen & (action < 0.8)] = mask_token_id
    swap = chosen & (action >= 0.8) & (action < 0.9)
    inputs[swap] = torch.randint(vocab_size, input_ids.shape, generator=generator)[swap]
    return inputs, labels


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence of the batch, not to max_seq_len: short lines stay cheap."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pretrain_mlm(
    text_path: Path,
    out_dir: Path,
    *,
    hparams: Hyperparams,
    tokenizer: str | None,
    seed: int,
    max_steps: int | None,
    on_step: Callable[[int, int], None] | None,
) -> Path:
    """Pretrain a built-in encoder with MLM and write it to `out_dir`; returns `out_dir`.

    Sizes come from the knobs (num_layers, num_heads, hidden_size, ffn_size, dropout), the
    length cap from max_seq_len, the budget from epochs and batch_size capped by `max_steps`.
    `tokenizer`: a tokenizer folder or a registry model name; None uses the packaged MiniLM one.
    `on_step(step, total_steps)` is called after every optimizer step.
    """
    from transformers import get_scheduler

    from trainer.modeling import builtin
    from trainer.modeling.build import builtin_tokenizer_dir, tokenizer_from

    texts = read_lines(text_path)
    tok = tokenizer_from(builtin_tokenizer_dir(tokenizer))
    if tok.mask_token_id is None or tok.pad_token_id is None:
        raise ConfigError("tokenizer: MLM pretraining needs a tokenizer with a mask token and a pad token")
    encoded: list[list[int]] = tok(texts, truncation=True, max_length=hparams.max_seq_len)["input_ids"]
    special_ids = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
    # A line of only special/unknown tokens has nothing to predict; dropping it up front means
    # every batch has at least one masked token (see mask_tokens), so every step has a loss.
    encoded = [s for s in encoded if not torch.isin(torch.tensor(s, dtype=torch.long), special_ids).all()]
    if not encoded:
        raise ConfigError(f"text file {str(text_path)!r}: no line has a token the tokenizer knows")

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)  # data order and masking, independent of the device
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = builtin.config_from_hparams(hparams, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    model = builtin.TuneForgeEncoderForMaskedLM(config)
    model.to(device)  # type: ignore[arg-type]  # transformers types its .to wrapper wrongly
    model.train()

    steps_per_epoch = math.ceil(len(encoded) / hparams.batch_size)
    total = steps_per_epoch * hparams.epochs
    if max_steps is not None:
        total = min(total, max_steps)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=hparams.learning_rate,
        betas=(hparams.beta1, hparams.beta2),
        eps=hparams.eps,
        weight_decay=hparams.weight_decay,
    )
    warmup = int(hparams.warmup_ratio * total)
    schedule = hparams.scheduler if hparams.scheduler in ("linear", "cosine") else "constant_with_warmup"
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    losses: list[float] = []
    step = 0
    started = time.monotonic()
    while step < total:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order), hparams.batch_size):
            rows = [encoded[i] for i in order[start : start + hparams.batch_size]]
            ids, attention = pad_batch(rows, tok.pad_token_id)
            inputs, labels = mask_tokens(
                ids,
                torch.isin(ids, special_ids),
                mask_token_id=tok.mask_token_id,
                vocab_size=len(tok),
                generator=generator,
            )
            with autocast:
                out = model(
                    input_ids=inputs.to(device), attention_mask=attention.to(device), labels=labels.to(device)
                )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if hparams.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), hparams.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(out.loss.item())  # a GPU sync per step; negligible next to a backward pass here
            if on_step is not None:
                on_step(step, total)
            if step >= total:
                break

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    log = {
        "steps": step,
        "seed": seed,
        "texts": len(encoded),
        "duration_s": round(time.monotonic() - started, 3),
        "losses": [round(x, 5) for x in losses],
        "hparams": hparams.model_dump(mode="json"),
    }
    (out_dir / LOG_FILE).write_text(json.dumps(log, indent=1), encoding="utf-8")
    return out_dir
