"""The config one trial runs with: model, data, every knob resolved, and fixed settings.

The service builds it (spec + sampled params) and sends it in a lease; the trainer
runs it. It is plain data: nothing in it is imported or evaluated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainer.knobs import Hyperparams

MetricName = Literal["accuracy", "f1_macro", "loss"]
METRIC_NAMES: tuple[str, ...] = ("accuracy", "f1_macro", "loss")

# Limits that keep every number a config carries usable downstream: datetimes overflow
# past year 9999, Optuna stores steps in 32-bit columns, numpy seeds must fit in 32 bits.
MAX_SECONDS = 365 * 24 * 3600
MAX_STEPS = 100_000_000
MAX_EXAMPLES = 1_000_000_000
MAX_SEED = 2**32 - 1
MAX_PATH = 4096
MAX_NAME = 200

Seconds = Annotated[float, Field(gt=0.0, le=MAX_SECONDS)]
"""A duration: positive and at most a year."""
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
PathText = Annotated[str, Field(min_length=1, max_length=MAX_PATH)]
NameText = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PretrainedModel(_Data):
    """A Hugging Face model folder on local disk (what `save_pretrained` writes)."""

    kind: Literal["pretrained"] = "pretrained"
    path: PathText = Field(description="Folder holding config.json, weights and tokenizer files.")


class NamedModel(_Data):
    """A model that a package installs, resolved through `trainer.registry`."""

    kind: Literal["named"] = "named"
    name: NameText = Field(description="A name from the model registry, e.g. 'all-minilm-l6-v2'.")


class BuiltinModel(_Data):
    """TuneForge's own Transformer encoder classifier; sizes come from the knobs."""

    kind: Literal["builtin"] = "builtin"
    tokenizer: PathText | None = Field(
        None,
        description="Tokenizer folder or named model whose tokenizer to use; null uses the "
        "tokenizer saved with `checkpoint`, else the packaged MiniLM tokenizer.",
    )
    checkpoint: PathText | None = Field(
        None, description="Folder written by `tuneforge pretrain` to start fine-tuning from."
    )


ModelRef = Annotated[PretrainedModel | NamedModel | BuiltinModel, Field(discriminator="kind")]


class FilesDataset(_Data):
    """CSV, JSONL or Parquet files with a text and a label column."""

    kind: Literal["files"] = "files"
    train: PathText = Field(description="Training file (.csv, .jsonl/.json, .parquet).")
    validation: PathText | None = Field(None, description="Validation file; null splits `train`.")
    text_column: NameText = "text"
    text_pair_column: NameText | None = Field(None, description="Second text column for pair tasks.")
    label_column: NameText = "label"
    encoding: NameText = Field("utf-8", description="Text encoding of CSV/JSONL files.")


class NamedDataset(_Data):
    """A dataset that a package installs, resolved through `trainer.registry`."""

    kind: Literal["named"] = "named"
    name: NameText = Field(description="A name from the dataset registry, e.g. 'tweets-sentiment'.")


DatasetRef = Annotated[FilesDataset | NamedDataset, Field(discriminator="kind")]


class DataSettings(_Data):
    validation_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="Share held out (stratified) when there is no validation file."
    )
    max_train_examples: int | None = Field(
        None, ge=1, le=MAX_EXAMPLES, description="Cap on training examples (a seeded sample)."
    )
    max_eval_examples: int | None = Field(
        None, ge=1, le=MAX_EXAMPLES, description="Cap on validation examples (a seeded sample)."
    )


class RunSettings(_Data):
    """Fixed settings of a trial: not tuned, the same for every trial of a study."""

    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seeds data order, initialisation and dropout.")
    eval_every_steps: Steps | None = Field(
        None, description="Evaluate every N optimizer steps; null evaluates once per epoch."
    )
    max_steps: Steps | None = Field(None, description="Stop after this many optimizer steps.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU."
    )
    compile: bool = Field(False, description="torch.compile the model (worth it on GPUs, once per warm slot).")
    checkpoint_every_eval: bool = Field(True, description="Write a resumable checkpoint after every evaluation.")


class TrialConfig(_Data):
    """Everything one trial needs. `hparams` holds a value for every knob."""

    task: Literal["sequence_classification"] = "sequence_classification"
    model: ModelRef
    dataset: DatasetRef
    data: DataSettings = DataSettings()
    hparams: Hyperparams = Hyperparams()
    run: RunSettings = RunSettings()

    @model_validator(mode="after")
    def _unfreeze_within_layers(self) -> TrialConfig:
        depth, layers = self.hparams.unfreeze_depth, self.hparams.num_layers
        if isinstance(depth, int) and layers is not None and depth > layers:
            raise ValueError(f"hparams.unfreeze_depth ({depth}) cannot exceed hparams.num_layers ({layers})")
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> TrialConfig:
        """Read a YAML or JSON config file."""
        import yaml  # yaml is a superset of JSON, so one loader reads both

        text = Path(path).read_text(encoding="utf-8")
        return cls.model_validate(yaml.safe_load(text))
