"""The `train` and `pretrain` commands."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from trainer.cli import app

runner = CliRunner()


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture
def tiny_config(tmp_path: Path, make_config: Callable[..., Any]) -> dict[str, Any]:
    return make_config(run={"max_steps": 4}).model_dump(mode="json")


def test_train_runs_a_tiny_config(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    path = write_config(tmp_path / "trial.yaml", tiny_config)
    result = runner.invoke(
        app, ["train", str(path), "--work-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
              "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    assert "final metrics at step 4" in result.output
    for name in ("loss", "accuracy", "f1_macro"):
        assert name in result.output
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert list((tmp_path / "cache" / "tokens").glob("*.safetensors"))


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c["hparams"].update(learning_rate=-1), "hparams.learning_rate: Input should be greater than 0"),
        (lambda c: c["hparams"].update(optimizer="lion"), "hparams.optimizer: Input should be 'adamw'"),
        (lambda c: c.pop("model"), "model: Field required"),
        (lambda c: c["run"].update(sede=1), "run.sede: Extra inputs are not permitted"),
    ],
    ids=["negative-lr", "unknown-optimizer", "no-model", "typo"],
)
def test_bad_config_is_one_line_exit_2(
    mutate: Callable[[dict[str, Any]], Any], expected: str, tmp_path: Path, tiny_config: dict[str, Any]
) -> None:
    mutate(tiny_config)
    path = write_config(tmp_path / "bad.yaml", tiny_config)
    result = runner.invoke(app, ["train", str(path), "--work-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert expected in lines[0] and "bad.yaml" in lines[0]
    assert "Traceback" not in result.output


def test_unreadable_config_files_exit_2(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["train", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "cannot read config" in missing.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {kind: [\n", encoding="utf-8")
    result = runner.invoke(app, ["train", str(broken)])
    assert result.exit_code == 2 and "not valid YAML" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_data_errors_exit_2_with_one_line(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    tiny_config["dataset"]["label_column"] = "sentiment"
    path = write_config(tmp_path / "trial.yaml", tiny_config)
    result = runner.invoke(
        app, ["train", str(path), "--work-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    )
    assert result.exit_code == 2
    assert "no column 'sentiment'; available columns: 'text', 'label'" in result.output
    assert "Traceback" not in result.output


def test_resume_must_be_a_folder(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    path = write_config(tmp_path / "trial.yaml", tiny_config)
    result = runner.invoke(app, ["train", str(path), "--resume", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "--resume" in result.output


def test_pretrain_then_fine_tune_from_it(tmp_path: Path, tiny_bert_dir: Path, make_config: Callable[..., Any]) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(["the good film was very fun", "this bad plot is dull and sad"] * 20), encoding="utf-8")
    hp_file = write_config(tmp_path / "hp.yaml", {"hidden_size": 32, "ffn_size": 64, "num_layers": 1})
    out = tmp_path / "encoder"
    result = runner.invoke(
        app,
        ["pretrain", str(text), "--out", str(out), "--hparams", str(hp_file), "--set", "num_heads=2",
         "--set", "batch_size=8", "--tokenizer", str(tiny_bert_dir), "--max-steps", "3"],
    )
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file()
    # The pretrained encoder is what a built-in model fine-tunes from.
    config = make_config(
        model={"kind": "builtin", "checkpoint": str(out)},
        hparams={"hidden_size": 32, "ffn_size": 64, "num_layers": 1, "num_heads": 2},
        run={"max_steps": 2},
    ).model_dump(mode="json")
    path = write_config(tmp_path / "ft.yaml", config)
    ft = runner.invoke(app, ["train", str(path), "--work-dir", str(tmp_path / "ft"), "--cache-dir",
                             str(tmp_path / "cache")])
    assert ft.exit_code == 0, ft.output


def test_pretrain_bad_knob_exit_2(tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("a b c\n", encoding="utf-8")
    result = runner.invoke(app, ["pretrain", str(text), "--out", str(tmp_path / "o"), "--set", "hidden_size=-3"])
    assert result.exit_code == 2 and "hparams.hidden_size" in result.output
    result = runner.invoke(app, ["pretrain", str(text), "--out", str(tmp_path / "o"), "--set", "oops"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output


def test_python_m_trainer_cli() -> None:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "--help"], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "pretrain" in proc.stdout
