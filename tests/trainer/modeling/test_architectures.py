"""The same knobs over every architecture surgery claims (BERT, RoBERTa, DistilBERT, built-in),
through build_model and export_model, and a clean refusal for one it does not (GPT-2)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from trainer.modeling import builtin, surgery
from trainer.modeling.build import build_model, export_model
from trainer.outcome import ConfigError

LABELS = {0: "neg", 1: "pos"}


def save_model(kind: str, folder: Path, tok_dir: Path) -> Path:
    """A 3-layer, hidden-32, 4-head sequence classifier of the given family, saved with the tiny tokenizer."""
    import transformers as tf

    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    common: dict[str, Any] = {"vocab_size": vocab, "num_labels": 2, "pad_token_id": 0}
    config: Any
    if kind == "bert":
        config = tf.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=64, **common)
    elif kind == "roberta":
        config = tf.RobertaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64, **common)
    elif kind == "distilbert":
        config = tf.DistilBertConfig(dim=32, n_layers=3, n_heads=4, hidden_dim=64, max_position_embeddings=64,
                                     **common)
    elif kind == "builtin":
        config = builtin.TuneForgeEncoderConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                intermediate_size=64, **common)
    else:
        config = tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, **common)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(folder)
    return folder


# Parameter-name prefixes that train at unfreeze_depth=1 with 3 layers: the top layer and the head.
TRAINABLE_AT_1 = {
    "bert": ("bert.encoder.layer.2.", "bert.pooler.", "classifier."),
    "roberta": ("roberta.encoder.layer.2.", "classifier."),
    "distilbert": ("distilbert.transformer.layer.2.", "pre_classifier.", "classifier."),
    "builtin": ("encoder.layers.2.", "encoder.final_norm.", "classifier."),
}


def model_ref(kind: str, folder: Path) -> dict[str, str]:
    if kind == "builtin":
        return {"kind": "builtin", "checkpoint": str(folder)}
    return {"kind": "pretrained", "path": str(folder)}


@pytest.mark.parametrize("kind", sorted(TRAINABLE_AT_1))
def test_knobs_and_export_per_architecture(
    kind: str, tok_dir: Path, tmp_path: Path, trial_config: Callable[..., Any]
) -> None:
    folder = save_model(kind, tmp_path / kind, tok_dir)
    hp = {"hidden_size": 32, "ffn_size": 64} if kind == "builtin" else {}
    frozen = build_model(trial_config(model_ref(kind, folder), unfreeze_depth=1, dropout=0.3, **hp), 2, LABELS)
    trainable = {n for n, p in frozen.model.named_parameters() if p.requires_grad}
    everything = {n for n, _ in frozen.model.named_parameters()}
    assert trainable == {n for n in everything if n.startswith(TRAINABLE_AT_1[kind])}
    assert all(m.p == 0.3 for m in frozen.model.modules() if isinstance(m, torch.nn.Dropout))

    built = build_model(trial_config(model_ref(kind, folder), num_layers=2, num_heads=2, **hp), 2, LABELS)
    assert built.num_layers == 2 and surgery.attention_heads(built.model) == [2, 2]
    batch = dict(built.tokenizer(["the cat sat on the mat", "a dog"], padding=True, return_tensors="pt"))
    if kind in ("distilbert", "roberta"):
        batch.pop("token_type_ids", None)  # their real tokenizers do not produce it
    expected = built.model.eval()(**batch).logits
    assert expected.shape == (2, 2)
    loaded = AutoModelForSequenceClassification.from_pretrained(export_model(built, tmp_path / "out", LABELS)).eval()
    torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=1e-6)


def test_unknown_architecture_trains_without_structural_knobs(
    tok_dir: Path, tmp_path: Path, trial_config: Callable[..., Any]
) -> None:
    folder = save_model("gpt2", tmp_path / "gpt2", tok_dir)
    built = build_model(trial_config(model_ref("gpt2", folder)), 2, LABELS)
    assert built.num_layers == 3
    assert built.trainable_params == sum(p.numel() for p in built.model.parameters())
    for knob, value in (("num_layers", 2), ("num_heads", 2), ("unfreeze_depth", 1)):
        with pytest.raises(ConfigError, match=rf"hparams\.{knob}: architecture 'gpt2' is not supported"):
            build_model(trial_config(model_ref("gpt2", folder), **{knob: value}), 2, LABELS)
