"""Fixtures for tests/service. Spec fixtures (service.spec / service.optuna_bridge):

- `spec_data_root`: a data root holding `train.csv` and `tiny-bert/`, a model folder with
  only a config.json (4 layers, 4 heads, hidden 32): enough for every spec check.
- `minilm_spec_data`: a factory for a valid spec as plain data (named MiniLM + tweets,
  TPE, 10 trials); keyword arguments replace top-level fields.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

TINY_BERT_CONFIG = {"model_type": "bert", "num_hidden_layers": 4, "num_attention_heads": 4, "hidden_size": 32}

_MINILM_SPEC: dict[str, Any] = {
    "name": "minilm-tweets",
    "model": {"kind": "named", "name": "all-minilm-l6-v2"},
    "dataset": {"kind": "named", "name": "tweets-sentiment"},
    "objectives": [{"metric": "accuracy", "direction": "maximize"}],
    "search_space": {
        "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
        "batch_size": {"type": "categorical", "choices": [16, 32, 64]},
        "num_layers": {"type": "int", "low": 2, "high": 6},
        "unfreeze_depth": {"type": "int", "low": 0, "high": 6},
    },
    "sampler": {"name": "tpe", "seed": 7},
    "pruner": {"name": "asha"},
    "budget": {"n_trials": 10},
}


@pytest.fixture
def spec_data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "tiny-bert").mkdir(parents=True)
    (root / "tiny-bert" / "config.json").write_text(json.dumps(TINY_BERT_CONFIG), encoding="utf-8")
    (root / "train.csv").write_text("text,label\ngood,1\nbad,0\n", encoding="utf-8")
    return root


@pytest.fixture
def minilm_spec_data() -> Callable[..., dict[str, Any]]:
    def make(**fields: Any) -> dict[str, Any]:
        data = copy.deepcopy(_MINILM_SPEC)
        data.update(copy.deepcopy(fields))
        return data

    return make
