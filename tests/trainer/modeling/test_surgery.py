"""Surgery on a saved tiny BERT: each knob changes what it should and nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from trainer.modeling import surgery
from trainer.outcome import ConfigError


def load(folder: Path) -> Any:
    return AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()


def inputs(folder: Path) -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(folder)
    return dict(tok(["the cat sat on the mat", "a dog ran"], padding=True, return_tensors="pt"))


def test_truncate_keeps_first_layers(bert4_dir: Path) -> None:
    original = load(bert4_dir)
    model = load(bert4_dir)
    surgery.truncate_layers(model, 2)
    assert len(model.bert.encoder.layer) == 2
    assert model.config.num_hidden_layers == 2
    for kept, orig in zip(model.bert.encoder.layer, original.bert.encoder.layer[:2], strict=True):
        for (name, p), q in zip(kept.named_parameters(), orig.parameters(), strict=True):
            assert torch.equal(p, q), name
    assert model(**inputs(bert4_dir)).logits.shape == (2, 2)


def test_truncate_above_depth_names_both_numbers(bert4_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"num_layers \(5\).*4 encoder layers"):
        surgery.truncate_layers(load(bert4_dir), 5)


def test_prune_heads_shapes_and_forward(bert4_dir: Path) -> None:
    model = load(bert4_dir)
    kept = surgery.prune_heads(model, 2)
    assert all(len(v) == 2 for v in kept.values()) and len(kept) == 4
    for layer in model.bert.encoder.layer:
        attn = layer.attention.self
        assert attn.num_attention_heads == 2 and attn.all_head_size == 16
        assert attn.query.weight.shape == attn.key.weight.shape == attn.value.weight.shape == (16, 32)
        assert attn.query.bias.shape == (16,)
        assert layer.attention.output.dense.weight.shape == (32, 16)
    x = torch.randn(2, 5, 32)
    out = model.bert.encoder.layer[0].attention(x)[0]
    assert out.shape == (2, 5, 32)
    assert model(**inputs(bert4_dir)).logits.shape == (2, 2)
    assert model.config.num_attention_heads == 4  # kept for export's re-expansion


def test_prune_keeps_the_most_important_heads(bert4_dir: Path) -> None:
    model = load(bert4_dir)
    layer = model.bert.encoder.layer[0].attention
    d = 8
    with torch.no_grad():
        # Head 3 writes the most (big value rows), head 1 next, heads 0 and 2 nothing (zero output cols).
        layer.self.value.weight[3 * d : 4 * d] *= 10.0
        layer.self.value.weight[1 * d : 2 * d] *= 3.0
        layer.output.dense.weight[:, 0:d] = 0.0
        layer.output.dense.weight[:, 2 * d : 3 * d] = 0.0
        expected_q = layer.self.query.weight[torch.cat([torch.arange(d, 2 * d), torch.arange(3 * d, 4 * d)])].clone()
    scores = surgery.head_importance(model)[0]
    assert scores[3] > scores[1] > max(scores[0], scores[2])
    kept = surgery.prune_heads(model, 2)
    assert kept[0] == [1, 3]
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, expected_q)


def test_prune_is_deterministic(bert4_dir: Path) -> None:
    assert surgery.prune_heads(load(bert4_dir), 3) == surgery.prune_heads(load(bert4_dir), 3)


def test_prune_above_heads_raises(bert4_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"num_heads \(5\).*4 attention heads"):
        surgery.prune_heads(load(bert4_dir), 5)


def test_restore_pruned_heads_gives_identical_logits(bert4_dir: Path) -> None:
    model = load(bert4_dir)
    surgery.prune_heads(model, 1)
    batch = inputs(bert4_dir)
    before = model(**batch).logits
    assert surgery.restore_pruned_heads(model)
    assert surgery.attention_heads(model) == [4, 4, 4, 4]
    assert model.bert.encoder.layer[0].attention.self.query.weight.shape == (32, 32)
    torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=1e-6)


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("depth", [0, 1, 3, "all"])
def test_freeze_sets_requires_grad_exactly(bert4_dir: Path, depth: int | str) -> None:
    model = load(bert4_dir)
    count = surgery.freeze(model, depth)  # type: ignore[arg-type]
    names = {n for n, _ in model.named_parameters()}
    head = {n for n in names if n.startswith(("classifier.", "bert.pooler."))}
    if depth == "all":
        expected = names
    else:
        layers = {n for n in names for i in range(4 - depth, 4) if n.startswith(f"bert.encoder.layer.{i}.")}
        expected = head | layers
    assert trainable_names(model) == expected
    assert count == sum(p.numel() for n, p in model.named_parameters() if n in expected)


def test_frozen_weights_do_not_move_after_a_step(bert4_dir: Path) -> None:
    model = load(bert4_dir).train()
    surgery.freeze(model, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = nn.functional.cross_entropy(model(**inputs(bert4_dir)).logits, torch.tensor([0, 1]))
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), n  # AdamW's decay moves even a zero-gradient weight
        else:
            assert p.grad is None and torch.equal(p, before[n]), n
    assert not torch.equal(model.classifier.weight, before["classifier.weight"])
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, before["bert.embeddings.word_embeddings.weight"])


def test_freeze_above_layers_raises(bert4_dir: Path) -> None:
    model = load(bert4_dir)
    surgery.truncate_layers(model, 2)
    with pytest.raises(ConfigError, match=r"unfreeze_depth \(3\).*2 encoder layers"):
        surgery.freeze(model, 3)


def test_dropout_applies_to_modules_and_config(bert4_dir: Path) -> None:
    model = load(bert4_dir)
    surgery.set_dropout(model, 0.37)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(m.p == 0.37 for m in drops)
    assert model.config.hidden_dropout_prob == 0.37
    assert model.config.attention_probs_dropout_prob == 0.37
    assert model.bert.encoder.layer[0].attention.self.dropout.p == 0.37  # what sdpa reads at forward time


def test_unsupported_architecture_names_the_knob() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    for fn, knob in ((lambda m: surgery.truncate_layers(m, 1), "num_layers"),
                     (lambda m: surgery.prune_heads(m, 1), "num_heads"),
                     (lambda m: surgery.freeze(m, 0), "unfreeze_depth")):
        with pytest.raises(ConfigError, match=rf"hparams\.{knob}: architecture .* not supported"):
            fn(Odd())
