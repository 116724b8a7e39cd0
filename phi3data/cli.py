"""The ``phi3data`` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    help="phi3data: curate web data, tokenize it, and train compact phi-3 models on it. "
         "Each subcommand has its own --help with examples.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def main() -> None:
    """phi3data: curate web data, tokenize it, and train compact phi-3 models on it."""


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Pipeline recipe (TOML), e.g. pipelines/web_quality.toml")],
    input: Annotated[Path, typer.Option("--input", "-i", help="Input file or directory of shards")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory")],
    engine: Annotated[str, typer.Option(help="local | ray | spark")] = "local",
    workers: Annotated[int | None, typer.Option(help="Parallel workers (default: CPU count)")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Address of a running Ray cluster")] = None,
    spark_master: Annotated[str | None, typer.Option(help="Spark master URL, e.g. spark://host:7077")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
) -> None:
    """Run a curation pipeline recipe over input shards (WARC/WET, JSONL, Parquet, HF Arrow).

    Example: phi3data run pipelines/web_quality.toml --input ../shared/data/web/warc --output out/web --engine spark

    Reruns skip finished shards, so rerunning after a crash completes the output exactly once.
    """
    from phi3data.pipelines.recipe import RecipeError, load_recipe
    from phi3data.pipelines.runner import run_pipeline, stats_table

    try:
        loaded = load_recipe(recipe)
        summary = run_pipeline(loaded, input, output, engine=engine, workers=workers, ray_address=ray_address,
                               spark_master=spark_master, progress=progress)
    except (RecipeError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(stats_table(summary.stats))
    skipped = f", {summary.shards_skipped} already done" if summary.shards_skipped else ""
    console.print(f"{summary.shards_total} shards{skipped} in {summary.seconds:.1f}s -> {output} "
                  f"(data/, rejects/, stats.json, manifest.json)")


def _mount_subcommands() -> None:
    """Attach the other planes' commands (each module keeps its own options and help)."""
    from phi3data.cli_classify import classify_app
    from phi3data.cli_model import model_app, train_command
    from phi3data.cli_tokenize import mix_command, tokenize_command

    app.command("tokenize")(tokenize_command)
    app.command("mix")(mix_command)
    app.add_typer(classify_app, name="classify")
    app.add_typer(model_app, name="model")
    app.command("train", help=train_command.__doc__)(train_command)


_mount_subcommands()

@app.command()
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

    try:
        cfg = load_ladder(config)
        if not report_only:
            run_ladder(cfg, output)
        report = write_report(output)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"report: {report}")
    for png in sorted(output.glob("scaling_*.png")):
        console.print(f"plot:   {png}")


@app.command("eval")
def eval_checkpoint(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint directory (safetensors + config.json)")],
    tokenizer: Annotated[str, typer.Option(help="Tokenizer: phi3-mini, phi3-small, or a tokenizer.json path")],
    tasks: Annotated[str, typer.Option(help="Comma-separated: arc_easy,arc_challenge,piqa,openbookqa,boolq,"
                                            "hellaswag,mmlu,gsm8k")] = "arc_easy,piqa,hellaswag",
    limit: Annotated[int, typer.Option(help="Items per task (a fixed seeded subset)")] = 200,
    shots: Annotated[int | None, typer.Option(help="k-shot examples (default: the Phi-3 report's k)")] = None,
    val_text: Annotated[Path | None, typer.Option(help="JSONL of held-out documents for loss and bits/byte")] = None,
    output: Annotated[Path | None, typer.Option(help="Write results as JSON here")] = None,
) -> None:
    """Evaluate a checkpoint: benchmark log-likelihoods (acc, acc_norm, p(correct)), GSM8K, validation loss.

    Example: phi3data eval runs/train-tiny-cpu/checkpoints/step_0000300 --tokenizer phi3-mini --tasks arc_easy,piqa
    """
    import json

    from phi3data.evaluation.run import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, tokenizer, [t for t in tasks.split(",") if t], limit=limit, shots=shots,
                                 val_text=val_text)
    from rich.table import Table

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


@app.command()
def quickstart(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where results go")] = Path("out/quickstart"),
    data: Annotated[Path | None, typer.Option(help="The shared data folder (default: ../shared/data)")] = None,
    engine: Annotated[str, typer.Option(help="local | ray | spark, for the curation steps")] = "local",
) -> None:
    """Curate the shared web sample, train an edu classifier, filter by it, run a 3-size x 2-recipe ladder, and
    write the scaling plot and report (about 8 minutes on 2 cores; rerun to resume).

    Example: phi3data quickstart --output out/quickstart
    """
    from phi3data.quickstart import SHARED_DATA, run_quickstart

    try:
        run_quickstart(output, data or SHARED_DATA, engine=engine, console=console)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


if __name__ == "__main__":
    app()
