"""The synthetic image command: ``phi3data synth-images`` (charts, tables and OCR text images with exact answers)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def synth_images(
    kind: Annotated[str, typer.Option(help="charts | tables | ocr")],
    output: Annotated[Path, typer.Option("--output", "-o", help="directory for the parquet shards and "
                                                                "manifest.json")],
    count: Annotated[int, typer.Option(help="how many records")] = 1000,
    seed: Annotated[int, typer.Option(help="the same seed gives byte-identical shards")] = 0,
    shard_records: Annotated[int, typer.Option(help="records per parquet shard")] = 256,
    textbooks: Annotated[Path | None, typer.Option(help="OCR paragraphs source (JSONL, optionally gzipped, with "
                                                        "a text field); default: the shared OpenStax sections")]
    = None,
    engine: Annotated[str, typer.Option(help="local | ray | spark: where the shards are drawn")] = "local",
    workers: Annotated[int | None, typer.Option(help="parallel workers (default: CPU count)")] = None,
    ray_address: Annotated[str | None, typer.Option(help="address of a running Ray cluster")] = None,
    spark_master: Annotated[str | None, typer.Option(help="Spark master URL, e.g. spark://host:7077")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Generate synthetic image-text records whose answers are exact by construction.

    Example: phi3data synth-images --kind charts --count 5000 --seed 1 --output out/synth/charts

    charts: matplotlib bar/line/pie charts of random tables with questions computed from the table (conversation
    records); tables: tables drawn as images, transcription then lookups (conversations); ocr: OpenStax paragraphs
    drawn as images with the exact text (pairs). A rerun skips finished shards.
    """
    from phi3data.multimodal.synthetic import KINDS, SynthConfig, generate

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: choose one of {', '.join(KINDS)}")
    config = SynthConfig(kind=kind, seed=seed, shard_records=shard_records,
                         textbooks=None if textbooks is None else str(textbooks.resolve()))
    summary = generate(config, count, output, engine=engine, workers=workers, ray_address=ray_address,
                       spark_master=spark_master, progress=progress)
    skipped = f", {summary.shards_skipped} already done" if summary.shards_skipped else ""
    typer.echo(f"{summary.records:,} {kind} records in {summary.shards_total} shards{skipped} -> {output} "
               f"({summary.seconds:.1f}s)")
