"""Command line for one machine: `train` a trial config locally, `pretrain` the built-in encoder.

The `tuneforge` CLI mounts this app's commands; `python -m trainer.cli` runs it alone.
Heavy imports (torch, transformers) happen inside the commands so `--help` stays fast.
A bad config file exits with code 2 and one line naming the field; no traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from trainer.config import TrialConfig
    from trainer.knobs import Hyperparams

app = typer.Typer(
    help="Train a trial config locally, or pretrain the built-in encoder.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2


def _fail(message: str, code: int = EXIT_BAD_CONFIG) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _validation_line(exc: Any) -> str:
    """A pydantic ValidationError on one line: 'field.path: message; other.field: message'."""
    errors = exc.errors()
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(part) for part in err.get("loc", ())) or "(top level)"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


def load_config(path: Path) -> TrialConfig:
    """Read a YAML/JSON trial config, or exit 2 with one line saying what is wrong."""
    import pydantic
    import yaml

    from trainer.config import TrialConfig

    try:
        return TrialConfig.from_file(path)
    except OSError as exc:
        _fail(f"cannot read config {path}: {exc.strerror or exc}")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        _fail(f"{path}: not valid YAML{where}")
    except pydantic.ValidationError as exc:
        _fail(f"{path}: {_validation_line(exc)}")


def _default_cache_dir() -> Path:
    env = os.environ.get("TUNEFORGE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "tuneforge"


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
        force=True,
    )
    if not verbose:
        from transformers.utils import logging as hf_logging

        # Loading reports and shard progress bars bury the trial's own progress and metrics.
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


class _StopOnInterrupt:
    """First Ctrl-C: checkpoint and stop cleanly (resumable with --resume). Second: abort now."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        err_console.print("stopping after this step (Ctrl-C again to abort)...")

    def __enter__(self) -> _StopOnInterrupt:
        # Signal handlers can only be set from the main thread; elsewhere Ctrl-C keeps its default.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _metrics_table(title: str, metrics: dict[str, float]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.4f}")
    return table


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Trial config file (YAML or JSON).")],
    work_dir: Annotated[
        Path | None, typer.Option("--work-dir", help="Checkpoints and the exported model go here [runs/<config>].")
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", help="Tokenised-data cache [$TUNEFORGE_CACHE_DIR or ~/.cache/tuneforge]."),
    ] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Checkpoint folder to resume from.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log data, model and evaluation details.")] = False,
) -> None:
    """Run one trial locally and print its final metrics."""
    cfg = load_config(config)
    if resume is not None and not resume.is_dir():
        _fail(f"--resume: {resume} is not a checkpoint folder")
    _setup_logging(verbose)

    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from trainer.boundary import run_trial
    from trainer.runtime import Runtime

    try:
        if device != "auto":
            torch.device(device)
    except RuntimeError:
        _fail(f"--device: {device!r} is not a device name (auto, cpu, cuda, cuda:N)")

    out_dir = work_dir or Path("runs") / config.stem
    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    )
    task = progress.add_task("train", total=None)

    def on_step(step: int, total: int) -> None:
        progress.update(task, completed=step, total=total)

    def report(step: int, metrics: dict[str, float]) -> bool:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        progress.console.print(f"step {step}: {shown}", highlight=False)
        return False  # locally there is no pruner

    with _StopOnInterrupt() as stop, progress:
        runtime = Runtime(
            work_dir=out_dir,
            cache_dir=cache_dir or _default_cache_dir(),
            device=device,
            resume_from=resume,
            should_stop=stop,
            on_step=on_step,
        )
        outcome = run_trial(cfg, runtime, report)

    if outcome.state == "complete" and outcome.result is not None:
        result = outcome.result
        console.print(_metrics_table(f"final metrics at step {result.step} ({result.duration_s:.1f}s)", result.metrics))
        console.print(f"model: {result.checkpoint}", highlight=False)
        return
    if outcome.error_type == "ConfigError":
        _fail(outcome.message)
    if outcome.error_type == "TrialStopped":
        from trainer.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(out_dir)
        _fail(f"{outcome.message}; resume with --resume {ckpt}", EXIT_FAILED)
    if outcome.traceback:
        err_console.print(outcome.traceback, highlight=False, markup=False)
    reason = f" ({outcome.reason})" if outcome.reason else ""
    _fail(f"trial {outcome.state}{reason}: {outcome.message}", EXIT_FAILED)


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    import yaml

    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            _fail(f"--set: expected KEY=VALUE, got {pair!r}")
        values[key.strip()] = yaml.safe_load(raw)  # '3e-4' -> float, 'true' -> bool, 'all' -> str
    return values


def _hyperparams(hparams_file: Path | None, overrides: list[str]) -> Hyperparams:
    import pydantic
    import yaml

    from trainer.knobs import Hyperparams

    values: dict[str, Any] = {}
    if hparams_file is not None:
        try:
            loaded = yaml.safe_load(hparams_file.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            _fail(f"cannot read {hparams_file}: {exc.strerror or exc}")
        except yaml.YAMLError:
            _fail(f"{hparams_file}: not valid YAML")
        if not isinstance(loaded, dict):
            _fail(f"{hparams_file}: expected a mapping of knob names to values")
        values.update(loaded.get("hparams", loaded))  # a whole trial config's hparams section also works
    values.update(_parse_overrides(overrides))
    try:
        return Hyperparams.model_validate(values)
    except pydantic.ValidationError as exc:
        _fail(f"hparams.{_validation_line(exc)}")


@app.command()
def pretrain(
    text_file: Annotated[Path, typer.Argument(help="Plain text, one example per line.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the pretrained encoder to.")],
    hparams_file: Annotated[
        Path | None, typer.Option("--hparams", help="YAML of knob values (hidden_size, num_layers, epochs, ...).")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override one knob: --set learning_rate=3e-4 (repeatable).")
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option("--tokenizer", help="Tokenizer folder or model name [packaged MiniLM].")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1, help="Stop after this many steps.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Masked-language-model pretraining of the built-in encoder; fine-tune it with model.checkpoint=OUT."""
    hp = _hyperparams(hparams_file, overrides or [])
    if not text_file.is_file():
        _fail(f"TEXT_FILE: {text_file} is not a file")
    _setup_logging(verbose)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from trainer.outcome import ConfigError
    from trainer.pretrain import pretrain_mlm

    progress = Progress(
        TextColumn("[bold]pretrain"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    )
    task = progress.add_task("pretrain", total=None)

    def on_step(step: int, total: int) -> None:
        progress.update(task, completed=step, total=total)

    try:
        with progress:
            folder = pretrain_mlm(
                text_file, out, hparams=hp, tokenizer=tokenizer, seed=seed, max_steps=max_steps, on_step=on_step
            )
    except ConfigError as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else "bad pretraining settings")
    console.print(f"pretrained encoder: {folder}", highlight=False)


if __name__ == "__main__":
    app()
