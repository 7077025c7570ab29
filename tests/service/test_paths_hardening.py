"""Paths a user names that the filesystem cannot take, and files the API reads on a user's
behalf (a model's config.json) that lead out of the data roots: each a 422 on SQLite and
PostgreSQL that stores nothing, never a 500 or a read outside the roots."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.errors import Invalid
from service.optuna_bridge import model_shape
from service.paths import MAX_READ_BYTES, resolve_in_roots
from trainer.config import PretrainedModel

API = "/api/v1"
TINY_BERT_CONFIG = {"model_type": "bert", "num_hidden_layers": 4, "num_attention_heads": 4, "hidden_size": 32}


def _submit(client, headers, spec: dict[str, Any]) -> Any:  # type: ignore[no-untyped-def]
    return client.post(
        f"{API}/studies", content=json.dumps(spec), headers={**headers, "Content-Type": "application/json"}
    )


@pytest.mark.parametrize(
    "train",
    [
        "x" * 300 + ".csv",  # one component longer than NAME_MAX
        "/".join(["d" * 200] * 30) + "/train.csv",  # longer than PATH_MAX
        "train\x00.csv",
        "sub\x00dir/train.csv",
    ],
)
def test_unusable_dataset_paths_are_422(  # type: ignore[no-untyped-def]
    client, user_headers, spec_data_root: Path, minilm_spec_data, row_counts, train: str
) -> None:
    before = row_counts()
    spec = minilm_spec_data(dataset={"kind": "files", "train": train})
    r = _submit(client, user_headers, spec)
    assert r.status_code == 422, r.text[:300]
    detail = r.json()["detail"][0]
    assert detail["field"].startswith("dataset.train") or detail["field"] == "spec.dataset.train", detail
    assert len(r.text) < 5_000, "the error must not echo a huge path back"
    assert row_counts() == before


def _pretrained(minilm_spec_data: Callable[..., dict[str, Any]], path: str) -> dict[str, Any]:
    return minilm_spec_data(
        model={"kind": "pretrained", "path": path},
        search_space={"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}},
    )


def test_config_json_linking_out_of_the_roots_is_not_read(  # type: ignore[no-untyped-def]
    client, user_headers, spec_data_root: Path, minilm_spec_data, row_counts, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(TINY_BERT_CONFIG))
    model = spec_data_root / "evil-bert"
    model.mkdir()
    (model / "config.json").symlink_to(outside)
    before = row_counts()
    r = _submit(client, user_headers, _pretrained(minilm_spec_data, "evil-bert"))
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["field"] == "model.path" and "outside the data roots" in detail["reason"], detail
    (model / "config.json").unlink()
    (model / "config.json").symlink_to("/dev/zero")
    r = _submit(client, user_headers, _pretrained(minilm_spec_data, "evil-bert"))
    assert r.status_code == 422, r.text
    assert row_counts() == before


def test_config_json_linked_inside_the_roots_is_fine(  # type: ignore[no-untyped-def]
    client, user_headers, spec_data_root: Path, minilm_spec_data
) -> None:
    # The Hugging Face cache layout: snapshots/<rev>/config.json -> ../../blobs/<hash>.
    blobs = spec_data_root / "hub" / "blobs"
    snapshot = spec_data_root / "hub" / "snapshots" / "rev1"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (blobs / "abc123").write_text(json.dumps(TINY_BERT_CONFIG))
    (snapshot / "config.json").symlink_to(Path("..") / ".." / "blobs" / "abc123")
    r = _submit(client, user_headers, _pretrained(minilm_spec_data, "hub/snapshots/rev1"))
    assert r.status_code == 201, r.text


def test_model_shape_reads_only_small_regular_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    model = root / "m"
    model.mkdir(parents=True)
    (model / "config.json").symlink_to("/dev/zero")
    with pytest.raises(Invalid, match="not a regular file"):
        model_shape(PretrainedModel(path=str(model)))
    (model / "config.json").unlink()
    (model / "config.json").write_text(" " * (MAX_READ_BYTES + 1))
    with pytest.raises(Invalid, match="larger than"):
        model_shape(PretrainedModel(path=str(model)))
    (model / "config.json").unlink()
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(TINY_BERT_CONFIG))
    (model / "config.json").symlink_to(outside)
    assert model_shape(PretrainedModel(path=str(model))).max_layers == 4
    with pytest.raises(Invalid, match="outside the data roots") as err:
        model_shape(PretrainedModel(path=str(model)), roots=[root])
    assert err.value.field == "model.path"


def test_resolve_in_roots_turns_os_errors_into_invalid(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for path in ("x" * 300, "/".join(["d" * 200] * 30)):
        with pytest.raises(Invalid) as err:
            resolve_in_roots(path, [root], "dataset.train")
        assert err.value.field == "dataset.train" and len(err.value.reason) < 1_000
