"""`tuneforge up --spec FILE --exit-when-done`: the server, the database upgrade, the local
tokens and one local worker in one command, run as a user runs it (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "trainer"))
from trainer_test_helpers import build_tiny_bert, separable_rows, write_csv  # noqa: E402

REPO = Path(__file__).parents[2]

pytestmark = pytest.mark.slow


def test_up_runs_a_study_and_exits_when_done(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    build_tiny_bert(data / "tiny-bert")
    write_csv(data / "train.csv", separable_rows(120, seed=3))
    spec = {
        "name": "up-tiny",
        "model": {"kind": "pretrained", "path": "tiny-bert"},
        "dataset": {"kind": "files", "train": "train.csv"},
        "run": {"eval_every_steps": 3},
        "objective": {"metric": "accuracy"},
        "search_space": {"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        "fixed": {"batch_size": 12, "epochs": 1, "max_seq_len": 16},
        "pruner": {"name": "asha", "options": {"min_resource": 3, "reduction_factor": 2}},
        "budget": {"n_trials": 3, "max_parallel": 1},
    }
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    home = tmp_path / "home"
    env = {
        **os.environ,
        "TUNEFORGE_ENVIRONMENT": "local",
        "TUNEFORGE_DATABASE_URL": f"sqlite:///{tmp_path / 'tuneforge.db'}",
        "TUNEFORGE_HOME": str(home),
        "TUNEFORGE_ARTIFACT_DIR": str(home / "artifacts"),
        "TUNEFORGE_DATA_ROOTS": str(data),
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("TUNEFORGE_TOKEN", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli.main",
            "up",
            "--spec",
            str(spec_file),
            "--exit-when-done",
            "--port",
            "0",
            "--gpus",
            "none",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "up-tiny (completed)" in out
    assert "best trial #" in out
    # The local admin and worker tokens were created on the way (0600 files under the home).
    for name in ("admin-token", "worker-token"):
        token_file = home / name
        assert token_file.is_file() and token_file.stat().st_mode & 0o777 == 0o600
