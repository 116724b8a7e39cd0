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


def run_key(owner: str, source: str) -> str:
    """A program run's identity: the reply it checks (``owner``: a request key, and the variant), its exact
    source and the harness version. The same code in two independent samples runs twice, so a non-deterministic
    program cannot agree with itself."""
    return hashlib.sha256(f"{HARNESS_VERSION}\n{owner}\n{source}".encode()).hexdigest()


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
    except SyntaxError:  # unfenced prose is no program; fenced code that does not parse is a syntax error
        return Program(problem, code, "syntax_error" if match else "no_program")
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


# --- code exercises (phi-1's CodeExercises style) -------------------------------------------------------------

TEST_HARNESS = """

if __name__ == "__main__":
    _tests = [_f for _n, _f in sorted(globals().items()) if _n.startswith("test_") and callable(_f)]
    for _test in _tests:
        _test()
    print("\\n__phi3data_tests__ " + str(len(_tests)))
"""
TESTS_MARK = "__phi3data_tests__ "


@dataclass(frozen=True)
class Exercise:
    """A code exercise split into its solution (functions and imports) and its tests (``test_*`` functions and
    top-level asserts), and the two variants its tests must fail on: an empty and a mutated solution."""

    solution: str | None
    tests: str | None
    reason: str | None = None

    def program(self, solution: str | None = None) -> str:
        return f"{solution if solution is not None else self.solution}\n\n{self.tests}\n{TEST_HARNESS}"

    def variants(self) -> dict[str, str]:
        """The sources to run: the solution with its tests, and the empty and mutated solutions with the same
        tests (absent when no mutation applies)."""
        out = {"solution": self.program(), "empty": self.program(empty_solution(self.solution))}
        mutated = mutate_solution(self.solution)
        if mutated is not None:
            out["mutated"] = self.program(mutated)
        return out


def parse_exercise(text: str) -> Exercise:
    """An exercise from a reply: all fenced code blocks (or the whole reply) joined, then split into solution
    and tests at the top level of the module."""
    blocks = [m.group(1) for m in _FENCE.finditer(text or "")] or [text or ""]
    code = "\n\n".join(b.strip() for b in blocks if b.strip())
    if not code:
        return Exercise(None, None, "no_program")
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return Exercise(None, None, "syntax_error")
    solution, tests = [], []
    for node in tree.body:
        is_test = (isinstance(node, ast.FunctionDef) and node.name.startswith("test")) or isinstance(node, ast.Assert)
        (tests if is_test else solution).append(ast.get_source_segment(code, node))
    top_asserts = [n for n in tree.body if isinstance(n, ast.Assert)]
    if top_asserts:  # asserts at module level become one test function, so the harness counts and runs them
        tests = [t for t in tests if not t.lstrip().startswith("assert")]
        tests.append("def test_asserts():\n" + "\n".join("    " + ast.get_source_segment(code, n)
                                                         for n in top_asserts))
    if not any(isinstance(n, ast.FunctionDef) and not n.name.startswith("test") for n in tree.body):
        return Exercise(None, None, "no_solution")
    if not tests:
        return Exercise(None, None, "no_tests")
    return Exercise("\n\n".join(solution), "\n\n".join(tests))


def empty_solution(solution: str) -> str:
    """Every solution function's body replaced by ``return None``."""
    tree = ast.parse(solution)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            node.body = [ast.Return(value=ast.Constant(None))]
    return ast.unparse(tree)


_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Add, ast.Lt: ast.GtE, ast.Gt: ast.LtE, ast.LtE: ast.Gt,
          ast.GtE: ast.Lt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}


def mutate_solution(solution: str) -> str | None:
    """The solution with its first arithmetic or comparison operator swapped (``+`` -> ``-``, ``<`` -> ``>=`` ...),
    else its first integer constant changed; None when nothing can be mutated."""
    tree = ast.parse(solution)
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and type(node.op) in _SWAPS:
            node.op = _SWAPS[type(node.op)]()
            return ast.unparse(tree)
        if isinstance(node, ast.Compare) and type(node.ops[0]) in _SWAPS:
            node.ops[0] = _SWAPS[type(node.ops[0])]()
            return ast.unparse(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            node.value += 1
            return ast.unparse(tree)
    return None


def tests_passed(run: dict) -> bool:
    """True when the run exited cleanly after running at least one test."""
    if run.get("status") != "ok" or run.get("exit_code") not in (0, None):
        return False
    return any(line.startswith(TESTS_MARK) and line[len(TESTS_MARK):].strip() not in ("", "0")
               for line in (run.get("stdout") or "").splitlines())


def exercise_outcome(runs: dict[str, dict]) -> str:
    """``ok`` when the tests pass on the solution and fail on the empty and mutated ones; otherwise why not."""
    solution = runs["solution"]
    if solution.get("status") == "timeout":
        return "timeout"
    if not tests_passed(solution):
        return "tests_fail_on_solution"
    if tests_passed(runs["empty"]):
        return "tests_pass_on_empty_solution"
    if "mutated" in runs and tests_passed(runs["mutated"]):
        return "tests_miss_mutation"
    return "ok"


