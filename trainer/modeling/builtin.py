"""TuneForge's built-in Transformer encoder: a classifier and a masked-LM variant sharing one encoder.

Design choices, each for a reason that matters in a tuning service:
- Sinusoidal positions, not learned ones: `max_seq_len` is itself a knob (8..8192), and a
  checkpoint pretrained at one length must fine-tune at another. Sinusoids have no table to
  outgrow and no parameters to leave untrained at long positions.
- Pre-LN layers with a final LayerNorm: the tuner samples aggressive learning rates with no
  warmup (warmup_ratio defaults to 0); pre-LN trains stably there, post-LN often diverges.
- Mean pooling over real tokens for the classifier: our pretraining is MLM only, so the first
  token never gets a sentence-level training signal; the mean of the token states does.
- Attention is `F.scaled_dot_product_attention` with a boolean padding mask, so CUDA picks a
  fused kernel and padded keys get exactly zero weight (appending padding changes nothing).

The classes are registered with AutoConfig / AutoModel* when this module is imported, so an
exported folder loads with `AutoModelForSequenceClassification.from_pretrained` (nothing is
loaded as remote code: the importing process must have imported this module).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

from trainer.knobs import Hyperparams
from trainer.outcome import ConfigError

MODEL_TYPE = "tuneforge-encoder"
DEFAULT_NUM_LAYERS = 4
_TARGET_HEAD_DIM = 64


def check_heads(hidden_size: int, num_heads: int) -> None:
    """Every head gets an equal slice of the width; anything else cannot be built."""
    if num_heads < 1 or hidden_size % num_heads != 0:
        raise ConfigError(
            f"hparams.hidden_size ({hidden_size}) must be divisible by hparams.num_heads ({num_heads}) "
            "for the built-in model; pick heads that divide the width"
        )


def default_num_heads(hidden_size: int) -> int:
    """Heads when the knob is null: aim for 64-wide heads (the usual sweet spot for attention
    kernels), taking the largest divisor of hidden_size not above hidden_size // 64."""
    target = max(1, hidden_size // _TARGET_HEAD_DIM)
    return next(h for h in range(target, 0, -1) if hidden_size % h == 0)


class TuneForgeEncoderConfig(PreTrainedConfig):
    # Field names follow BertConfig on purpose: surgery and the dropout knob read the same keys
    # for BERT-family models and for this one.
    model_type = MODEL_TYPE

    vocab_size: int = 30522
    hidden_size: int = 256
    num_hidden_layers: int = DEFAULT_NUM_LAYERS
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    classifier_dropout: float | int | None = None
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = True


def config_from_hparams(
    hparams: Hyperparams, vocab_size: int, pad_token_id: int | None, **extra: Any
) -> TuneForgeEncoderConfig:
    """The encoder a trial builds from scratch: every size from the knobs."""
    num_heads = hparams.num_heads if hparams.num_heads is not None else default_num_heads(hparams.hidden_size)
    check_heads(hparams.hidden_size, num_heads)
    return TuneForgeEncoderConfig(
        vocab_size=vocab_size,
        hidden_size=hparams.hidden_size,
        num_hidden_layers=hparams.num_layers if hparams.num_layers is not None else DEFAULT_NUM_LAYERS,
        num_attention_heads=num_heads,
        intermediate_size=hparams.ffn_size,
        hidden_dropout_prob=hparams.dropout,
        attention_probs_dropout_prob=hparams.dropout,
        pad_token_id=pad_token_id if pad_token_id is not None else 0,
        **extra,
    )


def sinusoidal_positions(seq_len: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[seq_len, dim] sin/cos table (Vaswani et al.). Computed per call rather than kept as a
    buffer: it is tiny next to attention, and a buffer would need re-initialising after
    from_pretrained builds the model on the meta device."""
    pos = torch.arange(seq_len, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(seq_len, dim, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.to(dtype)


class Embeddings(nn.Module):
    def __init__(self, config: TuneForgeEncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Token embeddings start at std 0.02; scaling by sqrt(d) keeps them on the same footing as
        # the unit-amplitude sinusoids so the token identity is not drowned out at initialisation.
        self.scale = math.sqrt(config.hidden_size)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        x = self.word_embeddings(input_ids) * self.scale
        if token_type_ids is not None:
            x = x + self.token_type_embeddings(token_type_ids)
        x = x + sinusoidal_positions(input_ids.shape[1], x.shape[-1], x.device, x.dtype)
        return self.dropout(x)


class SelfAttention(nn.Module):
    def __init__(self, config: TuneForgeEncoderConfig) -> None:
        super().__init__()
        check_heads(config.hidden_size, config.num_attention_heads)
        # num_heads is bookkeeping (surgery updates it when pruning); forward derives the head
        # count from the projection width, so a pruned module runs without other changes.
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        inner = self.num_heads * self.head_dim
        self.query = nn.Linear(config.hidden_size, inner)
        self.key = nn.Linear(config.hidden_size, inner)
        self.value = nn.Linear(config.hidden_size, inner)
        self.out = nn.Linear(inner, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        shape = (batch, seq, -1, self.head_dim)
        q = self.query(x).view(shape).transpose(1, 2)
        k = self.key(x).view(shape).transpose(1, 2)
        v = self.value(x).view(shape).transpose(1, 2)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout.p if self.training else 0.0
        )
        return self.out(attn.transpose(1, 2).reshape(batch, seq, -1))


class EncoderLayer(nn.Module):
    def __init__(self, config: TuneForgeEncoderConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = SelfAttention(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), mask))
        return x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(self.ffn_norm(x)))))


class TuneForgeEncoderPreTrainedModel(PreTrainedModel):
    config_class = TuneForgeEncoderConfig
    base_model_prefix = "encoder"
    _no_split_modules = ["EncoderLayer"]
    _supports_sdpa = True


class TuneForgeEncoderModel(TuneForgeEncoderPreTrainedModel):
    """Embeddings, pre-LN layers, final norm: the part pretraining and fine-tuning share."""

    def __init__(self, config: TuneForgeEncoderConfig) -> None:
        super().__init__(config)
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList([EncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        if not isinstance(value, nn.Embedding):
            raise TypeError(f"input embeddings must be an nn.Embedding, got {type(value).__name__}")
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutput:
        # [batch, 1, 1, seq] broadcasts over heads and queries: every query ignores padded keys.
        # Padded queries still attend to real keys, so no row is all-masked and nothing is NaN.
        mask = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return BaseModelOutput(last_hidden_state=self.final_norm(x))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class TuneForgeEncoderForSequenceClassification(TuneForgeEncoderPreTrainedModel):
    def __init__(self, config: TuneForgeEncoderConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels if config.num_labels is not None else 2
        self.encoder = TuneForgeEncoderModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, self.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        hidden = self.encoder(input_ids, attention_mask, token_type_ids).last_hidden_state
        logits = self.classifier(self.dropout(mean_pool(hidden, attention_mask)))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class MaskedLMHead(nn.Module):
    def __init__(self, config: TuneForgeEncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))


class TuneForgeEncoderForMaskedLM(TuneForgeEncoderPreTrainedModel):
    # Tying the decoder to the input embeddings saves vocab x hidden parameters, most of a small
    # model, and gives the rare tokens of a small corpus a shared representation.
    _tied_weights_keys = {"lm_head.decoder.weight": "encoder.embeddings.word_embeddings.weight"}

    def __init__(self, config: TuneForgeEncoderConfig) -> None:
        super().__init__(config)
        self.encoder = TuneForgeEncoderModel(config)
        self.lm_head = MaskedLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head.decoder = new_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MaskedLMOutput:
        """labels: token ids at masked positions, -100 elsewhere (the loss ignores those)."""
        hidden = self.encoder(input_ids, attention_mask, token_type_ids).last_hidden_state
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)


AutoConfig.register(MODEL_TYPE, TuneForgeEncoderConfig, exist_ok=True)
AutoModel.register(TuneForgeEncoderConfig, TuneForgeEncoderModel, exist_ok=True)
AutoModelForSequenceClassification.register(
    TuneForgeEncoderConfig, TuneForgeEncoderForSequenceClassification, exist_ok=True
)
AutoModelForMaskedLM.register(TuneForgeEncoderConfig, TuneForgeEncoderForMaskedLM, exist_ok=True)
