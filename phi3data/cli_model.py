"""CLI pieces for the model plane: ``phi3data model info`` and ``phi3data train``.

The main CLI mounts ``model_app`` as ``phi3data model`` and calls :func:`train_command` for ``phi3data train``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import typer

from phi3data.model.model import num_parameters
from phi3data.model.recipes import ladder_sizes, load_model_config

model_app = typer.Typer(help="phi-3 model sizes and checkpoints.", no_args_is_help=True)


@model_app.callback()
def _model_group() -> None:
    """phi-3 model sizes and checkpoints."""


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _refs(config: str) -> list[str]:
    """A recipe reference expands to itself, or to every size when it names a ladder file."""
    if ":" in config:
        return [config]
    path = Path(config)
    if path.is_file():
        raw = tomllib.loads(path.read_text())
        if isinstance(raw.get("model"), str):  # a training config: report its model
            return [raw["model"]]
    try:
        sizes = ladder_sizes(config)
    except FileNotFoundError:
        sizes = []
    return [f"{config}:{s}" for s in sizes] or [config]


@model_app.command("info")
def info(
    config: list[str] = typer.Argument(..., help="model recipes: phi-3-mini, model/ladder-cpu.toml, ladder-cpu:s1"),
) -> None:
    """Print parameter counts (total and non-embedding) for model configs.

    Example: phi3data model info phi-3-mini phi-3-small model/ladder-cpu.toml
    """
    from rich.console import Console
    from rich.table import Table

    table = Table("model", "layers", "hidden", "heads (q/kv)", "mlp", "vocab", "total", "non-embedding")
    for ref in [r for c in config for r in _refs(c)]:
        cfg = load_model_config(ref)
        n = num_parameters(cfg)
        table.add_row(
            ref,
            str(cfg.num_hidden_layers),
            str(cfg.hidden_size),
            f"{cfg.num_attention_heads}/{cfg.num_key_value_heads}",
            str(cfg.intermediate_size),
            str(cfg.vocab_size),
            f"{n['total']:,} ({_human(n['total'])})",
            f"{n['non_embedding']:,} ({_human(n['non_embedding'])})",
        )
    Console(width=160).print(table)


def train_command(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="training config TOML (model/*.toml)"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. max_steps=10 out_dir=runs/x"),
) -> None:
    """Train a phi-3 model from a TOML config (run under torchrun for DDP / FSDP).

    Example: phi3data train model/train-tiny-cpu.toml max_steps=20 out_dir=runs/tiny

    Rerunning with the same out_dir resumes from its last checkpoint.
    """
    from phi3data.training.overrides import parse_overrides
    from phi3data.training.trainer import TrainingDiverged, train

    try:
        result = train(config, parse_overrides(overrides or []))
    except TrainingDiverged as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    if result:
        typer.echo(f"done: step {result.get('step')} loss {result.get('loss', float('nan')):.4f}")
