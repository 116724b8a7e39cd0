"""The model plane's commands: ``phi3data model info``, ``phi3data train``, ``phi3data eval``, ``phi3data ablate``."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _refs(config: str) -> list[str]:
    """A recipe reference expands to itself, or to every size when it names a ladder file."""
    from phi3data.model.recipes import ladder_sizes

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


def info(
    config: list[str] = typer.Argument(..., help="model recipes: phi-3-mini, model/ladder-cpu.toml, ladder-cpu:s1"),
) -> None:
    """Print parameter counts (total and non-embedding) for model configs.

    Example: phi3data model info phi-3-mini phi-3-small model/ladder-cpu.toml
    """
    from rich.table import Table

    from phi3data.model.model import num_parameters
    from phi3data.model.recipes import load_model_config

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


def train(
    config: Path = typer.Argument(..., help="training config TOML (model/*.toml)"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. max_steps=10 out_dir=runs/x"),
) -> None:
    """Train a phi-3 model from a TOML config (run under torchrun for DDP / FSDP).

    Example: phi3data train model/train-tiny-cpu.toml max_steps=20 out_dir=runs/tiny

    Rerunning with the same out_dir resumes from its last checkpoint.
    """
    from phi3data.training.overrides import parse_overrides
    from phi3data.training.trainer import train as run_training

    result = run_training(config, parse_overrides(overrides or []))
    if result:
        typer.echo(f"done: step {result.get('step')} loss {result.get('loss', float('nan')):.4f}")


def eval_checkpoint(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint directory (safetensors + config.json)")],
    tokenizer: Annotated[str, typer.Option(help="Tokenizer: phi3-mini, phi3-small, or a tokenizer.json path")],
    tasks: Annotated[str, typer.Option(help="Comma-separated: arc_easy,arc_challenge,piqa,openbookqa,boolq,"
                                            "hellaswag,mmlu,gsm8k")] = "arc_easy,piqa,hellaswag",
    limit: Annotated[int, typer.Option(help="Items per task (a fixed seeded subset)")] = 200,
    shots: Annotated[int | None, typer.Option(help="k-shot examples (default: the Phi-3 report's k)")] = None,
    val_text: Annotated[Path | None, typer.Option(help="JSONL of held-out documents for loss and bits/byte")] = None,
    output: Annotated[Path | None, typer.Option(help="Write results as JSON here")] = None,
    device: Annotated[str, typer.Option(help="auto (cuda when available) | cpu | cuda | cuda:N")] = "auto",
    vqa: Annotated[str | None, typer.Option(help="Comma-separated VQA tasks for a vision-language checkpoint: "
                                                 "easy-vqa,charts (replaces --tasks)")] = None,
    blind: Annotated[bool, typer.Option(help="VQA: ask without the image (a model trained blind)")] = False,
    vqa_modes: Annotated[str, typer.Option(help="VQA: options (closed answer set by log-likelihood), generate "
                                                "(greedy)")] = "options,generate",
) -> None:
    """Evaluate a checkpoint: benchmark log-likelihoods (acc, acc_norm, p(correct)), GSM8K, validation loss; or,
    with --vqa, a vision-language model's VQA accuracy, POPE yes/no metrics and the majority-answer baseline.

    Example: phi3data eval runs/train-tiny-cpu/checkpoints/step_0000300 --tokenizer phi3-mini --tasks arc_easy,piqa

    VQA: phi3data eval runs/vlm/export --tokenizer phi3-mini --vqa easy-vqa --limit 1000
    """
    import json

    from rich.table import Table

    from phi3data.evaluation.run import evaluate_checkpoint

    if vqa is not None:
        _eval_vqa(checkpoint, tokenizer, vqa, limit=limit, blind=blind, modes=vqa_modes, output=output, device=device)
        return

    result = evaluate_checkpoint(checkpoint, tokenizer, [t for t in tasks.split(",") if t], limit=limit, shots=shots,
                                 val_text=val_text, device=device)
    table = Table(title=f"eval {checkpoint}")
    for col in ("task", "n", "k", "acc", "acc_norm", "p(correct)", "exact match"):
        table.add_column(col, justify="right" if col != "task" else "left")
    for name, r in result["tasks"].items():
        table.add_row(name, str(r["n"]), str(r["shots"]), f"{r.get('acc', float('nan')):.3f}",
                      f"{r.get('acc_norm', float('nan')):.3f}", f"{r.get('prob_correct', float('nan')):.3f}",
                      f"{r.get('exact_match', float('nan')):.3f}")
    console.print(table)
    if "validation" in result:
        v = result["validation"]
        console.print(f"validation: loss {v['loss']:.4f}, bits/byte {v['bits_per_byte']:.4f} over {v['tokens']} tokens")
    if output:
        output.write_text(json.dumps(result, indent=2))
        console.print(f"results: {output}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _eval_vqa(checkpoint: Path, tokenizer: str, tasks: str, *, limit: int, blind: bool, modes: str,
              output: Path | None, device: str) -> None:
    """``phi3data eval --vqa``: one table row per task and question group."""
    import json

    from rich.table import Table

    from phi3data.evaluation.vlm import evaluate_vlm_checkpoint

    result = evaluate_vlm_checkpoint(checkpoint, tokenizer, [t for t in tasks.split(",") if t], limit=limit,
                                     blind=blind, modes=[m for m in modes.split(",") if m], device=device,
                                     progress=True)
    table = Table(title=f"VQA {checkpoint}{' (blind)' if blind else ''}")
    for col in ("task", "questions", "n", "options acc", "VQA acc (greedy)", "majority answer", "yes-ratio",
                "F1 (yes)"):
        table.add_column(col, justify="left" if col in ("task", "questions") else "right")
    for task, r in result["tasks"].items():
        for group, m in [("all", r["overall"]), *r["groups"].items()]:
            pope = m.get("pope_options") or m.get("pope_generate") or {}
            table.add_row(task, group, str(m["n"]), _fmt(m.get("options_accuracy")), _fmt(m.get("vqa_accuracy")),
                          _fmt(m.get("majority_accuracy")), _fmt(pope.get("yes_ratio")), _fmt(pope.get("f1")))
    console.print(table)
    if output:
        output.write_text(json.dumps(result, indent=2))
        console.print(f"results: {output}")


def ablate(
    config: Annotated[Path, typer.Argument(help="Ladder config (TOML), e.g. model/ladder-cpu-recipes.toml")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Ladder directory (resumable)")],
    report_only: Annotated[bool, typer.Option(help="Only refit and redraw from finished runs")] = False,
) -> None:
    """Train and evaluate an ablation ladder (sizes x data recipes x seeds), then fit, plot and report.

    Example: phi3data ablate model/ladder-quickstart.toml --output out/quickstart/ablate

    Rerun the same command after an interruption: finished runs are kept, an interrupted one resumes from its
    last checkpoint. Results: OUTPUT/report.md, OUTPUT/scaling_benchmark.png, OUTPUT/scaling_bits_per_byte.png.
    """
    from phi3data.scaling.ladder import load_ladder, run_ladder
    from phi3data.scaling.report import write_report

    cfg = load_ladder(config)
    if not report_only:
        run_ladder(cfg, output)
    report = write_report(output)
    console.print(f"report: {report}")
    for png in sorted(output.glob("scaling_*.png")):
        console.print(f"plot:   {png}")
    from phi3data.cli.report import write_and_print

    write_and_print(output, console.print)
