"""The export commands: ``phi3data export gguf`` (llama.cpp's file, f16 or quantised)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def gguf(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint directory (HF phi3 directory, trainer checkpoint "
                                                    "runs/X/checkpoints/step_N, or a run directory: its newest)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="GGUF file to write (replaced atomically)")],
    quant: Annotated[str, typer.Option(help="f16, q8_0, q4_0 or q4_k_m (the last three by llama.cpp's quantiser)")]
    = "q4_k_m",
    tokenizer: Annotated[Path | None, typer.Option(help="vocabulary GGUF whose tokenizer.* fields are embedded "
                                                        "(default: phi-3-mini's ggml-vocab-phi-3.gguf)")] = None,
    threads: Annotated[int | None, typer.Option(help="quantiser threads (default: all cores)")] = None,
) -> None:
    """Export a phi-3 checkpoint to GGUF for llama.cpp (architecture phi3, phi-3-mini's vocabulary and chat
    template embedded).

    Example: phi3data export gguf runs/train-tiny-cpu --quant q4_k_m --output out/tiny-q4_k_m.gguf

    A checkpoint llama.cpp cannot represent (phi-3-small options, a vocabulary other than the tokenizer's) is
    refused before anything is written.
    """
    from phi3data.export.gguf import export_gguf

    result = export_gguf(checkpoint, output, quant=quant, tokenizer=tokenizer, threads=threads)
    typer.echo(f"wrote {result.path} ({result.size_bytes / 2**20:.2f} MiB, {result.quant}, {result.n_tensors} tensors)")
