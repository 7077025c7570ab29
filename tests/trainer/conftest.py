"""Shared fixtures for trainer tests: a tiny saved BERT classifier and tiny datasets.

Everything is built locally with `save_pretrained`, so the real `from_pretrained`
loading code runs and nothing is fetched from a model hub.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Before transformers is imported anywhere: never reach for a model hub in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a CPU shared with other test runs
# the threads' barrier waits make every step several times slower. Tests that want more
# threads (the real-MiniLM one) set them themselves.
torch.set_num_threads(1)
from trainer_test_helpers import Row, build_tiny_bert, separable_rows, write_csv  # noqa: E402


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
        if ds.get("kind") == "named":
            ds = {k: v for k, v in ds.items() if k in ("kind", "name")}
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
