"""The token plane's commands, ``phi3data tokenize`` and ``phi3data mix``: curated text -> shards -> phases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def tokenize(
    inputs: Annotated[list[Path], typer.Argument(help="Input files or directories: `phi3data run` output, or "
                                                      "JSONL/Parquet/Arrow with a text column")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory of token shards")],
    tokenizer: Annotated[str, typer.Option(help="phi3-mini | phi3-mini-hf | phi3-small | cl100k_base | path to "
                                                "tokenizer.json, an HF tokenizer dir, .model or .tiktoken")]
    = "phi3-mini",
    source: Annotated[str | None, typer.Option(help="Source name recorded in the manifest "
                                                    "(default: the input's name)")] = None,
    text_key: Annotated[str, typer.Option(help="Text column / JSON field")] = "text",
    add_bos: Annotated[bool, typer.Option(help="Start each document with the BOS token")] = False,
    add_eos: Annotated[bool, typer.Option(help="End each document with the end-of-document token")] = True,
    max_document_chars: Annotated[int, typer.Option(help="Longer documents are rejected (counted)")] = 5_000_000,
    max_document_tokens: Annotated[int | None, typer.Option(help="Reject documents with more tokens")] = None,
    chat: Annotated[bool, typer.Option(help="Inputs are JSONL conversations (`messages`): phi-3 chat template "
                                            "with an assistant-only loss mask")] = False,
    preferences: Annotated[bool, typer.Option(help="Inputs are preference pairs (prompt, chosen, rejected): "
                                                   "writes OUTPUT/chosen and OUTPUT/rejected, masked chat shards "
                                                   "holding the same pairs in the same order")] = False,
    images: Annotated[bool, typer.Option(help="Inputs are image-text record parquet files (pairs or "
                                              "conversations): phi-3 chat with one image token per image and an "
                                              "image sidecar per shard")] = False,
    mask: Annotated[str, typer.Option(help="With --images: caption (LLaVA stage 1: the last assistant reply "
                                           "only) | assistant (stage 2: every assistant reply)")] = "assistant",
    image_token: Annotated[str, typer.Option(help="With --images: the special token that stands for an image")]
    = "<|placeholder1|>",
    caption_prompt: Annotated[str, typer.Option(help="With --images: user text after a pair's image")] = "",
    image_tokens: Annotated[int | None, typer.Option(help="With --images: vision encoder tokens per image; "
                                                          "--max-document-tokens then counts images expanded")]
    = None,
    engine: Annotated[str, typer.Option(help="local | ray | spark")] = "local",
    workers: Annotated[int | None, typer.Option(help="Parallel workers (default: CPU count)")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Address of a running Ray cluster")] = None,
    spark_master: Annotated[str | None, typer.Option(help="Spark master URL, e.g. spark://host:7077")] = None,
    export_llmc: Annotated[Path | None, typer.Option(help="Also write all tokens as one llm.c .bin file")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
) -> None:
    """Tokenize curated text into training shards (.bin tokens, .offsets, Megatron .idx, manifest.json).

    Example: phi3data tokenize out/web --output out/tokens/web --tokenizer phi3-mini --engine spark

    One shard per input file, named from the input's content and the tokenizer/config hash: reruns skip
    finished shards, and local, Ray and Spark give identical bytes. Empty, too long and malformed documents
    are counted by reason in manifest.json (details in *.rejects.jsonl); lone surrogates are replaced by U+FFFD
    and counted.

    Image-text records (pairs or conversations in parquet): phi3data tokenize out/synth/charts --images --mask
    assistant --output out/tokens/charts writes one image token per image and an image sidecar (S.images.arrow)
    per shard; --mask caption trains on the caption only (LLaVA stage 1).
    """
    if images:
        _tokenize_images(inputs, output, tokenizer=tokenizer, source=source, mask=mask, image_token=image_token,
                         caption_prompt=caption_prompt, image_tokens=image_tokens, max_tokens=max_document_tokens,
                         engine=engine, workers=workers, ray_address=ray_address, spark_master=spark_master,
                         progress=progress, combined=chat or preferences or export_llmc is not None)
        return
    from phi3data.tokenization.runner import TokenizeConfig
    from phi3data.tokenization.runner import tokenize as run_tokenize
    from phi3data.tokenization.shards import export_llmc as write_llmc

    config = TokenizeConfig(tokenizer=tokenizer, text_key=text_key, add_bos=add_bos, add_eos=add_eos,
                            max_document_chars=max_document_chars, max_document_tokens=max_document_tokens,
                            chat=chat)
    import dataclasses

    # preference pairs: two shard sets, chosen and rejected, holding the same pairs in the same order
    runs = [(output / side, dataclasses.replace(config, pair_side=side), f"{side}: ")
            for side in ("chosen", "rejected")] if preferences else [(output, config, "")]
    for target, side_config, label in runs:
        summary = run_tokenize(inputs, target, side_config, source=source, engine=engine, workers=workers,
                               ray_address=ray_address, spark_master=spark_master, progress=progress)
        m = summary.manifest
        rejects = ", ".join(f"{k}={v}" for k, v in m["rejects"].items()) or "none"
        skipped = f", {summary.shards_skipped} already done" if summary.shards_skipped else ""
        console.print(f"{label}{m['documents']:,} documents -> {m['tokens']:,} tokens ({m['dtype']}, tokenizer "
                      f"{m['tokenizer']['name']} {m['tokenizer_hash'][:10]}) in {summary.shards_total} shards"
                      f"{skipped}, {summary.seconds:.1f}s; rejects: {rejects}; repaired documents: "
                      f"{m['repaired_documents']}")
    if export_llmc is not None:
        info = write_llmc(output, export_llmc)
        console.print(f"llm.c file {info['path']}: {info['tokens']:,} tokens (magic {info['magic']}, "
                      f"version {info['version']})")
    from phi3data.cli.report import write_and_print

    write_and_print(output, console.print)


def _tokenize_images(inputs: list[Path], output: Path, *, combined: bool, **options) -> None:
    from phi3data.tokenization.images import ImageTokenizeConfig, tokenize_images

    if combined:
        raise ValueError("--images cannot be combined with --chat, --preferences or --export-llmc")
    run = {k: options.pop(k) for k in ("source", "engine", "workers", "ray_address", "spark_master", "progress")}
    summary = tokenize_images(inputs, output, ImageTokenizeConfig(**options), **run)
    m = summary.manifest
    rejects = ", ".join(f"{k}={v}" for k, v in m["rejects"].items()) or "none"
    skipped = f", {summary.shards_skipped} already done" if summary.shards_skipped else ""
    console.print(f"{m['documents']:,} records -> {m['tokens']:,} tokens and {m['images']:,} images "
                  f"(mask {m['mask_kind']}, image token {m['image_token']}) in {summary.shards_total} shards"
                  f"{skipped}, {summary.seconds:.1f}s; rejects: {rejects}")


def mix(
    recipe: Annotated[Path, typer.Argument(help="Mix recipe (TOML), e.g. mixes/phase_example.toml")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory (one folder per phase)")],
    dry_run: Annotated[bool, typer.Option(help="Only plan and print the report; write nothing")] = False,
) -> None:
    """Mix tokenized sources into training phases by weights or token budgets, and report repetition.

    Example: phi3data mix mixes/phase_example.toml --output out/mix

    Each phase becomes out/mix/<phase>/ (token shards + manifest.json with the report). The table shows per
    source the tokens taken, their share, unique vs repeated tokens and epochs; a source repeated more than
    the recipe's max_epochs is flagged.
    """
    import warnings

    from phi3data.tokenization.mixer import RepetitionWarning, build_mix, load_mix, report_table

    loaded = load_mix(recipe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RepetitionWarning)
        reports = build_mix(loaded, output, dry_run=dry_run)
    for report in reports:
        console.print(report_table(report))
    for w in caught:
        console.print(f"[yellow]warning:[/yellow] {w.message}")
    if not dry_run:
        console.print(f"{len(reports)} phases -> {output}")
        from phi3data.cli.report import write_and_print

        write_and_print(output, console.print)
