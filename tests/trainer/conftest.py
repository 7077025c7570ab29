"""Shared fixtures for trainer tests: a tiny saved BERT classifier and tiny datasets.

Everything is built locally with `save_pretrained`, so the real `from_pretrained`
loading code runs and nothing is fetched from a model hub.
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Before transformers is imported anywhere: never reach for a model hub in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

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


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that `AutoModelForSequenceClassification.from_pretrained` and `AutoTokenizer` load:
    2-layer BERT, hidden 32, 4 heads, a 41-word WordPiece vocab. Read-only: copy it to modify."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def separable_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 rows, columns text,label with string labels pos/neg that a tiny model learns in seconds."""
    return write_csv(tmp_path_factory.mktemp("data") / "separable.csv", separable_rows(200, seed=1))


@pytest.fixture(scope="session")
def separable_rows_factory() -> Callable[..., list[Row]]:
    """`separable_rows(n, seed=..., classes=2|3, int_labels=...)` for tests writing other formats."""
    return separable_rows


@pytest.fixture
def make_config(tiny_bert_dir: Path, separable_csv: Path) -> Callable[..., Any]:
    """Build a TrialConfig for the tiny model; keyword sections override defaults.

    `make_config(train=path, validation=None, hparams={...}, run={...}, data={...}, dataset={...})`
    """
    from trainer.config import TrialConfig

    def make(
        *,
        train: Path | None = None,
        validation: Path | None = None,
        hparams: dict[str, Any] | None = None,
        run: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        dataset: dict[str, Any] | None = None,
        model: dict[str, Any] | None = None,
    ) -> TrialConfig:
        ds: dict[str, Any] = {"kind": "files", "train": str(train or separable_csv)}
        if validation is not None:
            ds["validation"] = str(validation)
        ds.update(dataset or {})
        hp: dict[str, Any] = {"batch_size": 16, "epochs": 1, "max_seq_len": 32, "learning_rate": 1e-3}
        hp.update(hparams or {})
        return TrialConfig.model_validate(
            {
                "model": model or {"kind": "pretrained", "path": str(tiny_bert_dir)},
                "dataset": ds,
                "data": data or {},
                "hparams": hp,
                "run": run or {},
            }
        )

    return make


@pytest.fixture
def make_runtime(tmp_path: Path) -> Callable[..., Any]:
    """`make_runtime(**overrides)`: a Runtime with work and cache dirs under this test's tmp_path."""
    from trainer.runtime import Runtime

    def make(**overrides: Any) -> Runtime:
        kwargs: dict[str, Any] = {"work_dir": tmp_path / "work", "cache_dir": tmp_path / "cache", "device": "cpu"}
        kwargs.update(overrides)
        return Runtime(**kwargs)

    return make
