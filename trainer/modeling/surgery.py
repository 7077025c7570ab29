"""Structural knobs applied to an encoder classifier: layer truncation, head pruning, dropout, freezing.

Written against transformers 5 (no `prune_heads` there). Architectures are recognised by
structure, not by model_type, so BERT look-alikes (RoBERTa, XLM-R, ELECTRA, CamemBERT, MiniLM...)
work without being listed; anything unrecognised gets a ConfigError naming the knob instead of a
crash deep inside a forward pass.

Head selection is by importance, not position. Heads are permutation-symmetric: "the first N"
is an arbitrary choice that can throw away the heads doing the work. A head's importance here
is the Frobenius norm of its OV circuit, W_o[:, h] @ W_v[h, :]: the linear map from what the
head attends to onto what it writes into the residual stream. Since attention weights sum to 1,
that map bounds how much the head can move the output, whatever it attends to. It is data-free
(no batch, no gradients), cheap, and deterministic (ties go to the lower index), so a resumed
trial rebuilding the model from the same pretrained weights keeps exactly the same heads.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from trainer.knobs import UnfreezeDepth
from trainer.outcome import ConfigError


@dataclass(frozen=True)
class EncoderArch:
    """Where an architecture keeps its layers and attention projections.

    Paths are dotted attribute paths: `layers` from the base model, the rest from one layer.
    """

    name: str
    layers: str
    attention: str
    query: str
    key: str
    value: str
    output: str
    head_count_attr: str
    head_dim_attr: str
    all_head_size_attr: str | None
    top: tuple[str, ...]
    """Base-model modules above the last layer; they train with the classification head."""


ARCHITECTURES: tuple[EncoderArch, ...] = (
    EncoderArch(
        name="BERT-style (encoder.layer[i].attention.self.query/key/value, attention.output.dense)",
        layers="encoder.layer",
        attention="attention.self",
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        output="attention.output.dense",
        head_count_attr="num_attention_heads",
        head_dim_attr="attention_head_size",
        all_head_size_attr="all_head_size",
        top=("pooler",),
    ),
    EncoderArch(
        name="DistilBERT (transformer.layer[i].attention.q_lin/k_lin/v_lin/out_lin)",
        layers="transformer.layer",
        attention="attention",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        output="attention.out_lin",
        head_count_attr="n_heads",
        head_dim_attr="attention_head_size",
        all_head_size_attr=None,
        top=(),
    ),
    EncoderArch(
        name="TuneForge built-in (layers[i].attention.query/key/value/out)",
        layers="layers",
        attention="attention",
        query="attention.query",
        key="attention.key",
        value="attention.value",
        output="attention.out",
        head_count_attr="num_heads",
        head_dim_attr="head_dim",
        all_head_size_attr=None,
        top=("final_norm",),
    ),
)

SUPPORTED = "; ".join(a.name for a in ARCHITECTURES)


def _get(root: nn.Module, path: str) -> nn.Module | None:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def _set(root: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = _get(root, parent_path) if parent_path else root
    if parent is None:
        raise AssertionError(f"{path}: parent vanished")  # _get on the same path succeeded before
    setattr(parent, name, value)


def base_model(model: nn.Module) -> nn.Module:
    """The encoder under a task head (`model.bert`, `model.encoder`...), or the model itself."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def _unsupported(model: nn.Module, knob: str) -> ConfigError:
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    return ConfigError(
        f"hparams.{knob}: architecture {model_type!r} is not supported for this knob; "
        f"supported: {SUPPORTED}"
    )


def _attention_parts(layer: nn.Module, arch: EncoderArch) -> tuple[nn.Module, list[nn.Linear]] | None:
    attn = _get(layer, arch.attention)
    linears = [_get(layer, p) for p in (arch.query, arch.key, arch.value, arch.output)]
    if attn is None or not all(isinstance(m, nn.Linear) for m in linears):
        return None
    if not isinstance(getattr(attn, arch.head_count_attr, None), int):
        return None
    if not isinstance(getattr(attn, arch.head_dim_attr, None), int):
        return None
    return attn, [m for m in linears if isinstance(m, nn.Linear)]


def match_arch(model: nn.Module, *, need_attention: bool = False) -> tuple[EncoderArch, nn.ModuleList] | None:
    """The architecture entry that matches the model, and its layer list; None if none does."""
    base = base_model(model)
    for arch in ARCHITECTURES:
        layers = _get(base, arch.layers)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            continue
        if need_attention and _attention_parts(layers[0], arch) is None:
            continue
        return arch, layers
    return None


def find_arch(model: nn.Module, knob: str, *, need_attention: bool = False) -> tuple[EncoderArch, nn.ModuleList]:
    """As match_arch, but a ConfigError naming `knob` when the model is not supported."""
    found = match_arch(model, need_attention=need_attention)
    if found is None:
        raise _unsupported(model, knob)
    return found


def count_layers(model: nn.Module) -> int:
    """Encoder layers; for an architecture surgery does not know, what its config says. Such a
    model still trains when no structural knob is set, so counting must not fail on it."""
    found = match_arch(model)
    if found is not None:
        return len(found[1])
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return layers if isinstance(layers, int) else 0


def is_pruned(model: nn.Module) -> bool:
    """Whether any layer has fewer heads than the config names (export must re-expand it)."""
    full = getattr(getattr(model, "config", None), "num_attention_heads", None)
    found = match_arch(model, need_attention=True)
    if found is None or not isinstance(full, int):
        return False
    arch, layers = found
    for layer in layers:
        parts = _attention_parts(layer, arch)
        if parts is not None and getattr(parts[0], arch.head_count_attr) < full:
            return True
    return False


def truncate_layers(model: nn.Module, num_layers: int) -> None:
    """Keep the first `num_layers` encoder layers: the lower layers carry the general features a
    new task builds on, and the embeddings feed them directly."""
    arch, layers = find_arch(model, "num_layers")
    depth = len(layers)
    if num_layers > depth:
        raise ConfigError(f"hparams.num_layers ({num_layers}) exceeds the model's {depth} encoder layers")
    if num_layers == depth:
        return
    _set(base_model(model), arch.layers, nn.ModuleList(list(layers)[:num_layers]))
    config = getattr(model, "config", None)
    if config is not None:
        # Written back so the exported config.json builds exactly the layers that are saved.
        config.num_hidden_layers = num_layers


def _head_rows(heads: list[int], head_dim: int, device: torch.device) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim, device=device) for h in heads])


def head_importance(model: nn.Module) -> list[torch.Tensor]:
    """Per layer, a [heads] tensor: ||W_o[:, h] @ W_v[h, :]||_F (see the module docstring)."""
    arch, layers = find_arch(model, "num_heads", need_attention=True)
    scores = []
    with torch.no_grad():
        for layer in layers:
            parts = _attention_parts(layer, arch)
            if parts is None:
                raise _unsupported(model, "num_heads")
            attn, (_, _, value, output) = parts
            heads, dim = getattr(attn, arch.head_count_attr), getattr(attn, arch.head_dim_attr)
            wv = value.weight.float().view(heads, dim, -1)  # [h, d, hidden_in]
            wo = output.weight.float().view(output.out_features, heads, dim).transpose(0, 1)  # [h, hidden_out, d]
            scores.append(torch.linalg.matrix_norm(torch.bmm(wo, wv)).cpu())
    return scores


def _rebuild_linear(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None and new.bias is not None:
            new.bias.copy_(bias)
    new.train(old.training)
    return new


def attention_heads(model: nn.Module) -> list[int]:
    """Heads currently present in each layer (after any pruning)."""
    arch, layers = find_arch(model, "num_heads", need_attention=True)
    out = []
    for layer in layers:
        parts = _attention_parts(layer, arch)
        if parts is None:
            raise _unsupported(model, "num_heads")
        out.append(getattr(parts[0], arch.head_count_attr))
    return out


def prune_heads(model: nn.Module, num_heads: int) -> dict[int, list[int]]:
    """Keep the `num_heads` most important heads of every layer; returns the kept heads per layer.

    The query/key/value output rows and the output projection's input columns of the dropped
    heads are removed. The config keeps the original head count: forward derives the count from
    the projection width, and `restore_pruned_heads` needs it to re-expand for export.
    """
    arch, layers = find_arch(model, "num_heads", need_attention=True)
    importance = head_importance(model)
    kept: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        parts = _attention_parts(layer, arch)
        if parts is None:
            raise _unsupported(model, "num_heads")
        attn, (query, key, value, output) = parts
        heads, dim = getattr(attn, arch.head_count_attr), getattr(attn, arch.head_dim_attr)
        if num_heads > heads:
            raise ConfigError(f"hparams.num_heads ({num_heads}) exceeds the model's {heads} attention heads per layer")
        if query.out_features != heads * dim or output.in_features != heads * dim:
            raise _unsupported(model, "num_heads")
        order = sorted(range(heads), key=lambda h: (-float(importance[i][h]), h))
        keep = sorted(order[:num_heads])  # original order, so exports and logs read naturally
        kept[i] = keep
        if num_heads == heads:
            continue
        rows = _head_rows(keep, dim, query.weight.device)
        for path, lin in ((arch.query, query), (arch.key, key), (arch.value, value)):
            bias = lin.bias[rows] if lin.bias is not None else None
            _set(layer, path, _rebuild_linear(lin, lin.weight[rows], bias))
        _set(layer, arch.output, _rebuild_linear(output, output.weight[:, rows], output.bias))
        setattr(attn, arch.head_count_attr, num_heads)
        if arch.all_head_size_attr and hasattr(attn, arch.all_head_size_attr):
            setattr(attn, arch.all_head_size_attr, num_heads * dim)
    return kept


def restore_pruned_heads(model: nn.Module) -> bool:
    """Re-expand pruned layers to the config's head count with zero weights, in place.

    transformers 5 cannot load a checkpoint whose layers have fewer heads than its config says.
    A re-inserted head has zero value rows and bias, so it outputs exactly 0, and zero output
    columns keep it that way: the model computes what the pruned one did. Heads are
    interchangeable, so the kept ones go first. Returns whether anything was expanded.
    """
    config = getattr(model, "config", None)
    full = getattr(config, "num_attention_heads", None)
    if not isinstance(full, int):
        return False
    arch, layers = find_arch(model, "num_heads", need_attention=True)
    changed = False
    for layer in layers:
        parts = _attention_parts(layer, arch)
        if parts is None:
            raise _unsupported(model, "num_heads")
        attn, (query, key, value, output) = parts
        heads, dim = getattr(attn, arch.head_count_attr), getattr(attn, arch.head_dim_attr)
        if heads >= full:
            continue
        width = heads * dim
        for path, lin in ((arch.query, query), (arch.key, key), (arch.value, value)):
            weight = lin.weight.new_zeros(full * dim, lin.in_features)
            weight[:width] = lin.weight.detach()
            bias = None
            if lin.bias is not None:
                bias = lin.bias.new_zeros(full * dim)
                bias[:width] = lin.bias.detach()
            _set(layer, path, _rebuild_linear(lin, weight, bias))
        weight = output.weight.new_zeros(output.out_features, full * dim)
        weight[:, :width] = output.weight.detach()
        bias = output.bias.detach() if output.bias is not None else None
        _set(layer, arch.output, _rebuild_linear(output, weight, bias))
        setattr(attn, arch.head_count_attr, full)
        if arch.all_head_size_attr and hasattr(attn, arch.all_head_size_attr):
            setattr(attn, arch.all_head_size_attr, full * dim)
        changed = True
    return changed


# Config keys that hold a dropout probability, across the supported families; set only where
# the config already has them, so export writes back what the modules now use.
_DROPOUT_KEYS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "dropout",
    "attention_dropout",
    "seq_classif_dropout",
)


def set_dropout(model: nn.Module, p: float) -> None:
    """Hidden, attention and head dropout all become `p`.

    Modules copy the probability at construction, so changing the config alone does nothing:
    every nn.Dropout is updated (attention reads its module's `.p` at forward time too).
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    config = getattr(model, "config", None)
    if config is None:
        return
    present = config.to_dict()
    for key in _DROPOUT_KEYS:
        if key in present:
            setattr(config, key, p)


def _params(module: nn.Module | None) -> Iterator[nn.Parameter]:
    return module.parameters() if module is not None else iter(())


def freeze(model: nn.Module, unfreeze_depth: UnfreezeDepth) -> int:
    """Set requires_grad per `unfreeze_depth`; returns the number of trainable parameters.

    'all': everything trains, embeddings included. k: the top k encoder layers train, plus the
    head. The head is everything outside the base model plus the base model's modules above the
    last layer (BERT's pooler, the built-in final norm): the classifier reads the pooler, which
    sentence-embedding checkpoints often ship untrained, so a frozen pooler would leave depth 0
    as a linear probe on a random projection. Everything else (embeddings, lower layers) is frozen.
    """
    if unfreeze_depth == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return sum(p.numel() for p in model.parameters())
    arch, layers = find_arch(model, "unfreeze_depth")
    depth = len(layers)
    if unfreeze_depth > depth:
        raise ConfigError(
            f"hparams.unfreeze_depth ({unfreeze_depth}) exceeds the model's {depth} encoder layers "
            "(counted after num_layers truncation)"
        )
    base = base_model(model)
    trainable: set[int] = set()
    for layer in list(layers)[depth - unfreeze_depth :]:
        trainable.update(id(p) for p in layer.parameters())
    for path in arch.top:
        trainable.update(id(p) for p in _params(_get(base, path)))
    in_base = {id(p) for p in base.parameters()}
    trainable.update(id(p) for p in model.parameters() if id(p) not in in_base)
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
