from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import Invalid
from service.paths import resolve_in_roots, resolve_spec_paths
from service.settings import Settings
from service.spec import StudySpec


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "train.csv").write_text("text,label\n")
    (second / "only-b.csv").write_text("text,label\n")
    (tmp_path / "secret.csv").write_text("text,label\n")
    return first, second


def test_relative_path_resolves_inside_the_first_root(roots: tuple[Path, Path]) -> None:
    assert resolve_in_roots("train.csv", roots, "dataset.train") == roots[0].resolve() / "train.csv"


def test_relative_path_is_tried_against_each_root_in_order(roots: tuple[Path, Path]) -> None:
    assert resolve_in_roots("only-b.csv", roots, "dataset.train") == roots[1].resolve() / "only-b.csv"


def test_absolute_path_inside_a_root_is_accepted(roots: tuple[Path, Path]) -> None:
    path = str(roots[1] / "only-b.csv")
    assert resolve_in_roots(path, roots, "dataset.train") == roots[1].resolve() / "only-b.csv"


@pytest.mark.parametrize("path", ["../secret.csv", "sub/../../secret.csv"])
def test_dot_dot_out_of_the_roots_is_rejected(roots: tuple[Path, Path], path: str) -> None:
    with pytest.raises(Invalid) as err:
        resolve_in_roots(path, roots, "dataset.train")
    assert err.value.field == "dataset.train"
    assert f"{path!r} is outside the data roots" in err.value.reason
    assert str(roots[0].resolve()) in err.value.reason


def test_absolute_path_outside_the_roots_is_rejected(roots: tuple[Path, Path], tmp_path: Path) -> None:
    path = str(tmp_path / "secret.csv")
    with pytest.raises(Invalid) as err:
        resolve_in_roots(path, roots, "dataset.validation")
    assert err.value.field == "dataset.validation"
    assert "outside the data roots" in err.value.reason and path in err.value.reason


def test_symlink_inside_a_root_pointing_out_is_rejected(roots: tuple[Path, Path], tmp_path: Path) -> None:
    (roots[0] / "link.csv").symlink_to(tmp_path / "secret.csv")
    with pytest.raises(Invalid) as err:
        resolve_in_roots("link.csv", roots, "dataset.train")
    assert "'link.csv' is outside the data roots" in err.value.reason


def test_symlinked_folder_pointing_out_is_rejected_for_paths_below_it(roots: tuple[Path, Path], tmp_path: Path) -> None:
    (roots[0] / "escape").symlink_to(tmp_path)
    with pytest.raises(Invalid, match="outside the data roots"):
        resolve_in_roots("escape/secret.csv", roots, "dataset.train")


def test_symlink_that_stays_inside_resolves_to_its_target(roots: tuple[Path, Path]) -> None:
    (roots[0] / "alias.csv").symlink_to(roots[1] / "only-b.csv")
    assert resolve_in_roots("alias.csv", roots, "dataset.train") == roots[1].resolve() / "only-b.csv"


def test_missing_file_names_the_path(roots: tuple[Path, Path]) -> None:
    with pytest.raises(Invalid) as err:
        resolve_in_roots("nope.csv", roots, "dataset.train")
    assert err.value.field == "dataset.train"
    assert "'nope.csv' does not exist in the data roots" in err.value.reason
    assert "TUNEFORGE_DATA_ROOTS" in err.value.reason


def test_missing_file_is_allowed_when_it_need_not_exist(roots: tuple[Path, Path]) -> None:
    path = resolve_in_roots("new.csv", roots, "x", must_exist=False)
    assert path == roots[0].resolve() / "new.csv"


def test_missing_file_outside_is_still_outside(roots: tuple[Path, Path]) -> None:
    with pytest.raises(Invalid, match="outside the data roots"):
        resolve_in_roots("../new.csv", roots, "x", must_exist=False)


def test_wrong_kind_is_rejected(roots: tuple[Path, Path]) -> None:
    (roots[0] / "folder").mkdir()
    with pytest.raises(Invalid, match="'folder' is not a file"):
        resolve_in_roots("folder", roots, "dataset.train", kind="file")
    with pytest.raises(Invalid, match="'train.csv' is not a folder"):
        resolve_in_roots("train.csv", roots, "model.path", kind="dir")
    assert resolve_in_roots("folder", roots, "x", kind="any").name == "folder"


@pytest.mark.parametrize(("path", "reason"), [("", "is empty"), ("a\x00b", "NUL byte")])
def test_degenerate_paths_are_rejected(roots: tuple[Path, Path], path: str, reason: str) -> None:
    with pytest.raises(Invalid, match=reason):
        resolve_in_roots(path, roots, "dataset.train")


def test_no_roots_configured(tmp_path: Path) -> None:
    with pytest.raises(Invalid, match="no data roots"):
        resolve_in_roots("x.csv", [], "dataset.train")


def test_resolve_spec_paths_makes_every_path_absolute(spec_data_root: Path, minilm_spec_data) -> None:
    spec = StudySpec.model_validate(
        minilm_spec_data(
            model={"kind": "pretrained", "path": "tiny-bert"},
            dataset={"kind": "files", "train": "train.csv", "validation": "./train.csv"},
        )
    )
    resolved = resolve_spec_paths(spec, [spec_data_root])
    assert resolved.model.path == str(spec_data_root.resolve() / "tiny-bert")
    assert resolved.dataset.train == resolved.dataset.validation == str(spec_data_root.resolve() / "train.csv")
    assert spec.model.path == "tiny-bert"  # a copy: the input is left as it was
    assert resolved.search_space == spec.search_space


def test_resolve_spec_paths_keeps_names_and_resolves_builtin_folders(spec_data_root: Path, minilm_spec_data) -> None:
    named = StudySpec.model_validate(
        minilm_spec_data(model={"kind": "builtin", "tokenizer": "all-minilm-l6-v2", "checkpoint": "tiny-bert"})
    )
    resolved = resolve_spec_paths(named, [spec_data_root])
    assert resolved.model.tokenizer == "all-minilm-l6-v2"
    assert resolved.model.checkpoint == str(spec_data_root.resolve() / "tiny-bert")
    assert resolved.dataset == named.dataset

    outside = StudySpec.model_validate(minilm_spec_data(model={"kind": "builtin", "tokenizer": "../tok"}))
    with pytest.raises(Invalid) as err:
        resolve_spec_paths(outside, [spec_data_root])
    assert err.value.field == "model.tokenizer"


@pytest.mark.parametrize("raw", ["{a},{b}", '["{a}", "{b}"]', ' ["{a}","{b}"] '])
def test_data_roots_from_the_environment_comma_separated_or_a_json_list(
    raw: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("TUNEFORGE_DATA_ROOTS", raw.format(a=a, b=b))
    assert Settings(database_url="sqlite://", home=tmp_path).data_roots == [a.resolve(), b.resolve()]


def test_a_broken_json_list_of_data_roots_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("TUNEFORGE_DATA_ROOTS", '["/data", ')
    with pytest.raises(ValidationError, match="not a JSON list of folders"):
        Settings(database_url="sqlite://", home=tmp_path)
