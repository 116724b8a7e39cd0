"""Evaluate a checkpoint on the benchmarks and held-out text; the result is JSON, comparable across runs.

:func:`evaluate_checkpoint` is what ``phi3data eval`` and every run of an ablation ladder call: it loads the
checkpoint onto ``device`` and scores it there.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from phi3data import paths
from phi3data.evaluation.harness import logits_fn_for, score_gsm8k, score_multiple_choice, validation_loss
from phi3data.evaluation.tasks import MC_TASKS, PHI3_SHOTS, MCItem, load_gsm8k, load_mc_task, subsample, with_shots
from phi3data.io.readers import read_records

MAX_TEXT_BYTES = 10_000_000


def resolve_device(device: str) -> str:
    """``auto`` is ``cuda`` where a GPU is visible, else ``cpu``; any other name is passed on to torch."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def read_texts(path: Path) -> Iterator[str]:
    """The text of every document of a JSONL or Parquet file, streamed through ``io.readers``. An unreadable
    record is an error naming the file: held-out text that silently loses documents measures something else."""
    for rec in read_records(path, source=path.name, max_document_bytes=MAX_TEXT_BYTES):
        if rec.get("reject"):
            raise ValueError(f"{path}: unreadable record at byte {rec['offset']}: {rec['reason']} {rec['detail']}")
        yield rec["text"]


@functools.cache
def mc_items(task: str, eval_dir: Path, shots: int, limit: int | None) -> tuple[MCItem, ...]:
    """A multiple-choice task's prompted, subsampled items; built once per process (a ladder scores many runs)."""
    return tuple(subsample(with_shots(load_mc_task(task, eval_dir), shots), limit))


def evaluate_checkpoint(checkpoint: Path, tokenizer: str, tasks: list[str], *, limit: int | None = 200,
                        shots: int | None = None, val_text: Path | None = None, eval_dir: Path | None = None,
                        device: str = "auto", batch_size: int = 16) -> dict[str, Any]:
    """Score ``tasks`` (multiple choice by log-likelihood, gsm8k by generation) and, given ``val_text`` (JSONL with
    a text field), validation loss and bits per byte. ``shots=None`` uses the Phi-3 report's k per task;
    ``eval_dir`` defaults to the shared eval data; ``device`` is where the model runs (``auto``: cuda if any)."""
    from phi3data.model.hf import load_hf
    from phi3data.tokenization.tokenizers import get_tokenizer

    for task in tasks:
        if task != "gsm8k" and task not in MC_TASKS:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(MC_TASKS)}, gsm8k")
    eval_dir = Path(eval_dir or paths.eval_dir())
    device = resolve_device(device)
    model = load_hf(checkpoint).eval().to(device)
    tok = get_tokenizer(tokenizer)
    logits = logits_fn_for(model)
    max_length = model.cfg.max_position_embeddings
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "tokenizer": tokenizer, "limit": limit,
                              "device": str(next(model.parameters()).device), "tasks": {}}
    for task in tasks:
        k = PHI3_SHOTS.get(task, 0) if shots is None else shots
        if task == "gsm8k":
            items = subsample(load_gsm8k(eval_dir, k=k), limit)
            scored = score_gsm8k(logits, tok.encode_text, tok.decode, items, max_length=max_length,
                                 stop_ids={tok.eos_id}, device=device)
        else:
            scored = score_multiple_choice(logits, tok.encode_text, mc_items(task, eval_dir, k, limit),
                                           max_length=max_length, batch_size=batch_size, device=device)
        scored["shots"] = k
        result["tasks"][task] = scored
    if val_text is not None:
        texts = list(read_texts(Path(val_text)))
        result["validation"] = validation_loss(logits, tok.encode_text, texts, max_length=max_length,
                                               device=device)
    return result
