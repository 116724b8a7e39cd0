"""The data plane's commands: ``phi3data run`` and ``phi3data quickstart``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def run(
    recipe: Annotated[Path, typer.Argument(help="Pipeline recipe (TOML), e.g. pipelines/web_quality.toml")],
    input: Annotated[Path, typer.Option("--input", "-i", help="Input file or directory of shards")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory")],
    engine: Annotated[str, typer.Option(help="local | ray | spark")] = "local",
    workers: Annotated[int | None, typer.Option(help="Parallel workers (default: CPU count)")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Address of a running Ray cluster")] = None,
    spark_master: Annotated[str | None, typer.Option(help="Spark master URL, e.g. spark://host:7077")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
    report: Annotated[bool, typer.Option(help="Write DIR/report.html at the end (phi3data report)")] = True,
) -> None:
    """Run a curation pipeline recipe over input shards (WARC/WET, JSONL, Parquet, HF Arrow).

    Example: phi3data run pipelines/web_quality.toml --input ../shared/data/web/warc --output out/web --engine spark

    Reruns skip finished shards, so rerunning after a crash completes the output exactly once.
    """
    if engine == "local" and input.is_dir() and (workers is None or workers > 1):
        from phi3data.engines.local import warm_up

        warm_up()  # the workers' imports overlap loading the recipe and planning the shards
    from phi3data.pipelines.recipe import load_recipe
    from phi3data.pipelines.runner import run_pipeline, stats_table

    loaded = load_recipe(recipe)
    summary = run_pipeline(loaded, input, output, engine=engine, workers=workers, ray_address=ray_address,
                           spark_master=spark_master, progress=progress)
    console.print(stats_table(summary.stats))
    for name, decision in summary.stats.get("decisions", {}).items():
        if "audit" in decision:
            console.print(f"{name}: {decision['in_clusters']} documents in {decision['clusters']} clusters, "
                          f"{decision['to_drop']} dropped; audit {json.dumps(decision['audit'])}")
    for name, report in summary.stats.get("reports", {}).items():
        totals = report.get("totals")
        console.print(f"{name}: report in {output / 'reports' / (name + '.json')}"
                      + (f" ({json.dumps(totals)})" if totals else ""))
    skipped = f", {summary.shards_skipped} already done" if summary.shards_skipped else ""
    console.print(f"{summary.shards_total} shards{skipped} in {summary.seconds:.1f}s -> {output} "
                  f"(data/, rejects/, stats.json, manifest.json)")
    if report:
        from phi3data.cli.report import write_and_print

        write_and_print(output, console.print, input=input)


def quickstart(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where results go")] = Path("out/quickstart"),
    data: Annotated[Path | None, typer.Option(help="The shared data folder (default: ../shared/data)")] = None,
    engine: Annotated[str, typer.Option(help="local | ray | spark, for the curation steps")] = "local",
) -> None:
    """Curate the shared web sample, train an edu classifier, filter by it, run a 3-size x 2-recipe ladder, and
    write the scaling plot and report (about 8 minutes on 2 cores; rerun to resume).

    Example: phi3data quickstart --output out/quickstart
    """
    from phi3data.quickstart import run_quickstart

    results = run_quickstart(output, data, engine=engine, console=console)
    from phi3data.cli.report import write_and_print
    from phi3data.paths import shared_data

    warc = Path(data or shared_data()).resolve() / "web" / "warc"
    curated, edu = Path(results["curated"]).parent, Path(results["edu"]).parent
    write_and_print(curated, console.print, input=warc)
    write_and_print(edu, console.print, input=warc, compare_with=curated)
    write_and_print(Path(results["report"]).parent, console.print)
