"""MLM pretraining of the built-in encoder, and fine-tuning from what it writes."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from trainer.knobs import Hyperparams
from trainer.modeling import builtin
from trainer.modeling.build import build_model
from trainer.outcome import ConfigError
from trainer.pretrain import LOG_FILE, mask_tokens, pretrain_mlm

HP = Hyperparams(
    hidden_size=32, num_heads=2, num_layers=2, ffn_size=64, dropout=0.0,
    learning_rate=5e-3, scheduler="constant", batch_size=8, epochs=100, max_seq_len=16,
)
STEPS = 100


def corpus(path: Path) -> Path:
    rng = random.Random(0)
    templates = ["the {a} cat sat on the mat", "a {a} dog ran on the log", "this film was very {b}"]
    lines = [t.format(a=rng.choice(["big", "small", "red", "blue"]), b=rng.choice(["good", "bad"]))
             for t in templates for _ in range(10)]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path) -> tuple[Path, list[tuple[int, int]]]:
    root = tmp_path_factory.mktemp("pretrain")
    calls: list[tuple[int, int]] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest's autouse fixture, which does not cover module fixtures
    try:
        out = pretrain_mlm(
            corpus(root / "corpus.txt"), root / "ckpt", hparams=HP, tokenizer=str(tok_dir), seed=0,
            max_steps=STEPS, on_step=lambda step, total: calls.append((step, total)),
        )
    finally:
        torch.set_num_threads(threads)
    return out, calls


def mlm_loss(model: Any, tok: Any, text_path: Path) -> float:
    texts = [t for t in text_path.read_text(encoding="utf-8").splitlines() if t]
    enc = tok(texts, padding=True, return_tensors="pt")
    special = torch.isin(enc["input_ids"], torch.tensor(tok.all_special_ids))
    inputs, labels = mask_tokens(
        enc["input_ids"], special, mask_token_id=tok.mask_token_id, vocab_size=len(tok),
        generator=torch.Generator().manual_seed(1),
    )
    with torch.no_grad():
        return float(model.eval()(input_ids=inputs, attention_mask=enc["attention_mask"], labels=labels).loss)


def test_pretraining_lowers_mlm_loss(pretrained_dir: tuple[Path, list[tuple[int, int]]]) -> None:
    out, calls = pretrained_dir
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert calls == [(i, STEPS) for i in range(1, STEPS + 1)]
    log = json.loads((out / LOG_FILE).read_text())
    losses = log["losses"]
    assert log["steps"] == STEPS == len(losses)
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:5]) / 5

    tok = AutoTokenizer.from_pretrained(out)
    trained = AutoModelForMaskedLM.from_pretrained(out)
    torch.manual_seed(0)
    fresh = builtin.TuneForgeEncoderForMaskedLM(trained.config)
    text = out.parent / "corpus.txt"
    assert mlm_loss(trained, tok, text) < 0.6 * mlm_loss(fresh, tok, text)


def test_finetuning_from_checkpoint_loads_the_encoder(
    pretrained_dir: tuple[Path, list[tuple[int, int]]], trial_config: Callable[..., Any]
) -> None:
    out, _ = pretrained_dir
    mlm = AutoModelForMaskedLM.from_pretrained(out)
    built = build_model(trial_config({"kind": "builtin", "checkpoint": str(out)}, **HP.model_dump()), 2,
                        {0: "a", 1: "b"})
    model = built.model
    assert isinstance(model, builtin.TuneForgeEncoderForSequenceClassification)
    assert len(built.tokenizer) == mlm.config.vocab_size  # the tokenizer saved with the checkpoint
    encoder = dict(mlm.encoder.named_parameters())
    for name, param in model.encoder.named_parameters():
        assert torch.equal(param, encoder[name]), name
    assert model.classifier.weight.shape == (2, 32)

    truncated = build_model(
        trial_config({"kind": "builtin", "checkpoint": str(out)}, **{**HP.model_dump(), "num_layers": 1}), 2,
        {0: "a", 1: "b"},
    )
    assert truncated.num_layers == 1
    with pytest.raises(ConfigError, match=r"num_layers \(3\).*2 encoder layers"):
        build_model(trial_config({"kind": "builtin", "checkpoint": str(out)}, **{**HP.model_dump(), "num_layers": 3}),
                    2, {0: "a", 1: "b"})


def test_masking_follows_80_10_10() -> None:
    ids = torch.randint(10, 1000, (200, 100))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    gen = torch.Generator().manual_seed(0)
    inputs, labels = mask_tokens(ids, special, mask_token_id=4, vocab_size=1000, generator=gen)
    chosen = labels != -100
    assert not chosen[:, 0].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert abs(chosen.float().mean().item() - 0.15 * 99 / 100) < 0.01
    masked = (inputs == 4) & chosen
    kept = (inputs == ids) & chosen
    assert abs(masked.sum().item() / chosen.sum().item() - 0.8) < 0.02
    assert 0.08 < kept.sum().item() / chosen.sum().item() < 0.13  # 10% kept, plus random draws of the same id
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_every_row_with_real_tokens_gets_a_mask() -> None:
    ids = torch.tensor([[2, 7, 3, 0], [2, 8, 9, 3]])
    special = torch.isin(ids, torch.tensor([0, 2, 3]))
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        _, labels = mask_tokens(ids, special, mask_token_id=4, vocab_size=20, generator=gen)
        assert ((labels != -100).sum(dim=1) >= 1).all()


def test_empty_corpus_is_a_config_error(tmp_path: Path, tok_dir: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no non-empty lines"):
        pretrain_mlm(tmp_path / "empty.txt", tmp_path / "out", hparams=HP, tokenizer=str(tok_dir), seed=0,
                     max_steps=1, on_step=None)
