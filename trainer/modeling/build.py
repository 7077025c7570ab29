"""Build the model and tokenizer a trial fine-tunes, from its `TrialConfig`.

Interface for the loop, checkpoints, CLI and service. torch and transformers are imported
inside the functions that need them, so `model_depth_and_heads` stays cheap for the service.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config import BuiltinModel, ModelRef, NamedModel, PretrainedModel, TrialConfig

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@dataclass
class BuiltModel:
    model: torch.nn.Module
    """Called as model(input_ids=, attention_mask=, token_type_ids=optional); .logits is [batch, num_labels]."""
    tokenizer: PreTrainedTokenizerBase
    num_layers: int
    """Encoder layers after truncation."""
    trainable_params: int


def load_tokenizer(config: TrialConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of the trial's model; cheap, used before the model is built."""
    raise NotImplementedError


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Stable hash of the vocabulary and the settings that change token ids (tokenisation cache key)."""
    raise NotImplementedError


def build_model(config: TrialConfig, num_labels: int, id2label: dict[int, str]) -> BuiltModel:
    """Load or build the classifier and apply the knobs: truncate -> prune heads -> dropout -> freeze."""
    raise NotImplementedError


def export_model(built: BuiltModel, out_dir: Path, id2label: dict[int, str]) -> Path:
    """Write a folder that `AutoModelForSequenceClassification.from_pretrained` loads."""
    raise NotImplementedError


def model_depth_and_heads(model_ref: ModelRef) -> tuple[int, int, int] | None:
    """(num_layers, num_heads, hidden_size) from config.json alone; None for the built-in model."""
    raise NotImplementedError


__all__ = [
    "BuiltModel",
    "BuiltinModel",
    "NamedModel",
    "PretrainedModel",
    "build_model",
    "export_model",
    "load_tokenizer",
    "model_depth_and_heads",
    "tokenizer_fingerprint",
]
