"""Training data: read a labelled table, map labels, split, tokenise once, and batch.

The pipeline for one trial (`prepare_data`):

1. Resolve the dataset reference (files, or a name from `trainer.registry`).
2. Tokenise each file once per (content, tokenizer, max_seq_len, columns) and keep
   the result in a cache file under `Runtime.cache_dir`, shared by every trial and
   process on the machine. Token ids are stored unpadded: one flat int32 array plus
   offsets, in safetensors (no pickle).
3. Build the label map from the training labels, hold out a stratified validation
   split when there is no validation file, and take the seeded stratified samples
   that `max_train_examples` / `max_eval_examples` ask for. These are index
   operations on the cached arrays, so they never invalidate the cache.

Batches are padded per batch to their longest row (`TokenizedSplit.collate`).
Every check that can fail on user data raises `ConfigError` here, before a model
is built.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file
from transformers import PreTrainedTokenizerBase

from trainer import registry
from trainer.config import FilesDataset, TrialConfig
from trainer.outcome import ConfigError

log = logging.getLogger(__name__)

CACHE_FORMAT = "tuneforge-tokens/2"
"""Bump when the cache file layout or tokenisation rules change: old entries are then ignored."""

_TOKENIZE_CHUNK = 2048  # rows per tokenizer call: big enough for the Rust tokenizer's batching, small in memory
_PARQUET = (".parquet", ".pq")
_JSONL = (".jsonl", ".json", ".ndjson")
_CSV = (".csv", ".tsv")


# ---------------------------------------------------------------------------------------------
# Where the data is


@dataclass(frozen=True)
class DataSource:
    """A dataset reference resolved to files and columns."""

    train: Path
    validation: Path | None
    text_column: str
    text_pair_column: str | None
    label_column: str
    encoding: str

    @property
    def columns(self) -> list[str]:
        cols = [self.text_column] + ([self.text_pair_column] if self.text_pair_column else [])
        return [*cols, self.label_column]


def resolve_source(config: TrialConfig) -> DataSource:
    """Files and columns behind `config.dataset`; ConfigError for a name or file that is not there."""
    ref = config.dataset
    if isinstance(ref, FilesDataset):
        train = _existing_file(ref.train, "dataset.train")
        validation = _existing_file(ref.validation, "dataset.validation") if ref.validation else None
        return DataSource(
            train, validation, ref.text_column, ref.text_pair_column, ref.label_column, ref.encoding
        )
    try:
        entry = registry.dataset_entry(ref.name)
        path = registry.dataset_path(ref.name)
    except registry.UnknownName as exc:
        raise ConfigError(f"dataset.name: {exc}") from None
    return DataSource(path, None, entry.text_column, None, entry.label_column, entry.encoding)


def _existing_file(path: str, field_name: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{field_name}: file not found: {p}")
    return p


# ---------------------------------------------------------------------------------------------
# Reading tables


def _format_of(path: Path) -> str:
    """'csv', 'tsv', 'jsonl' or 'parquet' from the file name (a trailing .gz is allowed for text)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in _PARQUET:
        return "parquet"
    if last in _JSONL:
        return "jsonl"
    if last in _CSV:
        return last[1:]
    raise ConfigError(
        f"{path.name}: unreadable format {last or '(no extension)'!r}; use .csv, .tsv, .jsonl/.json or .parquet"
    )


def read_table(path: Path, columns: Sequence[str], encoding: str = "utf-8") -> dict[str, list[Any]]:
    """The named columns of a CSV/TSV, JSON-lines or Parquet file, as Python lists of raw values.

    Raises ConfigError for an unreadable file, a wrong encoding, an empty file or a
    missing column (naming it and listing the columns that exist).
    """
    fmt = _format_of(path)
    if path.stat().st_size == 0:
        raise ConfigError(f"{path.name}: the file is empty")
    try:
        if fmt == "parquet":
            return _read_parquet(path, columns)
        with _open_text(path, encoding) as f:
            return _read_jsonl(f, path, columns) if fmt == "jsonl" else _read_csv(f, path, columns, fmt)
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"dataset.encoding: {path.name} is not valid {encoding} (byte {exc.start}); "
            "set dataset.encoding, e.g. 'latin-1'"
        ) from None
    except LookupError:
        raise ConfigError(f"dataset.encoding: unknown encoding {encoding!r}") from None
    except (csv.Error, OSError, EOFError) as exc:
        raise ConfigError(f"{path.name}: unreadable {fmt} file: {exc}") from None


@contextlib.contextmanager
def _open_text(path: Path, encoding: str) -> Iterator[IO[str]]:
    # utf-8-sig strips a byte-order mark that would otherwise stick to the first column name.
    enc = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    if path.suffix.lower() == ".gz":
        with gzip.open(path, "rt", encoding=enc, newline="") as f:
            yield f
    else:
        with path.open("r", encoding=enc, newline="") as f:
            yield f


def _missing_column(path: Path, column: str, available: Sequence[str]) -> ConfigError:
    shown = ", ".join(repr(c) for c in available) if available else "(none)"
    close = difflib.get_close_matches(column, [str(a) for a in available], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{path.name}: no column {column!r}{hint}; available columns: {shown}")


def _read_csv(f: IO[str], path: Path, columns: Sequence[str], fmt: str) -> dict[str, list[Any]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents exceed the 128 KiB default
    reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",")
    header = next(reader, None)
    if header is None:
        raise ConfigError(f"{path.name}: the file is empty")
    header = [h.strip() for h in header]
    index: dict[str, int] = {}
    for col in columns:
        if col not in header:
            raise _missing_column(path, col, header)
        index[col] = header.index(col)
    out: dict[str, list[Any]] = {c: [] for c in columns}
    for row in reader:
        if not row:
            continue  # blank line
        for col, i in index.items():
            out[col].append(row[i] if i < len(row) else None)
    return out


def _read_jsonl(f: IO[str], path: Path, columns: Sequence[str]) -> dict[str, list[Any]]:
    text = f.read()
    stripped = text.lstrip()
    if not stripped:
        raise ConfigError(f"{path.name}: the file is empty")
    records: list[Any]
    try:
        if stripped.startswith("["):  # a .json file holding one array of objects
            records = json.loads(stripped)
        else:
            records = [json.loads(line) for line in io.StringIO(text) if line.strip()]
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path.name}: unreadable JSON lines (line {exc.lineno}: {exc.msg})") from None
    seen: dict[str, None] = {}
    for n, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise ConfigError(f"{path.name}: record {n} is not a JSON object")
        if len(seen) < 1000:
            seen.update(dict.fromkeys(rec))
    for col in columns:
        if not any(col in rec for rec in records):
            raise _missing_column(path, col, list(seen))
    return {c: [rec.get(c) for rec in records] for c in columns}


def _read_parquet(path: Path, columns: Sequence[str]) -> dict[str, list[Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        for col in columns:
            if col not in names:
                raise _missing_column(path, col, names)
        table = pq.read_table(path, columns=list(dict.fromkeys(columns)))
    except pa.ArrowException as exc:
        raise ConfigError(f"{path.name}: unreadable parquet file: {exc}") from None
    if table.num_rows == 0:
        raise ConfigError(f"{path.name}: the file is empty")
    return {c: table.column(c).to_pylist() for c in columns}


# ---------------------------------------------------------------------------------------------
# Cleaning values and labels


def _as_text(value: Any) -> str | None:
    """The text of a cell, or None when there is none to learn from."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, bool | int | np.integer) or (isinstance(value, float) and math.isfinite(value)):
        return str(value)
    return None


def label_key(value: Any) -> str | None:
    """A label as the string it is known by: 3, 3.0 and '3' are the same label; None/NaN/'' are missing."""
    if value is None or isinstance(value, list | dict):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        if not math.isfinite(value):
            return None
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    text = str(value).strip()
    if _INTEGRAL_FLOAT.fullmatch(text):  # '3.0': an integer label written by a float column
        return str(int(text.split(".")[0]))
    return text or None


_INTEGRAL_FLOAT = re.compile(r"[+-]?\d+\.0+")
_INT = re.compile(r"[+-]?\d+")


def sorted_labels(keys: set[str] | Sequence[str]) -> list[str]:
    """Label order for the map: numerically when every label is an integer (so '10' follows '9')."""
    keys = set(keys)
    if all(_INT.fullmatch(k) for k in keys):
        return sorted(keys, key=lambda k: (int(k), k))  # '01' and '1' tie on int: break it, never by set order
    return sorted(keys)


@dataclass(frozen=True)
class LabelMap:
    """Class names in id order. Saved with every checkpoint and export."""

    names: tuple[str, ...]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)


# ---------------------------------------------------------------------------------------------
# Tokenised files and their cache


@dataclass(frozen=True)
class EncodedFile:
    """One data file tokenised: flat token ids with row offsets, and each row's label."""

    ids: np.ndarray  # int32 [total tokens]
    offsets: np.ndarray  # int64 [rows + 1]
    type_ids: np.ndarray | None  # int8 [total tokens]; only for text pairs on models that use them
    label_index: np.ndarray  # int32 [rows], index into label_vocab
    label_vocab: tuple[str, ...]  # the file's own label names, in first-seen order
    info: dict[str, Any] = field(default_factory=dict)  # rows read, dropped counts, cache hit

    def __len__(self) -> int:
        return len(self.label_index)


_digest_memo: dict[tuple[str, int, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, inode, size, mtime) so a warm process hashes once."""
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if memo_key not in _digest_memo:
        with path.open("rb") as f:
            _digest_memo[memo_key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _digest_memo[memo_key]


def cache_key(path: Path, source: DataSource, tokenizer_key: str, max_seq_len: int, use_type_ids: bool) -> str:
    parts = {
        "format": CACHE_FORMAT,
        "content": file_digest(path),
        "file_format": _format_of(path),
        "tokenizer": tokenizer_key,
        "max_seq_len": max_seq_len,
        "text": source.text_column,
        "pair": source.text_pair_column,
        "label": source.label_column,
        "encoding": source.encoding,
        "type_ids": use_type_ids,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def encode_file(
    path: Path,
    source: DataSource,
    tokenizer: PreTrainedTokenizerBase,
    *,
    tokenizer_key: str,
    max_seq_len: int,
    cache_dir: Path,
) -> EncodedFile:
    """The tokenised file from the cache, tokenising (once, under a lock) on a miss."""
    use_type_ids = source.text_pair_column is not None and "token_type_ids" in tokenizer.model_input_names
    key = cache_key(path, source, tokenizer_key, max_seq_len, use_type_ids)
    folder = cache_dir / "tokens"
    target = folder / f"{key}.safetensors"
    cached = _load_cached(target)
    if cached is not None:
        return cached
    folder.mkdir(parents=True, exist_ok=True)
    # Slots that start together on the same data wait for one tokenisation instead of each doing it.
    with _file_lock(folder / f"{key}.lock"):
        cached = _load_cached(target)
        if cached is not None:
            return cached
        encoded = _encode(path, source, tokenizer, max_seq_len, use_type_ids)
        _write_atomic(target, encoded, source=path)
    return encoded


def _load_cached(target: Path) -> EncodedFile | None:
    if not target.is_file():
        return None
    try:
        with safe_open(str(target), framework="numpy") as f:
            meta = f.metadata() or {}
        if meta.get("format") != CACHE_FORMAT:
            return None
        arrays = load_file(str(target))
    except (OSError, ValueError, KeyError, SafetensorError) as exc:  # a damaged entry is rebuilt, never trusted
        log.warning("ignoring unreadable token cache %s: %s", target, exc)
        return None
    info = json.loads(meta.get("info", "{}"))
    info["cache_hit"] = True
    return EncodedFile(
        ids=arrays["input_ids"],
        offsets=arrays["offsets"],
        type_ids=arrays.get("token_type_ids"),
        label_index=arrays["label_index"],
        label_vocab=tuple(json.loads(meta["label_vocab"])),
        info=info,
    )


def _write_atomic(target: Path, encoded: EncodedFile, *, source: Path) -> None:
    tensors = {
        "input_ids": encoded.ids,
        "offsets": encoded.offsets,
        "label_index": encoded.label_index,
    }
    if encoded.type_ids is not None:
        tensors["token_type_ids"] = encoded.type_ids
    meta = {
        "format": CACHE_FORMAT,
        "label_vocab": json.dumps(list(encoded.label_vocab)),
        "info": json.dumps({k: v for k, v in encoded.info.items() if k != "cache_hit"}),
        "source": str(source),
    }
    # Same folder as the target, so the rename is atomic: readers see no file or a whole one.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): at worst two processes tokenise the same file
        yield
        return
    with path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _tokenize(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    pairs: list[str] | None,
    max_seq_len: int,
    use_type_ids: bool,
) -> dict[str, list[list[int]]]:
    """One tokenizer call; its own function so tests can count calls."""
    return tokenizer(
        texts,
        pairs,
        truncation=True,
        max_length=max_seq_len,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=use_type_ids,
    )


def _encode(
    path: Path, source: DataSource, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, use_type_ids: bool
) -> EncodedFile:
    table = read_table(path, source.columns, source.encoding)
    n_rows = len(table[source.label_column])
    if n_rows == 0:
        raise ConfigError(f"{path.name}: the file has a header but no rows")
    texts = [_as_text(v) for v in table[source.text_column]]
    pairs = [_as_text(v) for v in table[source.text_pair_column]] if source.text_pair_column else None
    labels = [label_key(v) for v in table[source.label_column]]

    keep: list[int] = []
    no_text = no_label = 0
    for i in range(n_rows):
        if texts[i] is None or (pairs is not None and pairs[i] is None):
            no_text += 1
        elif labels[i] is None:
            no_label += 1
        else:
            keep.append(i)

    vocab: dict[str, int] = {}
    ids_chunks: list[np.ndarray] = []
    type_chunks: list[np.ndarray] = []
    lengths: list[int] = []
    label_index: list[int] = []
    empty_after_tokenising = truncated = 0
    for start in range(0, len(keep), _TOKENIZE_CHUNK):
        rows = keep[start : start + _TOKENIZE_CHUNK]
        enc = _tokenize(
            tokenizer,
            [texts[i] for i in rows],  # type: ignore[misc]
            [pairs[i] for i in rows] if pairs is not None else None,  # type: ignore[misc]
            max_seq_len,
            use_type_ids,
        )
        for j, row in enumerate(rows):
            seq = enc["input_ids"][j]
            if not seq:  # nothing survived normalisation, and the tokenizer adds no special tokens
                empty_after_tokenising += 1
                continue
            truncated += len(seq) >= max_seq_len
            ids_chunks.append(np.asarray(seq, dtype=np.int32))
            if use_type_ids:
                type_chunks.append(np.asarray(enc["token_type_ids"][j], dtype=np.int8))
            lengths.append(len(seq))
            label_index.append(vocab.setdefault(labels[row], len(vocab)))  # type: ignore[arg-type]

    info = {
        "rows_read": n_rows,
        "dropped_empty_text": no_text + empty_after_tokenising,
        "dropped_missing_label": no_label,
        "truncated": int(truncated),
        "cache_hit": False,
    }
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return EncodedFile(
        ids=np.concatenate(ids_chunks) if ids_chunks else np.zeros(0, dtype=np.int32),
        offsets=offsets,
        type_ids=(np.concatenate(type_chunks) if type_chunks else np.zeros(0, dtype=np.int8))
        if use_type_ids
        else None,
        label_index=np.asarray(label_index, dtype=np.int32),
        label_vocab=tuple(vocab),
        info=info,
    )


# ---------------------------------------------------------------------------------------------
# Splits and batches


@dataclass(frozen=True)
class TokenizedSplit:
    """Rows of a tokenised file picked by index; ids stay shared with the file, unpadded."""

    ids: np.ndarray
    starts: np.ndarray  # int64 [n]
    lengths: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n], ids in the trial's LabelMap
    type_ids: np.ndarray | None

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def select(cls, encoded: EncodedFile, rows: np.ndarray, label_ids: np.ndarray) -> TokenizedSplit:
        rows = np.asarray(rows, dtype=np.int64)
        return cls(
            ids=encoded.ids,
            starts=encoded.offsets[rows],
            lengths=encoded.offsets[rows + 1] - encoded.offsets[rows],
            labels=label_ids[encoded.label_index[rows]].astype(np.int64),
            type_ids=encoded.type_ids,
        )

    def class_counts(self, num_labels: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_labels)

    def collate(self, rows: np.ndarray, pad_id: int, pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
        """A batch padded to its longest row (rounded up to `pad_to_multiple`, which tensor cores like)."""
        rows = np.asarray(rows, dtype=np.int64)
        lens = self.lengths[rows]
        width = int(lens.max())
        if pad_to_multiple > 1:
            width = -(-width // pad_to_multiple) * pad_to_multiple
        pos = np.arange(width)
        mask = pos[None, :] < lens[:, None]
        # Clamp positions past a row's end to its last token; those cells are masked out below.
        src = self.starts[rows][:, None] + np.minimum(pos[None, :], lens[:, None] - 1)
        batch = {
            "input_ids": torch.from_numpy(np.where(mask, self.ids[src], pad_id).astype(np.int64)),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
            "labels": torch.from_numpy(self.labels[rows]),
        }
        if self.type_ids is not None:
            batch["token_type_ids"] = torch.from_numpy(np.where(mask, self.type_ids[src], 0).astype(np.int64))
        return batch


def epoch_order(split: TokenizedSplit, *, seed: int, epoch: int, class_balanced: bool) -> np.ndarray:
    """Row order of one training epoch, a pure function of (seed, epoch).

    Resuming needs only the epoch and the position in it to continue the same order.
    With `class_balanced`, rows are drawn with replacement, weighted 1/class size, so
    each class is drawn about equally often; an epoch still has len(split) draws.
    """
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    n = len(split)
    if not class_balanced:
        return torch.randperm(n, generator=g).numpy()
    counts = np.bincount(split.labels)
    weights = torch.from_numpy(1.0 / counts[split.labels])
    sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=n, replacement=True, generator=g)
    return np.fromiter(iter(sampler), dtype=np.int64, count=n)


def eval_batches(split: TokenizedSplit, batch_size: int) -> list[np.ndarray]:
    """Validation rows grouped by length, so a batch carries little padding; metrics do not depend on order."""
    order = np.argsort(split.lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def stratified_take(
    labels: np.ndarray, n_take: int, rng: np.random.Generator, *, keep_one_each: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into (taken, rest), `n_take` taken, each class in proportion.

    Quotas are rounded by largest remainder, so the total is exact. With
    `keep_one_each` (splitting off validation), a class keeps at least one row in
    `rest`; otherwise (sampling a cap) a class gets at least one taken row when
    `n_take` allows it.
    """
    n = len(labels)
    classes, counts = np.unique(labels, return_counts=True)
    exact = n_take * counts / n
    quota = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - quota), kind="stable")[: n_take - int(quota.sum())]:
        quota[i] += 1
    if keep_one_each:
        quota = np.minimum(quota, counts - 1)
    elif n_take >= len(classes):
        # Move rows from the largest quotas to classes that got none.
        for i in np.flatnonzero(quota == 0):
            quota[np.argmax(quota)] -= 1
            quota[i] = 1
    taken: list[np.ndarray] = []
    for cls, q in zip(classes, quota, strict=True):
        rows = np.flatnonzero(labels == cls)
        taken.append(rng.permutation(rows)[:q])
    take = np.sort(np.concatenate(taken)) if taken else np.zeros(0, dtype=np.int64)
    rest = np.setdiff1d(np.arange(n), take, assume_unique=True)
    return take, rest


@dataclass(frozen=True)
class PreparedData:
    """Everything a trial reads from its data."""

    train: TokenizedSplit
    validation: TokenizedSplit
    labels: LabelMap
    pad_id: int
    max_seq_len: int
    info: dict[str, Any]


def effective_max_seq_len(tokenizer: PreTrainedTokenizerBase, requested: int) -> int:
    """The requested length, capped at what the tokenizer says its model accepts."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000 and limit < requested:
        log.warning("max_seq_len %d exceeds the tokenizer's model_max_length %d; using %d", requested, limit, limit)
        return limit
    return requested


def prepare_data(
    config: TrialConfig, tokenizer: PreTrainedTokenizerBase, cache_dir: Path, *, tokenizer_key: str
) -> PreparedData:
    """Read, tokenise (or load from the cache), label-map, split and sample the trial's data.

    `tokenizer_key` identifies the tokenizer in the cache key (the modeling side's
    `tokenizer_fingerprint`). Raises ConfigError for anything wrong with the data.
    """
    source = resolve_source(config)
    max_len = effective_max_seq_len(tokenizer, config.hparams.max_seq_len)

    def encode(path: Path) -> EncodedFile:
        enc = encode_file(
            path, source, tokenizer, tokenizer_key=tokenizer_key, max_seq_len=max_len, cache_dir=cache_dir
        )
        _log_dropped(path, enc)
        if len(enc) == 0:
            raise ConfigError(
                f"{path.name}: no usable rows ({enc.info['rows_read']} read, "
                f"{enc.info['dropped_empty_text']} with empty text, "
                f"{enc.info['dropped_missing_label']} without a label in {source.label_column!r})"
            )
        return enc

    train_file = encode(source.train)
    rng = np.random.default_rng(config.run.seed)
    label_col = source.label_column
    train_names = sorted_labels(set(train_file.label_vocab))
    if len(train_names) < 2:
        raise ConfigError(
            f"dataset.label_column: {label_col!r} in {source.train.name} has a single class "
            f"({train_names[0]!r}); a classifier needs at least two"
        )
    labels = LabelMap(tuple(train_names))
    train_map = np.array([labels.label2id[n] for n in train_file.label_vocab], dtype=np.int64)
    train_label_ids = train_map[train_file.label_index]

    if source.validation is not None:
        val_file = encode(source.validation)
        unseen = [n for n in val_file.label_vocab if n not in labels.label2id]
        if unseen:
            shown = ", ".join(repr(n) for n in sorted_labels(unseen)[:5])
            raise ConfigError(
                f"dataset.validation: labels {shown} in {source.validation.name} never occur in "
                f"{source.train.name} (training labels: {', '.join(repr(n) for n in labels.names)})"
            )
        val_map = np.array([labels.label2id[n] for n in val_file.label_vocab], dtype=np.int64)
        train_rows = np.arange(len(train_file))
        val_rows = np.arange(len(val_file))
    else:
        val_file, val_map = train_file, train_map
        n_val = int(round(config.data.validation_fraction * len(train_file)))
        val_rows, train_rows = stratified_take(train_label_ids, max(n_val, 1), rng, keep_one_each=True)
        if len(val_rows) == 0 or len(train_rows) == 0:
            raise ConfigError(
                f"{source.train.name}: {len(train_file)} usable rows are too few to hold out a validation "
                "split; add rows or give dataset.validation"
            )

    cap_train, cap_eval = config.data.max_train_examples, config.data.max_eval_examples
    if cap_train is not None and cap_train < len(train_rows):
        picked, _ = stratified_take(train_label_ids[train_rows], cap_train, rng, keep_one_each=False)
        train_rows = train_rows[picked]
    if cap_eval is not None and cap_eval < len(val_rows):
        val_label_ids = val_map[val_file.label_index[val_rows]]
        picked, _ = stratified_take(val_label_ids, cap_eval, rng, keep_one_each=False)
        val_rows = val_rows[picked]

    train = TokenizedSplit.select(train_file, train_rows, train_map)
    validation = TokenizedSplit.select(val_file, val_rows, val_map)
    if len(np.unique(train.labels)) < 2:
        raise ConfigError(
            f"data.max_train_examples: the sample of {len(train)} training rows holds a single class; raise it"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    info = {
        "train_rows": len(train),
        "validation_rows": len(validation),
        "cache_hit": bool(train_file.info.get("cache_hit"))
        and (source.validation is None or bool(val_file.info.get("cache_hit"))),
        "dropped_empty_text": train_file.info["dropped_empty_text"]
        + (val_file.info["dropped_empty_text"] if source.validation else 0),
        "dropped_missing_label": train_file.info["dropped_missing_label"]
        + (val_file.info["dropped_missing_label"] if source.validation else 0),
    }
    return PreparedData(train, validation, labels, int(pad_id), max_len, info)


def _log_dropped(path: Path, enc: EncodedFile) -> None:
    empty, unlabeled = enc.info["dropped_empty_text"], enc.info["dropped_missing_label"]
    if empty or unlabeled:
        log.warning(
            "%s: dropped %d of %d rows (%d with empty text, %d without a label)",
            path.name,
            empty + unlabeled,
            enc.info["rows_read"],
            empty,
            unlabeled,
        )
