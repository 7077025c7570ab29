"""Path safety: every dataset and model path a user names must resolve inside a data root.

Paths are resolved with symlinks followed before the containment check, so `../`,
absolute paths elsewhere and links that point out of a root are all refused. The check
runs on the API host at submit time; what the trainer receives is the resolved path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from service.errors import Invalid
from trainer.config import BuiltinModel, FilesDataset, PretrainedModel
from trainer.registry import MODELS

if TYPE_CHECKING:
    from service.spec import StudySpec

PathKind = Literal["file", "dir", "any"]

_KIND_WORD = {"file": "a file", "dir": "a folder", "any": "a file or folder"}


def _has_kind(path: Path, kind: PathKind) -> bool:
    if kind == "file":
        return path.is_file()
    if kind == "dir":
        return path.is_dir()
    return path.exists()


def _roots_text(roots: Sequence[Path]) -> str:
    return ", ".join(str(r) for r in roots)


def resolve_in_roots(
    path: str,
    roots: Sequence[Path],
    field: str,
    must_exist: bool = True,
    kind: PathKind = "file",
) -> Path:
    """The resolved absolute path of `path`, which must lie inside one of `roots`.

    A relative path is tried against each root in order and the first that exists wins;
    an absolute one is taken as is. Raises `Invalid(field, ...)` for a path outside every
    root (after following symlinks), for a missing path when `must_exist`, and for a path
    of the wrong kind.
    """
    if not path:
        raise Invalid(field, "is empty; give a path inside the data roots")
    if "\x00" in path:
        raise Invalid(field, "contains a NUL byte")
    real_roots = [Path(r).resolve() for r in roots]
    if not real_roots:
        raise Invalid(field, "no data roots are configured on the server (TUNEFORGE_DATA_ROOTS)")
    raw = Path(path)
    candidates = [raw] if raw.is_absolute() else [root / raw for root in real_roots]
    first: Path | None = None
    wrong_kind: Path | None = None
    for candidate in candidates:
        try:
            # strict=False still follows every symlink that exists, which is what matters here
            real = candidate.resolve(strict=False)
        except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop on Python 3.11
            raise Invalid(field, f"{path!r} cannot be resolved: {exc}") from None
        if not any(real.is_relative_to(root) for root in real_roots):
            raise Invalid(field, f"{path!r} is outside the data roots ({_roots_text(real_roots)})")
        if _has_kind(real, kind):
            return real
        if real.exists() and wrong_kind is None:
            wrong_kind = real
        first = first or real
    if wrong_kind is not None:
        raise Invalid(field, f"{path!r} is not {_KIND_WORD[kind]}")
    if must_exist:
        where = "" if raw.is_absolute() else f" in the data roots ({_roots_text(real_roots)})"
        raise Invalid(field, f"{path!r} does not exist{where}")
    assert first is not None
    return first


def resolve_spec_paths(spec: StudySpec, roots: Sequence[Path]) -> StudySpec:
    """A copy of `spec` whose model and dataset paths are resolved absolute paths inside
    `roots` (what the trainer is given). Raises `Invalid` like `resolve_in_roots`."""
    model = spec.model
    if isinstance(model, PretrainedModel):
        model = model.model_copy(update={"path": str(resolve_in_roots(model.path, roots, "model.path", kind="dir"))})
    elif isinstance(model, BuiltinModel):
        update: dict[str, str] = {}
        # A tokenizer may also name a registered model; only folders are paths.
        if model.tokenizer is not None and model.tokenizer not in MODELS:
            update["tokenizer"] = str(resolve_in_roots(model.tokenizer, roots, "model.tokenizer", kind="dir"))
        if model.checkpoint is not None:
            update["checkpoint"] = str(resolve_in_roots(model.checkpoint, roots, "model.checkpoint", kind="dir"))
        model = model.model_copy(update=update)
    dataset = spec.dataset
    if isinstance(dataset, FilesDataset):
        update = {"train": str(resolve_in_roots(dataset.train, roots, "dataset.train", kind="file"))}
        if dataset.validation is not None:
            update["validation"] = str(
                resolve_in_roots(dataset.validation, roots, "dataset.validation", kind="file")
            )
        dataset = dataset.model_copy(update=update)
    return spec.model_copy(update={"model": model, "dataset": dataset})
