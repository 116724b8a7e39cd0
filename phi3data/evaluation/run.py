"""Evaluate one checkpoint on the benchmarks and held-out text; the result is JSON, comparable across runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phi3data.evaluation.harness import logits_fn_for, score_gsm8k, score_multiple_choice, validation_loss
from phi3data.evaluation.tasks import (
    DEFAULT_EVAL_DIR,
    MC_TASKS,
    PHI3_SHOTS,
    load_gsm8k,
    load_mc_task,
    subsample,
    with_shots,
)


def evaluate_checkpoint(checkpoint: Path, tokenizer: str, tasks: list[str], *, limit: int | None = 200,
                        shots: int | None = None, val_text: Path | None = None,
                        eval_dir: Path = DEFAULT_EVAL_DIR, device: str = "cpu") -> dict[str, Any]:
    """Score ``tasks`` (multiple choice by log-likelihood, gsm8k by generation) and, given ``val_text`` (JSONL with
    a text field), validation loss and bits per byte. ``shots=None`` uses the Phi-3 report's k per task."""
    from phi3data.model.hf import load_hf
    from phi3data.tokenization.tokenizers import get_tokenizer

    model = load_hf(checkpoint).eval().to(device)
    tok = get_tokenizer(tokenizer)
    logits = logits_fn_for(model)
    max_length = model.cfg.max_position_embeddings
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "tokenizer": tokenizer, "limit": limit, "tasks": {}}
    for task in tasks:
        k = PHI3_SHOTS.get(task, 0) if shots is None else shots
        if task == "gsm8k":
            items = subsample(load_gsm8k(eval_dir, k=k), limit)
            scored = score_gsm8k(logits, tok.encode_text, tok.decode, items, max_length=max_length,
                                 stop_ids={tok.eos_id}, device=device)
        elif task in MC_TASKS:
            items = subsample(with_shots(load_mc_task(task, eval_dir), k), limit)
            scored = score_multiple_choice(logits, tok.encode_text, items, max_length=max_length, device=device)
        else:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(MC_TASKS)}, gsm8k")
        scored["shots"] = k
        result["tasks"][task] = scored
    if val_text is not None:
        with open(val_text, encoding="utf-8") as handle:
            texts = [json.loads(line)["text"] for line in handle if line.strip()]
        result["validation"] = validation_loss(logits, tok.encode_text, texts, max_length=max_length, device=device)
    return result
