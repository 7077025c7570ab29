"""Helpers behind the trainer test fixtures, importable by name from any trainer test
(`from trainer_test_helpers import separable_rows`); `conftest` itself is not importable
reliably because several folders have one."""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

POSITIVE = ["good", "great", "fine", "nice", "happy", "love", "best", "fun"]
NEGATIVE = ["bad", "awful", "poor", "sad", "ugly", "hate", "worst", "dull"]
NEUTRAL = ["okay", "average", "plain", "normal", "usual", "medium"]
FILLER = ["the", "a", "movie", "film", "is", "was", "very", "this", "it", "really", "and", "plot", "of", "show"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_VOCAB: list[str] = SPECIAL + FILLER + POSITIVE + NEGATIVE + NEUTRAL

Row = dict[str, Any]


def separable_rows(n: int, *, seed: int = 0, classes: int = 2, int_labels: bool = False) -> list[Row]:
    """`n` short texts whose label is decided by which word list their sentiment words come from.

    Two classes: pos/neg; three: neg/neu/pos. Balanced round-robin, shuffled with `seed`.
    """
    names = ["neg", "pos"] if classes == 2 else ["neg", "neu", "pos"]
    words = {"neg": NEGATIVE, "pos": POSITIVE, "neu": NEUTRAL}
    rng = random.Random(seed)
    rows: list[Row] = []
    for i in range(n):
        k = i % len(names)
        toks = [rng.choice(FILLER) for _ in range(rng.randint(2, 7))]
        for _ in range(rng.randint(1, 2)):
            toks.insert(rng.randrange(len(toks) + 1), rng.choice(words[names[k]]))
        rows.append({"text": " ".join(toks), "label": k if int_labels else names[k]})
    rng.shuffle(rows)
    return rows


def write_csv(path: Path, rows: list[Row], *, encoding: str = "utf-8") -> Path:
    fields = list(rows[0]) if rows else ["text", "label"]
    with path.open("w", newline="", encoding=encoding) as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def build_tiny_bert(folder: Path, *, num_labels: int = 2, num_layers: int = 2, seed: int = 0) -> Path:
    """Save a tiny BertForSequenceClassification (hidden 32, 4 heads) and its WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab=str(vocab_file))
    config = BertConfig(
        vocab_size=len(TINY_VOCAB),
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
