"""Path safety: every dataset and model path a user names must resolve inside a data root.

Paths are resolved with symlinks followed before the containment check, so `../`,
absolute paths elsewhere and links that point out of a root are all refused. The check
runs on the API host at submit time; what the trainer receives is the resolved path.
"""

from __future__ import annotations

import stat
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
    # Says how to change them: a new user's first wrong path is usually a missing root.
    return ", ".join(str(r) for r in roots) + "; the server's TUNEFORGE_DATA_ROOTS sets them"


def _os_reason(exc: BaseException) -> str:
    # strerror alone: str(OSError) repeats the (possibly huge) file name.
    return getattr(exc, "strerror", None) or str(exc)


def _short(path: str, limit: int = 200) -> str:
    # An error message should not echo a 100 kB path back.
    return path if len(path) <= limit else f"{path[:limit]}..."


# Files inside a model folder that the API itself reads while validating a spec
# (service.optuna_bridge.model_shape); each must resolve inside the data roots too.
MODEL_FILES_READ = ("config.json",)
# config.json is a few kB; a link to /dev/zero or a huge file must not be read whole.
MAX_READ_BYTES = 1 << 20


def check_read_file(path: Path, field: str, roots: Sequence[Path] | None = None) -> None:
    """Refuse (`Invalid(field, ...)`) a file the API is about to read on a user's behalf
    unless its real path (symlinks followed) is a regular file of at most MAX_READ_BYTES,
    inside `roots` when they are given. A missing file passes: its reader says so."""
    try:
        real = path.resolve(strict=True)
        info = real.stat()
    except FileNotFoundError:
        return
    except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop on Python 3.11
        raise Invalid(field, f"{path.name} cannot be read: {_os_reason(exc)}") from None
    if roots is not None and not any(real.is_relative_to(Path(r).resolve()) for r in roots):
        raise Invalid(field, f"{path.name} leads outside the data roots ({_roots_text(roots)})")
    if not stat.S_ISREG(info.st_mode):
        raise Invalid(field, f"{path.name} is not a regular file")
    if info.st_size > MAX_READ_BYTES:
        raise Invalid(field, f"{path.name} is larger than {MAX_READ_BYTES} bytes")


def _check_model_files(folder: Path, roots: Sequence[Path], field: str) -> None:
    for name in MODEL_FILES_READ:
        check_read_file(folder / name, field, roots)


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
            if not any(real.is_relative_to(root) for root in real_roots):
                raise Invalid(field, f"{_short(path)!r} is outside the data roots ({_roots_text(real_roots)})")
            # is_file/exists raise (not answer False) for a name longer than the filesystem
            # allows (ENAMETOOLONG) or a permission error on the way.
            if _has_kind(real, kind):
                return real
            if real.exists() and wrong_kind is None:
                wrong_kind = real
        except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop on Python 3.11
            raise Invalid(field, f"{_short(path)!r} cannot be resolved: {_os_reason(exc)}") from None
        first = first or real
    if wrong_kind is not None:
        raise Invalid(field, f"{_short(path)!r} is not {_KIND_WORD[kind]}")
    if must_exist:
        where = "" if raw.is_absolute() else f" in the data roots ({_roots_text(real_roots)})"
        raise Invalid(field, f"{_short(path)!r} does not exist{where}")
    assert first is not None
    return first


def resolve_spec_paths(spec: StudySpec, roots: Sequence[Path]) -> StudySpec:
    """A copy of `spec` whose model and dataset paths are resolved absolute paths inside
    `roots` (what the trainer is given). Raises `Invalid` like `resolve_in_roots`."""
    model = spec.model
    if isinstance(model, PretrainedModel):
        folder = resolve_in_roots(model.path, roots, "model.path", kind="dir")
        _check_model_files(folder, roots, "model.path")
        model = model.model_copy(update={"path": str(folder)})
    elif isinstance(model, BuiltinModel):
        update: dict[str, str] = {}
        # A tokenizer may also name a registered model; only folders are paths.
        if model.tokenizer is not None and model.tokenizer not in MODELS:
            update["tokenizer"] = str(resolve_in_roots(model.tokenizer, roots, "model.tokenizer", kind="dir"))
        if model.checkpoint is not None:
            folder = resolve_in_roots(model.checkpoint, roots, "model.checkpoint", kind="dir")
            _check_model_files(folder, roots, "model.checkpoint")
            update["checkpoint"] = str(folder)
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
