"""The built-in encoder: shapes, padding invariance, sizes from knobs, export round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification

from trainer.knobs import Hyperparams
from trainer.modeling import builtin
from trainer.outcome import ConfigError

SMALL = {"hidden_size": 32, "num_heads": 4, "num_layers": 2, "ffn_size": 64, "dropout": 0.0}


def classifier(num_labels: int = 3, **hp: object) -> builtin.TuneForgeEncoderForSequenceClassification:
    torch.manual_seed(0)
    config = builtin.config_from_hparams(
        Hyperparams(**{**SMALL, **hp}), vocab_size=40, pad_token_id=0, num_labels=num_labels
    )
    return builtin.TuneForgeEncoderForSequenceClassification(config).eval()


def test_forward_shapes_and_sizes_from_knobs() -> None:
    model = classifier(num_labels=3, num_layers=3, ffn_size=48)
    ids = torch.randint(5, 40, (2, 7))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
    assert out.logits.shape == (2, 3)
    assert len(model.encoder.layers) == 3
    attn = model.encoder.layers[0].attention
    assert attn.num_heads == 4 and attn.head_dim == 8
    assert model.encoder.layers[0].ffn_in.out_features == 48
    loss = model(input_ids=ids, labels=torch.tensor([0, 2])).loss
    assert loss is not None and torch.isfinite(loss)


def test_appending_padding_does_not_change_logits() -> None:
    model = classifier()
    ids = torch.tensor([[2, 7, 8, 9, 3], [2, 10, 11, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    base = model(input_ids=ids, attention_mask=mask).logits
    padded_ids = torch.cat([ids, torch.zeros(2, 6, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 6, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(input_ids=padded_ids, attention_mask=padded_mask).logits, base)
    # Without the mask the padding would be attended to: the test would catch a mask that is ignored.
    assert not torch.allclose(model(input_ids=padded_ids).logits, base, atol=1e-4)


def test_heads_must_divide_hidden_size() -> None:
    with pytest.raises(ConfigError, match=r"hidden_size \(32\).*num_heads \(5\)"):
        classifier(num_heads=5)


def test_default_heads_divide_hidden_size() -> None:
    assert builtin.default_num_heads(256) == 4
    assert builtin.default_num_heads(200) == 2  # 200 // 64 = 3 does not divide 200; 2 does
    assert builtin.default_num_heads(32) == 1


def test_dropout_knob_reaches_every_dropout() -> None:
    model = classifier(dropout=0.25)
    drops = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and set(drops) == {0.25}


def test_export_round_trip_with_auto_classes(tmp_path: Path) -> None:
    model = classifier()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "tuneforge-encoder"
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, builtin.TuneForgeEncoderForSequenceClassification)
    ids = torch.randint(5, 40, (2, 6))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_masked_lm_shares_the_encoder_and_ties_embeddings(tmp_path: Path) -> None:
    config = builtin.config_from_hparams(Hyperparams(**SMALL), vocab_size=40, pad_token_id=0)
    mlm = builtin.TuneForgeEncoderForMaskedLM(config)
    assert mlm.lm_head.decoder.weight is mlm.encoder.embeddings.word_embeddings.weight
    ids = torch.randint(5, 40, (2, 6))
    out = mlm(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 6, 40) and out.loss is not None
    mlm.save_pretrained(tmp_path)
    again = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert again.lm_head.decoder.weight is again.encoder.embeddings.word_embeddings.weight
    cls = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    torch.testing.assert_close(cls.encoder.layers[1].ffn_out.weight, mlm.encoder.layers[1].ffn_out.weight)
