"""build_model / export_model / load_tokenizer / model_depth_and_heads through TrialConfig."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from trainer.config import BuiltinModel, NamedModel, PretrainedModel
from trainer.modeling import surgery
from trainer.modeling.build import (
    build_model,
    export_model,
    load_tokenizer,
    model_depth_and_heads,
    tokenizer_dir,
    tokenizer_fingerprint,
)
from trainer.outcome import ConfigError
from trainer.registry import model_path

LABELS = {0: "neg", 1: "neu", 2: "pos"}
MakeConfig = Callable[..., Any]


def pretrained(folder: Path) -> dict[str, str]:
    return {"kind": "pretrained", "path": str(folder)}


def encode(tokenizer: Any) -> dict[str, torch.Tensor]:
    return dict(tokenizer(["the cat sat on the mat", "a big red dog"], padding=True, return_tensors="pt"))


def test_knobs_applied_in_order(bert4_dir: Path, trial_config: MakeConfig) -> None:
    config = trial_config(pretrained(bert4_dir), num_layers=3, num_heads=2, dropout=0.2, unfreeze_depth=1)
    built = build_model(config, 3, LABELS)
    model = built.model
    assert built.num_layers == 3 and len(model.bert.encoder.layer) == 3
    assert surgery.attention_heads(model) == [2, 2, 2]
    assert all(m.p == 0.2 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("classifier.", "bert.pooler.", "bert.encoder.layer.2.")) for n in trainable)
    assert built.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.config.id2label == LABELS and model.config.label2id["pos"] == 2
    assert model.eval()(**encode(built.tokenizer)).logits.shape == (2, 3)


def test_export_of_pruned_model_loads_with_same_logits(
    bert4_dir: Path, trial_config: MakeConfig, tmp_path: Path
) -> None:
    built = build_model(trial_config(pretrained(bert4_dir), num_layers=2, num_heads=3), 3, LABELS)
    built.model.eval()
    batch = encode(built.tokenizer)
    expected = built.model(**batch).logits
    out = export_model(built, tmp_path / "export", LABELS)
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == 2 and loaded.config.id2label == LABELS
    torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=1e-6)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == built.tokenizer.get_vocab()
    assert surgery.attention_heads(built.model) == [3, 3]  # the live model is left pruned


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"num_layers": 6}, r"num_layers \(6\).*4 encoder layers"),
        ({"num_heads": 8}, r"num_heads \(8\).*4 attention heads"),
        ({"unfreeze_depth": 5}, r"unfreeze_depth \(5\).*4 encoder layers"),
    ],
)
def test_config_errors_for_pretrained(
    bert4_dir: Path, trial_config: MakeConfig, hparams: dict[str, int], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(trial_config(pretrained(bert4_dir), **hparams), 3, LABELS)


def test_missing_model_folder_is_a_config_error(tmp_path: Path, trial_config: MakeConfig) -> None:
    with pytest.raises(ConfigError, match="model.path"):
        build_model(trial_config(pretrained(tmp_path / "nope")), 2, {0: "a", 1: "b"})


def test_initialisation_is_seeded_without_touching_caller_rng(bert4_dir: Path, trial_config: MakeConfig) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_model(trial_config(pretrained(bert4_dir), seed=7), 3, LABELS).model.classifier.weight
    assert torch.equal(torch.get_rng_state(), state)
    b = build_model(trial_config(pretrained(bert4_dir), seed=7), 3, LABELS).model.classifier.weight
    c = build_model(trial_config(pretrained(bert4_dir), seed=8), 3, LABELS).model.classifier.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_builtin_from_scratch_uses_the_tokenizer_vocab(tok_dir: Path, trial_config: MakeConfig) -> None:
    config = trial_config(
        {"kind": "builtin", "tokenizer": str(tok_dir)}, hidden_size=32, num_heads=2, num_layers=3, ffn_size=64
    )
    built = build_model(config, 3, LABELS)
    assert built.num_layers == 3
    assert built.model.config.vocab_size == len(built.tokenizer) == 30
    assert built.model.eval()(**encode(built.tokenizer)).logits.shape == (2, 3)


def test_builtin_heads_not_dividing_hidden(tok_dir: Path, trial_config: MakeConfig) -> None:
    config = trial_config({"kind": "builtin", "tokenizer": str(tok_dir)}, hidden_size=32, num_heads=3)
    with pytest.raises(ConfigError, match=r"hidden_size \(32\).*num_heads \(3\)"):
        build_model(config, 2, {0: "a", 1: "b"})


def test_builtin_tokenizer_resolution(tok_dir: Path, bert4_dir: Path, tmp_path: Path) -> None:
    minilm = model_path("all-minilm-l6-v2")
    assert tokenizer_dir(BuiltinModel(tokenizer=str(tok_dir))) == tok_dir
    assert tokenizer_dir(BuiltinModel(tokenizer="all-minilm-l6-v2")) == minilm
    assert tokenizer_dir(BuiltinModel(checkpoint=str(bert4_dir))) == bert4_dir
    assert tokenizer_dir(BuiltinModel()) == minilm
    with pytest.raises(ConfigError, match="model.tokenizer"):
        tokenizer_dir(BuiltinModel(tokenizer="no-such-model"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no tokenizer files"):
        tokenizer_dir(BuiltinModel(tokenizer=str(empty)))


def test_tokenizer_fingerprint_is_stable_and_discriminating(
    bert4_dir: Path, tok_dir: Path, trial_config: MakeConfig
) -> None:
    tok = load_tokenizer(trial_config(pretrained(bert4_dir)))
    first = tokenizer_fingerprint(tok)
    tok(["the cat sat on the mat"] * 2, truncation=True, max_length=4, padding="max_length")
    assert tokenizer_fingerprint(tok) == first  # calling it must not change the cache key
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tok_dir)) == first  # same vocab, same settings
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(model_path("all-minilm-l6-v2"))) != first
    tok.add_tokens(["zebra"])
    assert tokenizer_fingerprint(tok) != first


def test_model_depth_and_heads(bert4_dir: Path, tmp_path: Path) -> None:
    assert model_depth_and_heads(PretrainedModel(path=str(bert4_dir))) == (4, 4, 32)
    assert model_depth_and_heads(NamedModel(name="all-minilm-l6-v2")) == (6, 12, 384)
    assert model_depth_and_heads(BuiltinModel()) is None
    with pytest.raises(ConfigError, match="model.path"):
        model_depth_and_heads(PretrainedModel(path=str(tmp_path)))
    with pytest.raises(ConfigError, match="model.name"):
        model_depth_and_heads(NamedModel(name="nope"))


def test_model_depth_and_heads_does_not_import_torch(bert4_dir: Path) -> None:
    code = (
        "import sys\n"
        "from trainer.config import PretrainedModel\n"
        "from trainer.modeling.build import model_depth_and_heads\n"
        f"assert model_depth_and_heads(PretrainedModel(path={str(bert4_dir)!r})) == (4, 4, 32)\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path.cwd(), timeout=60)
    assert result.returncode == 0, result.stderr


def test_real_minilm_truncated_and_pruned(trial_config: MakeConfig) -> None:
    config = trial_config({"kind": "named", "name": "all-minilm-l6-v2"}, num_layers=3, num_heads=6, unfreeze_depth=2)
    built = build_model(config, 3, LABELS)
    assert built.num_layers == 3
    assert surgery.attention_heads(built.model) == [6, 6, 6]
    attn = built.model.bert.encoder.layer[0].attention.self
    assert attn.query.weight.shape == (6 * 32, 384)
    batch = dict(built.tokenizer(["what a lovely day", "meh"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        logits = built.model.eval()(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
