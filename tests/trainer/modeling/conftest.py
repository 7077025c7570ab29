"""Fixtures for model-building tests: a saved 4-layer tiny BERT and a tiny corpus.

Kept separate from tests/trainer/conftest.py's `tiny_bert_dir` (2 layers) because truncation
and unfreezing tests need more depth to tell "the first N" and "the top k" apart.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

WORDS = [
    "the", "a", "cat", "dog", "sat", "ran", "on", "mat", "log", "big", "small", "red", "blue",
    "good", "bad", "film", "is", "was", "very", "and", "of", "it", "this", "happy", "sad",
]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


def write_tokenizer(folder: Path) -> Path:
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab=str(vocab_file)).save_pretrained(folder)
    return folder


def write_bert(folder: Path, *, num_layers: int = 4, num_labels: int = 2, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    write_tokenizer(folder)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models on 2 cores shared with other test runs: a second intra-op thread mostly waits
    for a busy core (runs measured 2-10x slower), so run single-threaded and restore after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="session")
def bert4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Saved 4-layer BertForSequenceClassification (hidden 32, 4 heads, 2 labels) + tokenizer. Read-only."""
    return write_bert(tmp_path_factory.mktemp("bert4"))


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 30-token WordPiece tokenizer (no model)."""
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def trial_config(tmp_path: Path) -> Callable[..., Any]:
    """`trial_config(model={...}, **hparams)` -> TrialConfig; the dataset path is never read here."""
    from trainer.config import TrialConfig

    def make(model: dict[str, Any], seed: int = 0, **hparams: Any) -> TrialConfig:
        return TrialConfig.model_validate(
            {
                "model": model,
                "dataset": {"kind": "files", "train": str(tmp_path / "unused.csv")},
                "hparams": hparams,
                "run": {"seed": seed},
            }
        )

    return make

