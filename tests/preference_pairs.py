"""Preference pairs from the verified-reasoning generator's checks, for the post-training tests.

No LLM writes the replies (a 135M model on 2 cores would take an hour): each GSM8K train problem gets two replies
in the generator's "resolve" style, written from the problem's own worked solution. One is the program of its
calculator steps (``<<48/2=24>>`` ...); the other is a wrong version of it, of one of two kinds in turn: one
operator swapped (the verifier's own mutation), or a reply that stops one step early and returns that
intermediate result (how small models often fail). Both go through the real pipeline: the ledger,
``verify_plan``, the sandbox, the gold check. Only the replies that the sandbox and the gold answer sort into pass
and fail become pairs (``verified/preferences``).
"""

from __future__ import annotations

import ast
import gzip
import json
import re
from pathlib import Path

from phi3data.generators.ledger import LedgerWriter
from phi3data.generators.plan import load_plan
from phi3data.generators.requests import GenRequest
from phi3data.generators.sandbox import Sandbox
from phi3data.generators.verified import verify_plan
from phi3data.generators.verify import mutate_solution

ROOT = Path(__file__).resolve().parents[1]
GSM8K_TRAIN = ROOT.parent / "shared" / "data" / "eval" / "gsm8k" / "train.jsonl.gz"
STEP = re.compile(r"<<([0-9.+\-*/() ]+)=([0-9.\-]+)>>")


NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?")


def program_of(answer: str) -> str | None:
    """``solution()`` running a GSM8K answer's calculator steps in order, each step naming the earlier results it
    uses (so a changed step changes the answer), or None when the answer has no steps."""
    steps = STEP.findall(answer)
    if not steps:
        return None
    results: dict[str, str] = {}
    lines = []
    for i, (expr, result) in enumerate(steps, 1):
        expr = NUMBER.sub(lambda m: results.get(m.group(0), m.group(0)), expr.strip())
        lines.append(f"    step{i} = {expr}")
        results.setdefault(result.strip(), f"step{i}")
    source = "def solution():\n" + "\n".join(lines) + f"\n    return step{len(steps)}"
    try:  # formatted as the mutation formats its copy, so the two replies differ only in the mutated operator
        return ast.unparse(ast.parse(source))
    except SyntaxError:  # a calculator annotation that is not Python
        return None


def stop_early(program: str) -> str | None:
    """The program without its last step, returning the step before (None for a one-step program)."""
    lines = program.splitlines()
    if len(lines) < 4:  # def, one step, return
        return None
    return "\n".join(lines[:-2] + [f"    return step{len(lines) - 3}"])


def _reply(source: str) -> str:
    return f"```python\n{source}\n```"


def verified_pairs(out: Path, n_problems: int) -> Path:
    """Run ``n_problems`` GSM8K problems' two replies through the verifier; returns ``verified/preferences``."""
    plan = load_plan(ROOT / "generators" / "math_programs.toml")
    requests, texts = [], []
    with gzip.open(GSM8K_TRAIN, "rt", encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            good = program_of(item["answer"])
            bad = (mutate_solution(good) if len(requests) % 4 == 0 else stop_early(good)) if good else None
            if bad is None:
                continue
            gold = item["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
            prompt = f"Solve with a Python function solution() that returns the answer.\n\n{item['question']}"
            for text in (good, bad):
                requests.append(GenRequest(
                    index=len(requests), messages=({"role": "user", "content": prompt},), params={},
                    cell={"source": "gsm8k", "topic": "arithmetic", "audience": "grade_school", "style": "resolve"},
                    template_id="math_resolve", template_hash="gsm8k-worked-solution",
                    seed_id=f"gsm8k-{len(requests) // 2}", extra={"gold_final": gold}))
                texts.append(_reply(text))
            if len(requests) >= 2 * n_problems:
                break
    keys = [f"gsm8k-{r.index:05d}" for r in requests]
    with LedgerWriter(out) as ledger:
        for key, text in zip(keys, texts):
            ledger.append({"key": key, "status": "ok", "text": text})
    with Sandbox(workers=2, allow_code_execution=True, timeout=5.0) as box:
        verify_plan(plan, requests, keys, out, lambda reqs: ([], {}), box.run_many, allow_code_execution=True)
    return out / "verified" / "preferences"
