"""Build the model and tokenizer a trial fine-tunes, from its `TrialConfig`.

Interface for the loop, checkpoints, CLI and service. torch and transformers are imported
inside the functions that need them, so `model_depth_and_heads` stays cheap for the service
(it reads config.json and nothing else).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from trainer import registry
from trainer.config import BuiltinModel, ModelRef, NamedModel, PretrainedModel, TrialConfig
from trainer.outcome import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_TOKENIZER_MODEL = "all-minilm-l6-v2"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")


@dataclass
class BuiltModel:
    model: torch.nn.Module
    """Called as model(input_ids=, attention_mask=, token_type_ids=optional); .logits is [batch, num_labels]."""
    tokenizer: PreTrainedTokenizerBase
    num_layers: int
    """Encoder layers after truncation."""
    trainable_params: int


def _model_dir(path: str | Path, field: str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{field}: {str(path)!r} is not a model folder (no config.json there)")
    return folder


def _named_dir(name: str, field: str) -> Path:
    try:
        return registry.model_path(name)
    except registry.UnknownName as exc:
        raise ConfigError(f"{field}: {exc}") from None


def model_dir(ref: PretrainedModel | NamedModel) -> Path:
    """The local folder behind a pretrained or named model ref."""
    if isinstance(ref, PretrainedModel):
        return _model_dir(ref.path, "model.path")
    return _named_dir(ref.name, "model.name")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def tokenizer_dir(ref: ModelRef) -> Path:
    """Where the tokenizer of a model ref is read from.

    Built-in model: `tokenizer` (a folder, else a registry name), else the tokenizer saved with
    `checkpoint`, else the packaged MiniLM one.
    """
    if not isinstance(ref, BuiltinModel):
        return model_dir(ref)
    return builtin_tokenizer_dir(ref.tokenizer, ref.checkpoint)


def builtin_tokenizer_dir(tokenizer: str | None, checkpoint: str | None = None) -> Path:
    """The built-in model's tokenizer: `tokenizer` (a folder, else a registry name), else the one
    saved with `checkpoint`, else the packaged MiniLM one. Also used by pretraining."""
    if tokenizer is not None:
        folder = Path(tokenizer)
        if folder.is_dir():
            if not _has_tokenizer(folder):
                raise ConfigError(f"model.tokenizer: {tokenizer!r} holds no tokenizer files")
            return folder
        if tokenizer in registry.MODELS:
            return _named_dir(tokenizer, "model.tokenizer")
        raise ConfigError(
            f"model.tokenizer: {tokenizer!r} is neither a folder nor a known model name "
            f"({', '.join(sorted(registry.MODELS))})"
        )
    if checkpoint is not None:
        folder = _model_dir(checkpoint, "model.checkpoint")
        if _has_tokenizer(folder):
            return folder
    return _named_dir(DEFAULT_TOKENIZER_MODEL, "model.tokenizer")


# Tokenizers kept loaded between trials; off unless a long-lived process turns it on
# (`keep_tokenizers_warm`, called by the worker's warm slots). Loading MiniLM's tokenizer
# costs 0.3-0.7 s per trial on a busy CPU, a large part of the gap between two trials on a
# slot (its fingerprint is remembered by `loop.cached_fingerprint`). Keyed by folder and
# file times, so a changed folder is read again.
_WARM_TOKENIZERS: dict[tuple[str, tuple[int, ...]], PreTrainedTokenizerBase] | None = None


def keep_tokenizers_warm() -> None:
    """Keep every tokenizer this process loads for the next trial."""
    global _WARM_TOKENIZERS
    if _WARM_TOKENIZERS is None:
        _WARM_TOKENIZERS = {}


def tokenizer_from(folder: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    key = None
    if _WARM_TOKENIZERS is not None:
        files = sorted(f for f in folder.iterdir() if f.is_file())
        key = (str(folder.resolve()), tuple(f.stat().st_mtime_ns for f in files))
        if key in _WARM_TOKENIZERS:
            return _WARM_TOKENIZERS[key]
    # local_files_only: a folder name that happens to look like a hub id must never go online.
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if key is not None and _WARM_TOKENIZERS is not None:
        _WARM_TOKENIZERS[key] = tokenizer
    return tokenizer


def load_tokenizer(config: TrialConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of the trial's model; cheap, used before the model is built."""
    return tokenizer_from(tokenizer_dir(config.model))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Stable hash of the vocabulary and the settings that decide token ids (tokenisation cache key).

    The serialised backend covers vocab, added tokens, normaliser (lower-casing, accents),
    pre-tokeniser and the special-token template. Its truncation/padding state is dropped:
    calling the tokenizer changes it, but the cache key must not change with it.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state: dict[str, Any]
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = {"vocab": sorted(tokenizer.get_vocab().items())}
    state["tuneforge"] = {
        "class": type(tokenizer).__name__,
        "special_ids": sorted(tokenizer.all_special_ids),
        "pad_token_id": tokenizer.pad_token_id,
        "padding_side": tokenizer.padding_side,
        "truncation_side": tokenizer.truncation_side,
    }
    blob = json.dumps(state, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _labels(num_labels: int, id2label: dict[int, str]) -> dict[str, Any]:
    if len(id2label) != num_labels:
        raise ConfigError(f"id2label has {len(id2label)} labels but num_labels is {num_labels}")
    id2label = {int(k): str(v) for k, v in id2label.items()}
    return {
        "num_labels": num_labels,
        "id2label": id2label,
        "label2id": {v: k for k, v in id2label.items()},
    }


def _load_classifier(folder: Path, labels: dict[str, Any], field: str) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForSequenceClassification

    import trainer.modeling.builtin  # noqa: F401  registers the built-in model type with the Auto classes

    try:
        return AutoModelForSequenceClassification.from_pretrained(
            str(folder),
            # A different label count means a different head shape: that head is re-initialised
            # instead of failing, which is what fine-tuning a classifier on new labels needs.
            ignore_mismatched_sizes=True,
            local_files_only=True,
            # transformers 5 defaults to the checkpoint's dtype; training keeps fp32 master
            # weights and gets bf16 from autocast.
            dtype=torch.float32,
            **labels,
        )
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(f"{field}: cannot load {str(folder)!r} as a sequence classifier: {exc}") from exc


def _builtin(
    ref: BuiltinModel, config: TrialConfig, tokenizer: PreTrainedTokenizerBase, labels: dict[str, Any]
) -> PreTrainedModel:
    from trainer.modeling import builtin, surgery

    hp = config.hparams
    if ref.checkpoint is None:
        cfg = builtin.config_from_hparams(hp, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **labels)
        return builtin.TuneForgeEncoderForSequenceClassification(cfg)

    folder = _model_dir(ref.checkpoint, "model.checkpoint")
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if raw.get("model_type") != builtin.MODEL_TYPE:
        raise ConfigError(
            f"model.checkpoint: {ref.checkpoint!r} is a {raw.get('model_type')!r} model, not one written by "
            "`tuneforge pretrain`; use a pretrained model ref for it"
        )
    if raw.get("vocab_size") != len(tokenizer):
        raise ConfigError(
            f"model.tokenizer: the tokenizer has {len(tokenizer)} tokens but the checkpoint's vocabulary has "
            f"{raw.get('vocab_size')}; use the tokenizer the checkpoint was pretrained with"
        )
    # A checkpoint fixes the widths; the depth and head knobs still apply, as surgery.
    for knob, key in (("hidden_size", "hidden_size"), ("ffn_size", "intermediate_size")):
        if getattr(hp, knob) != raw.get(key):
            log.warning("hparams.%s=%s ignored: checkpoint %s has %s=%s", knob, getattr(hp, knob), folder, key,
                        raw.get(key))
    model = _load_classifier(folder, labels, "model.checkpoint")
    if hp.num_layers is not None:
        surgery.truncate_layers(model, hp.num_layers)
    if hp.num_heads is not None:
        surgery.prune_heads(model, hp.num_heads)
    return model


def build_model(config: TrialConfig, num_labels: int, id2label: dict[int, str]) -> BuiltModel:
    """Load or build the classifier and apply the knobs: truncate -> prune heads -> dropout -> freeze.

    Initialisation (the fresh head, a from-scratch built-in model) is seeded from
    `config.run.seed` on a forked RNG, so it is reproducible without touching the caller's RNG.
    """
    import torch

    from trainer.modeling import surgery

    hp = config.hparams
    labels = _labels(num_labels, id2label)
    tokenizer = load_tokenizer(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        if isinstance(config.model, BuiltinModel):
            model = _builtin(config.model, config, tokenizer, labels)
        else:
            model = _load_classifier(model_dir(config.model), labels, f"model.{_ref_field(config.model)}")
            if hp.num_layers is not None:
                surgery.truncate_layers(model, hp.num_layers)
            if hp.num_heads is not None:
                surgery.prune_heads(model, hp.num_heads)
    surgery.set_dropout(model, hp.dropout)
    trainable = surgery.freeze(model, hp.unfreeze_depth)
    return BuiltModel(
        model=model, tokenizer=tokenizer, num_layers=surgery.count_layers(model), trainable_params=trainable
    )


def _ref_field(ref: PretrainedModel | NamedModel) -> str:
    return "path" if isinstance(ref, PretrainedModel) else "name"


def export_model(built: BuiltModel, out_dir: Path, id2label: dict[int, str]) -> Path:
    """Write a folder that `AutoModelForSequenceClassification.from_pretrained` loads.

    Head-pruned layers are re-expanded with zero weights on a copy (transformers 5 cannot load
    fewer heads than the config names); the copy computes the same logits. A built-in model's
    folder loads in any process that has imported `trainer.modeling.builtin`.
    """
    from trainer.modeling import surgery

    model = cast("PreTrainedModel", getattr(built.model, "_orig_mod", built.model))  # unwrap torch.compile
    if surgery.is_pruned(model):
        model = copy.deepcopy(model)
        surgery.restore_pruned_heads(model)
    labels = _labels(len(id2label), id2label)
    model.config.id2label = labels["id2label"]
    model.config.label2id = labels["label2id"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    built.tokenizer.save_pretrained(str(out_dir))
    return out_dir


_DEPTH_KEYS = ("num_hidden_layers", "n_layers", "num_layers")
_HEAD_KEYS = ("num_attention_heads", "n_heads")
_HIDDEN_KEYS = ("hidden_size", "dim", "d_model")


def model_depth_and_heads(model_ref: ModelRef) -> tuple[int, int, int] | None:
    """(num_layers, num_heads, hidden_size) from config.json alone; None for the built-in model,
    whose sizes come from the knobs. Raises ConfigError for a missing or unreadable model."""
    if isinstance(model_ref, BuiltinModel):
        return None
    path = model_dir(model_ref) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.{_ref_field(model_ref)}: cannot read {path}: {exc}") from None
    values = []
    for keys in (_DEPTH_KEYS, _HEAD_KEYS, _HIDDEN_KEYS):
        value = next((raw[k] for k in keys if isinstance(raw.get(k), int)), None)
        if value is None:
            raise ConfigError(f"model.{_ref_field(model_ref)}: {path} names none of {', '.join(keys)}")
        values.append(value)
    return values[0], values[1], values[2]


__all__ = [
    "BuiltModel",
    "build_model",
    "builtin_tokenizer_dir",
    "export_model",
    "load_tokenizer",
    "model_depth_and_heads",
    "model_dir",
    "tokenizer_dir",
    "tokenizer_fingerprint",
]
