"""Scoring a causal language model: continuation log-likelihoods, multiple-choice metrics, greedy generation,
validation loss and bits per byte.

The model is any callable ``logits_fn(ids: LongTensor[B, T]) -> FloatTensor[B, T, V]``; the tokenizer is any
object with ``encode(text) -> list[int]`` (and ``decode`` for generation). Adapters for phi3data's ``Phi3`` and
for Hugging Face models are below.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from phi3data.evaluation.tasks import GenItem, MCItem, final_number

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def logits_fn_for(model: torch.nn.Module) -> LogitsFn:
    """Wrap phi3data's Phi3 (returns ``(logits, loss)``) or a Hugging Face model (returns ``.logits``)."""

    def run(ids: torch.Tensor) -> torch.Tensor:
        out = model(ids)
        if isinstance(out, tuple):
            return out[0]
        return out.logits

    return run


@dataclass
class Request:
    context: list[int]
    continuation: list[int]


def split_tokens(encode: Callable[[str], list[int]], context: str, continuation: str) -> Request:
    """Tokenize context + continuation together (so merges across the boundary are the real ones) and give the
    continuation the tokens after the context's own tokenization; fall back to separate encodings."""
    ctx = encode(context)
    whole = encode(context + continuation)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return Request(ctx, whole[len(ctx):])
    return Request(ctx, encode(continuation))


@torch.no_grad()
def loglikelihoods(logits_fn: LogitsFn, requests: Sequence[Request], *, max_length: int, batch_size: int = 16,
                   pad_id: int = 0, device: str = "cpu") -> list[tuple[float, bool]]:
    """Sum of log p(continuation | context) for each request, and whether greedy decoding would produce it.

    Inputs longer than ``max_length`` keep their rightmost tokens. Requests are batched longest first.
    """
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i].context) + len(requests[i].continuation)))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        rows, spans = [], []
        for i in chunk:
            req = requests[i]
            if not req.continuation:
                raise ValueError("a continuation has no tokens")
            ids = (req.context + req.continuation)[-(max_length + 1):]
            inputs = ids[:-1]
            n_cont = min(len(req.continuation), len(inputs))
            rows.append(inputs)
            spans.append((len(inputs) - n_cont, len(inputs), ids[-n_cont:]))
        width = max(len(r) for r in rows)
        batch = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for r, row in enumerate(rows):
            batch[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        logprobs = F.log_softmax(logits_fn(batch.to(device)).float(), dim=-1).cpu()
        for r, (i, (lo, hi, targets)) in enumerate(zip(chunk, spans)):
            window = logprobs[r, lo:hi]
            target = torch.tensor(targets, dtype=torch.long)
            total = window.gather(1, target[:, None]).sum().item()
            greedy = bool((window.argmax(-1) == target).all())
            results[i] = (total, greedy)
    return results  # type: ignore[return-value]


def score_multiple_choice(logits_fn: LogitsFn, encode: Callable[[str], list[int]], items: Sequence[MCItem], *,
                          max_length: int, batch_size: int = 16, device: str = "cpu") -> dict:
    """Accuracy, length-normalised accuracy (per character of the choice, as lm-eval-harness's acc_norm), the
    mean probability of the correct choice among the choices (a far less noisy signal at tiny scale) and the
    accuracy of guessing (``chance``)."""
    requests = [split_tokens(encode, item.context, choice) for item in items for choice in item.choices]
    scores = loglikelihoods(logits_fn, requests, max_length=max_length, batch_size=batch_size, device=device)
    correct = correct_norm = 0
    prob_sum = 0.0
    per_item = []
    cursor = 0
    for item in items:
        ll = [s for s, _ in scores[cursor:cursor + len(item.choices)]]
        cursor += len(item.choices)
        norm = [v / max(len(c), 1) for v, c in zip(ll, item.choices)]
        pick = max(range(len(ll)), key=ll.__getitem__)
        pick_norm = max(range(len(norm)), key=norm.__getitem__)
        top = max(ll)
        weights = [math.exp(v - top) for v in ll]
        p_gold = weights[item.gold] / sum(weights)
        correct += pick == item.gold
        correct_norm += pick_norm == item.gold
        prob_sum += p_gold
        per_item.append({"loglikelihoods": ll, "gold": item.gold, "p_gold": p_gold})
    n = len(items)
    chance = sum(1 / len(item.choices) for item in items) / n
    return {"n": n, "acc": correct / n, "acc_norm": correct_norm / n, "prob_correct": prob_sum / n,
            "chance": chance, "items": per_item}


@torch.no_grad()
def greedy_generate(logits_fn: LogitsFn, prompt: list[int], *, max_new_tokens: int, max_length: int,
                    stop_ids: set[int] | None = None, device: str = "cpu") -> list[int]:
    """Greedy decoding (no cache: fine for the small models and short answers evaluated here)."""
    ids = list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        window = torch.tensor([ids[-max_length:]], dtype=torch.long, device=device)
        next_id = int(logits_fn(window)[0, -1].argmax())
        if stop_ids and next_id in stop_ids:
            break
        ids.append(next_id)
        out.append(next_id)
    return out


def score_gsm8k(logits_fn: LogitsFn, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
                items: Sequence[GenItem], *, max_length: int, max_new_tokens: int = 256,
                stop_ids: set[int] | None = None, device: str = "cpu") -> dict:
    """Exact match of the final number of a greedy answer (cut at the next "Question:" or blank line)."""
    correct = 0
    answers = []
    for item in items:
        generated = decode(greedy_generate(logits_fn, encode(item.prompt), max_new_tokens=max_new_tokens,
                                           max_length=max_length, stop_ids=stop_ids, device=device))
        answer_text = generated.split("Question:")[0].split("\n\n")[0]
        predicted = final_number(answer_text)
        correct += predicted == item.answer
        answers.append({"predicted": predicted, "gold": item.answer})
    return {"n": len(items), "exact_match": correct / max(len(items), 1), "items": answers}


@torch.no_grad()
def validation_loss(logits_fn: LogitsFn, encode: Callable[[str], list[int]], texts: Sequence[str], *,
                    max_length: int, batch_size: int = 8, device: str = "cpu") -> dict:
    """Mean next-token loss (nats) over held-out texts, and bits per byte (comparable across tokenizers)."""
    windows: list[list[int]] = []
    total_bytes = 0
    for text in texts:
        ids = encode(text)
        total_bytes += len(text.encode("utf-8"))
        for start in range(0, max(len(ids) - 1, 0), max_length):
            piece = ids[start:start + max_length + 1]
            if len(piece) > 1:
                windows.append(piece)
    nll = 0.0
    count = 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        width = max(len(w) for w in chunk) - 1
        inputs = torch.zeros((len(chunk), width), dtype=torch.long)
        targets = torch.full((len(chunk), width), -100, dtype=torch.long)
        for r, w in enumerate(chunk):
            inputs[r, : len(w) - 1] = torch.tensor(w[:-1])
            targets[r, : len(w) - 1] = torch.tensor(w[1:])
        logits = logits_fn(inputs.to(device)).float().cpu()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                               reduction="sum").item()
        count += int((targets != -100).sum())
    return {"loss": nll / max(count, 1), "tokens": count, "bytes": total_bytes,
            "bits_per_byte": nll / math.log(2) / max(total_bytes, 1)}
