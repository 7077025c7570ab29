"""Reading, label maps, splits, the tokenisation cache, padding and sampling."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from trainer_test_helpers import separable_rows, write_csv
from transformers import AutoTokenizer

import trainer.data as data_mod
from trainer.data import (
    TokenizedSplit,
    epoch_order,
    eval_batches,
    label_key,
    prepare_data,
    read_table,
    resolve_source,
    sorted_labels,
    stratified_take,
)
from trainer.modeling.build import tokenizer_fingerprint
from trainer.outcome import ConfigError


@pytest.fixture(scope="module")
def tokenizer(tiny_bert_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(tiny_bert_dir), local_files_only=True)


def prepare(config: Any, tokenizer: Any, cache: Path) -> data_mod.PreparedData:
    return prepare_data(config, tokenizer, cache, tokenizer_key=tokenizer_fingerprint(tokenizer))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


WRITERS: dict[str, Callable[[Path, list[dict[str, Any]]], Path]] = {
    "csv": write_csv,
    "jsonl": write_jsonl,
    "parquet": write_parquet,
}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("int_labels", [False, True])
def test_formats_and_label_types(
    fmt: str, int_labels: bool, tmp_path: Path, make_config: Callable[..., Any], tokenizer: Any
) -> None:
    rows = separable_rows(60, seed=3, classes=3, int_labels=int_labels)
    path = WRITERS[fmt](tmp_path / f"train.{fmt}", rows)
    prepared = prepare(make_config(train=path), tokenizer, tmp_path / "cache")
    expected = ("0", "1", "2") if int_labels else ("neg", "neu", "pos")
    assert prepared.labels.names == expected
    assert len(prepared.train) + len(prepared.validation) == 60
    # Labels survive the round trip: every row's id maps back to its class name.
    names = [prepared.labels.names[i] for i in np.concatenate([prepared.train.labels, prepared.validation.labels])]
    want = Counter(str(r["label"]) for r in rows)
    assert Counter(names) == want


def test_json_array_and_tsv_and_gzip(tmp_path: Path, make_config: Callable[..., Any], tokenizer: Any) -> None:
    import gzip

    rows = separable_rows(40, seed=2)
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    tsv = tmp_path / "b.tsv"
    tsv.write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows), encoding="utf-8")
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    for path in (tmp_path / "a.json", tsv, gz):
        prepared = prepare(make_config(train=path), tokenizer, tmp_path / "cache")
        assert prepared.labels.names == ("neg", "pos")
        assert len(prepared.train) + len(prepared.validation) == 40


def test_integer_labels_sort_numerically() -> None:
    assert sorted_labels({"10", "2", "1"}) == ["1", "2", "10"]
    assert sorted_labels({"b", "a", "10"}) == ["10", "a", "b"]
    assert label_key(3) == label_key(3.0) == label_key(" 3 ") == label_key("3.0") == "3"
    assert label_key("1.5") == "1.5" and label_key("007") == "007"
    assert sorted_labels({"1", "01", "2"}) == ["01", "1", "2"]  # ties broken by text, not by set order
    assert label_key(float("nan")) is None and label_key("") is None and label_key(None) is None


def test_encoding_latin1_and_wrong_encoding(tmp_path: Path, make_config: Callable[..., Any], tokenizer: Any) -> None:
    rows = separable_rows(30, seed=4)
    rows[0]["text"] = "café très good"
    path = write_csv(tmp_path / "latin.csv", rows, encoding="latin-1")
    prepared = prepare(make_config(train=path, dataset={"encoding": "latin-1"}), tokenizer, tmp_path / "cache")
    assert len(prepared.train) + len(prepared.validation) == 30
    with pytest.raises(ConfigError, match=r"dataset.encoding: latin.csv is not valid utf-8"):
        prepare(make_config(train=path), tokenizer, tmp_path / "cache")


def test_named_dataset_resolves_through_registry(make_config: Callable[..., Any]) -> None:
    config = make_config(dataset={"kind": "named", "name": "tweets-sentiment"})
    source = resolve_source(config)
    assert (source.text_column, source.label_column, source.encoding) == ("text", "sentiment", "latin-1")
    table = read_table(source.train, source.columns, source.encoding)
    assert set(label_key(v) for v in table["sentiment"]) >= {"negative", "neutral", "positive"}
    with pytest.raises(ConfigError, match="dataset.name: unknown dataset name 'nope'"):
        resolve_source(make_config(dataset={"kind": "named", "name": "nope"}))


def test_text_pair_gives_token_type_ids(tmp_path: Path, make_config: Callable[..., Any], tokenizer: Any) -> None:
    rows = [{"a": r["text"], "b": "the film", "label": r["label"]} for r in separable_rows(30)]
    path = write_csv(tmp_path / "pairs.csv", rows)
    config = make_config(train=path, dataset={"text_column": "a", "text_pair_column": "b"})
    prepared = prepare(config, tokenizer, tmp_path / "cache")
    batch = prepared.train.collate(np.arange(4), prepared.pad_id)
    assert "token_type_ids" in batch
    # The second segment ([SEP]-terminated 'the film') has type 1.
    assert (batch["token_type_ids"].sum(dim=1) == 3).all()


def test_drops_empty_text_and_missing_labels(
    tmp_path: Path, make_config: Callable[..., Any], tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    rows = separable_rows(40, seed=5)
    rows[0]["text"] = "   "
    rows[1]["text"] = ""
    rows[2]["label"] = ""
    path = write_csv(tmp_path / "holes.csv", rows)
    with caplog.at_level("WARNING"):
        prepared = prepare(make_config(train=path), tokenizer, tmp_path / "cache")
    assert len(prepared.train) + len(prepared.validation) == 37
    assert prepared.info["dropped_empty_text"] == 2 and prepared.info["dropped_missing_label"] == 1
    assert "dropped 3 of 40 rows (2 with empty text, 1 without a label)" in caplog.text


def test_validation_split_is_stratified_and_seeded(
    tmp_path: Path, make_config: Callable[..., Any], tokenizer: Any
) -> None:
    # 70/20/10 class mix; a 20% split must keep it within one row per class.
    rows = [{"text": f"good film {i}", "label": lab} for i, lab in enumerate(["a"] * 70 + ["b"] * 20 + ["c"] * 10)]
    path = write_csv(tmp_path / "mix.csv", rows)
    config = make_config(train=path, data={"validation_fraction": 0.2})
    first = prepare(config, tokenizer, tmp_path / "cache")
    assert len(first.validation) == 20 and len(first.train) == 80
    assert np.bincount(first.validation.labels).tolist() == [14, 4, 2]
    again = prepare(config, tokenizer, tmp_path / "cache")
    assert np.array_equal(first.validation.starts, again.validation.starts)  # same seed, same split
    assert not set(first.validation.starts) & set(first.train.starts)  # disjoint
    other = prepare(make_config(train=path, data={"validation_fraction": 0.2}, run={"seed": 7}), tokenizer,
                    tmp_path / "cache")
    assert not np.array_equal(first.validation.starts, other.validation.starts)


def test_max_examples_are_stratified_samples(tmp_path: Path, make_config: Callable[..., Any], tokenizer: Any) -> None:
    rows = [{"text": f"bad plot {i}", "label": lab} for i, lab in enumerate(["x"] * 90 + ["y"] * 30 + ["z"] * 3)]
    path = write_csv(tmp_path / "big.csv", rows)
    caps = {"validation_fraction": 0.2, "max_train_examples": 10, "max_eval_examples": 5}
    config = make_config(train=path, data=caps)
    prepared = prepare(config, tokenizer, tmp_path / "cache")
    assert len(prepared.train) == 10 and len(prepared.validation) == 5
    counts = np.bincount(prepared.train.labels, minlength=3)
    assert counts.min() >= 1  # the rare class is kept
    assert counts[0] > counts[1] >= counts[2]


def test_stratified_take_exact_totals() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0] * 7 + [1] * 5 + [2] * 1)
    take, rest = stratified_take(labels, 4, rng, keep_one_each=True)
    assert len(take) == 4 and len(rest) == 9
    assert 2 not in labels[take]  # a singleton class stays in training
    assert sorted(np.concatenate([take, rest]).tolist()) == list(range(13))


def test_cache_hit_on_second_trial(
    tmp_path: Path, make_config: Callable[..., Any], tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = data_mod._tokenize

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(data_mod, "_tokenize", counting)
    cache = tmp_path / "cache"
    first = prepare(make_config(), tokenizer, cache)
    assert calls and not first.info["cache_hit"]
    n_calls = len(calls)
    files = list((cache / "tokens").glob("*.safetensors"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    # A different trial of the same study: other knobs, same data and length -> no tokenisation.
    second = prepare(make_config(hparams={"learning_rate": 1e-4, "batch_size": 8}), tokenizer, cache)
    assert len(calls) == n_calls and second.info["cache_hit"]
    assert files[0].stat().st_mtime_ns == mtime
    assert np.array_equal(first.train.starts, second.train.starts)
    assert np.array_equal(first.train.ids, second.train.ids)
    # Another max_seq_len is another entry.
    prepare(make_config(hparams={"max_seq_len": 16}), tokenizer, cache)
    assert len(calls) > n_calls
    assert len(list((cache / "tokens").glob("*.safetensors"))) == 2
    assert not list((cache / "tokens").glob(".*tmp"))  # no temp files left behind


def test_cache_tokenises_once_under_concurrency(
    tmp_path: Path, make_config: Callable[..., Any], tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = data_mod._tokenize

    def slow_counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        threading.Event().wait(0.2)  # widen the race window
        return real(*args, **kwargs)

    monkeypatch.setattr(data_mod, "_tokenize", slow_counting)
    config = make_config()
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda: results.append(prepare(config, tokenizer, tmp_path / "cache")))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(calls) == 1
    assert all(np.array_equal(r.train.ids, results[0].train.ids) for r in results)


def test_damaged_cache_entry_is_rebuilt(tmp_path: Path, make_config: Callable[..., Any], tokenizer: Any) -> None:
    cache = tmp_path / "cache"
    first = prepare(make_config(), tokenizer, cache)
    (entry,) = (cache / "tokens").glob("*.safetensors")
    entry.write_bytes(b"garbage")
    again = prepare(make_config(), tokenizer, cache)
    assert not again.info["cache_hit"]
    assert np.array_equal(first.train.ids, again.train.ids)


def test_dynamic_padding() -> None:
    ids = np.arange(1, 11, dtype=np.int32)  # rows: [1,2,3] [4] [5..10]
    offsets = np.array([0, 3, 4, 10])
    split = TokenizedSplit(
        ids=ids, starts=offsets[:-1], lengths=np.diff(offsets), labels=np.array([0, 1, 0]), type_ids=None
    )
    batch = split.collate(np.array([0, 1]), pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]  # padded to this batch's longest, not globally
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [0, 1]
    wide = split.collate(np.array([2, 1]), pad_id=99, pad_to_multiple=8)
    assert wide["input_ids"].shape == (2, 8)
    assert wide["input_ids"][1].tolist() == [4] + [99] * 7
    assert wide["attention_mask"].sum(1).tolist() == [6, 1]
    # Evaluation batches group rows of similar length.
    assert [b.tolist() for b in eval_batches(split, 2)] == [[1, 0], [2]]


def _split_with_labels(labels: list[int]) -> TokenizedSplit:
    n = len(labels)
    return TokenizedSplit(
        ids=np.ones(n, dtype=np.int32), starts=np.arange(n), lengths=np.ones(n, dtype=np.int64),
        labels=np.array(labels), type_ids=None,
    )


def test_class_balanced_sampling() -> None:
    split = _split_with_labels([0] * 900 + [1] * 100)
    plain = epoch_order(split, seed=0, epoch=0, class_balanced=False)
    assert sorted(plain.tolist()) == list(range(1000))  # a permutation
    drawn = epoch_order(split, seed=0, epoch=0, class_balanced=True)
    assert len(drawn) == 1000
    share = float(np.mean(split.labels[drawn] == 1))
    assert 0.42 < share < 0.58  # ~half minority, against 10% without balancing
    again = epoch_order(split, seed=0, epoch=0, class_balanced=True)
    assert np.array_equal(drawn, again)
    assert not np.array_equal(drawn, epoch_order(split, seed=0, epoch=1, class_balanced=True))


# ---- bad data: ConfigError with a message that says what to fix ------------------------------------


def test_unknown_column_names_it_and_lists_available(
    tmp_path: Path, make_config: Callable[..., Any], tokenizer: Any
) -> None:
    config = make_config(dataset={"text_column": "body"})
    with pytest.raises(ConfigError, match=r"no column 'body'.*available columns: 'text', 'label'"):
        prepare(config, tokenizer, tmp_path / "cache")
    path = write_parquet(tmp_path / "t.parquet", separable_rows(20))
    with pytest.raises(ConfigError, match=r"no column 'Label' \(did you mean 'label'\?\)"):
        prepare(make_config(train=path, dataset={"label_column": "Label"}), tokenizer, tmp_path / "cache")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", "", "the file is empty"),
        ("header.csv", "text,label\n", "header but no rows"),
        ("empty.jsonl", "\n\n", "the file is empty"),
        ("data.xlsx", "PK...", "unreadable format '.xlsx'"),
        ("bad.parquet", "not parquet", "unreadable parquet file"),
        ("bad.jsonl", '{"text": "a", "label": 1}\n{oops\n', "unreadable JSON lines"),
        ("single.csv", "text,label\ngood film,pos\nnice film,pos\ngreat,pos\n", "single class ('pos')"),
        ("nolabels.csv", "text,label\ngood film,\nbad film,\n", "no usable rows"),
    ],
)
def test_bad_files(
    name: str, content: str, message: str, tmp_path: Path, make_config: Callable[..., Any], tokenizer: Any
) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare(make_config(train=path), tokenizer, tmp_path / "cache")


def test_missing_file(tmp_path: Path, make_config: Callable[..., Any], tokenizer: Any) -> None:
    with pytest.raises(ConfigError, match="dataset.train: file not found"):
        prepare(make_config(train=tmp_path / "nope.csv"), tokenizer, tmp_path / "cache")


def test_validation_labels_unseen_in_training(tmp_path: Path, make_config: Callable[..., Any], tokenizer: Any) -> None:
    train = write_csv(tmp_path / "train.csv", separable_rows(20))
    val_rows = separable_rows(10) + [{"text": "okay film", "label": "meh"}]
    val = write_csv(tmp_path / "val.csv", val_rows)
    with pytest.raises(ConfigError, match=r"labels 'meh' in val.csv never occur in train.csv"):
        prepare(make_config(train=train, validation=val), tokenizer, tmp_path / "cache")
    ok = write_csv(tmp_path / "val_ok.csv", separable_rows(10, seed=9))
    prepared = prepare(make_config(train=train, validation=ok), tokenizer, tmp_path / "cache")
    assert len(prepared.train) == 20 and len(prepared.validation) == 10
