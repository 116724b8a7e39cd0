"""Checking generated math programs by running them: what to run, and what a run's outcome means.

A TinyGSM-style reply holds a Python function ``solution()`` that returns the answer (and, for a new problem,
the problem's text before the code). The program run in the sandbox is the reply's code followed by a small
harness that prints the returned value as JSON on its last line, so the answer is read from a run, never
trusted from the reply's prose. Outcomes are named: ``no_program``, ``syntax_error``, ``exception``, ``timeout``,
``no_answer``, ``wrong_answer`` (against a gold answer), ``disagreement`` (independent samples differ), ``ok``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass

HARNESS_VERSION = "1"
HARNESS = """

if __name__ == "__main__":
    import json as _json
    _answer = solution()
    print("\\n__phi3data_answer__ " + _json.dumps(_answer, default=str))
"""
ANSWER_MARK = "__phi3data_answer__ "
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Program:
    """A reply split into its problem statement (text before the code, may be empty) and its code."""

    problem: str
    code: str | None
    reason: str | None = None
    """Why there is no runnable code: ``no_program`` or ``syntax_error``."""

    @property
    def source(self) -> str:
        """What the sandbox runs: the code and the answer-printing harness."""
        return (self.code or "") + HARNESS

    @property
    def key(self) -> str:
        """The run's identity: the exact source (harness version included)."""
        return hashlib.sha256(f"{HARNESS_VERSION}\n{self.source}".encode()).hexdigest()


def parse_reply(text: str) -> Program:
    """The reply's code (the first fenced block, or the whole reply when it parses as Python) and the prose
    before it; checks that the code parses and defines ``solution``."""
    match = _FENCE.search(text or "")
    if match:
        code, problem = match.group(1).strip(), text[:match.start()].strip()
    else:
        code, problem = (text or "").strip(), ""
    if not code:
        return Program(problem, None, "no_program")
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return Program(problem, code, "syntax_error")
    if not any(isinstance(node, ast.FunctionDef) and node.name == "solution" for node in tree.body):
        return Program(problem, code, "no_program")
    return Program(problem, code)


def answer_of(run: dict) -> tuple[object | None, str]:
    """(answer, outcome) of a sandbox run: the value printed by the harness, or why there is none."""
    status = run.get("status")
    if status == "timeout":
        return None, "timeout"
    if status != "ok" or run.get("exit_code") not in (0, None):
        return None, "exception"
    for line in reversed((run.get("stdout") or "").splitlines()):
        if line.startswith(ANSWER_MARK):
            try:
                return json.loads(line[len(ANSWER_MARK):]), "ok"
            except json.JSONDecodeError:
                return None, "no_answer"
    return None, "no_answer"


def as_number(value: object) -> float | None:
    """A numeric answer: numbers as they are, strings by their last number ("$1,200" -> 1200)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        numbers = _NUMBER.findall(value)
        if numbers:
            try:
                return float(numbers[-1].replace(",", ""))
            except ValueError:
                return None
    return None


def same_answer(a: object, b: object, rel_tol: float = 1e-6) -> bool:
    x, y = as_number(a), as_number(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=rel_tol, abs_tol=1e-9)


def check_against_gold(answer: object, gold: str | None) -> str:
    """``ok`` when the run's answer equals the seed's gold final answer, else ``wrong_answer``."""
    return "ok" if gold is not None and same_answer(answer, gold) else "wrong_answer"


def consensus(answers: list[object | None], agree: int) -> tuple[object | None, str]:
    """(answer, outcome) of independent samples of one problem: ``ok`` when at least ``agree`` runs returned
    the same number, else ``disagreement`` (or the most common failure when fewer than ``agree`` ran)."""
    numbers = [as_number(a) for a in answers]
    valid = [n for n in numbers if n is not None]
    if len(valid) < agree:
        return None, "too_few_answers"
    counts = Counter(round(n, 6) for n in valid)
    best, count = counts.most_common(1)[0]
    if count >= agree:
        return best, "ok"
    return None, "disagreement"
