"""Verified generation: math programs and code exercises checked by running them in the real sandbox.

Hand-written replies go through the same ledger files a generation run writes, so the verdicts are exact: correct,
wrong, raising, timing out and non-deterministic programs; exercises whose tests cannot fail. Then the shipped
math plan runs end to end against the real llama.cpp server, and a rerun sends nothing and runs nothing again."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import MODEL, ROOT, shipped_plan
from typer.testing import CliRunner

from phi3data.cli import app
from phi3data.generators.ledger import LedgerWriter, ledger_lines
from phi3data.generators.plan import load_plan
from phi3data.generators.requests import GenRequest
from phi3data.generators.sandbox import CodeExecutionRefused, Sandbox
from phi3data.generators.verified import RUNS_DIR, verify_plan


def _program(body: str) -> str:
    return f"```python\ndef solution():\n{body}\n```"


def _write_replies(out: Path, replies: list[tuple[GenRequest, str]]) -> list[str]:
    keys = [f"key-{r.index:04d}" for r, _ in replies]
    with LedgerWriter(out) as ledger:
        for key, (_, text) in zip(keys, replies):
            ledger.append({"key": key, "status": "ok", "text": text})
    return keys


def _request(index: int, style: str, gold: str | None = None, question: str = "q") -> GenRequest:
    return GenRequest(index=index, messages=({"role": "user", "content": f"{question} {index}"},), params={},
                      cell={"source": "gsm8k", "topic": "arithmetic", "audience": "grade_school", "style": style},
                      template_id=f"math_{style}", template_hash="h", seed_id=f"seed-{index}",
                      extra={"gold_final": gold} if gold is not None else {})


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2, allow_code_execution=True, timeout=3.0) as box:
        yield box


def _runs(out: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (out / RUNS_DIR).glob("*.jsonl"))


def test_math_verdicts_are_exact_on_hand_written_programs(sandbox, tmp_path):
    plan = load_plan(ROOT / "generators" / "math_programs.toml")
    replies = [
        (_request(0, "resolve", "72"), _program("    april = 48\n    may = april / 2\n    return april + may")),
        (_request(1, "resolve", "72"), _program("    return 48 + 48")),                        # wrong answer
        (_request(2, "resolve", "72"), _program("    return 1 / 0")),                          # raises
        (_request(3, "resolve", "72"), _program("    while True:\n        pass")),             # times out
        (_request(4, "resolve", "72"), "I think the answer is 72."),                          # no program
        (_request(5, "resolve", "72"), _program("    return (")),                              # syntax error
        (_request(6, "variant"), "Tom has 3 boxes of 4 pens. How many pens?\n" + _program("    return 3 * 4")),
        (_request(7, "variant"), "Ann has a random number of apples.\n"
                                 + _program("    import random\n    return random.randint(1, 10**9)")),
        (_request(8, "variant"), _program("    return 5")),                                   # no problem stated
    ]
    out = tmp_path / "math"
    keys = _write_replies(out, replies)
    solves = {"Tom": [_program("    return 4 * 3"), _program("    boxes, pens = 3, 4\n    return boxes * pens"),
                      _program("    return 3 + 4")],
              "Ann": [_program("    import random\n    return random.randint(1, 10**9)")] * 3}

    def generate_solves(requests):
        solve_out = out / "solve"
        texts = []
        for request in requests:
            name = "Tom" if "Tom" in request.messages[-1]["content"] else "Ann"
            texts.append(solves[name][request.extra["sample"]])
        return _write_replies(solve_out, list(zip(requests, texts))), _read(solve_out)

    summary = verify_plan(plan, [r for r, _ in replies], keys, out, generate_solves, sandbox.run_many,
                          allow_code_execution=True)
    verdicts = {}
    for folder in ("data", "rejected"):
        for row in pq.read_table(out / "verified" / folder).to_pylist():
            verdicts[json.loads(row["metadata"])["seed_id"]] = json.loads(row["metadata"])["verification"]["outcome"]
    assert verdicts == {"seed-0": "ok", "seed-1": "wrong_answer", "seed-2": "exception", "seed-3": "timeout",
                        "seed-4": "no_program", "seed-5": "syntax_error", "seed-6": "ok",
                        "seed-7": "disagreement", "seed-8": "no_problem"}
    assert summary["kept"] == 2 and summary["replies"] == 9
    assert summary["isolation"]["net"] is not False
    # a kept new problem gives a preference pair: an agreeing solution over the one that returned 7
    pairs = pq.read_table(out / "verified" / "preferences").to_pylist()
    assert len(pairs) == 1 and "3 + 4" in pairs[0]["rejected"] and pairs[0]["why"] == "returned 7, not the agreed 12"

    ran = _runs(out)
    verify_plan(plan, [r for r, _ in replies], keys, out, generate_solves, sandbox.run_many,
                allow_code_execution=True)
    assert _runs(out) == ran, "a rerun ran programs whose results were recorded"


def _read(folder: Path) -> dict[str, dict]:
    from phi3data.generators.ledger import read_ledger

    return read_ledger(folder).rows


def test_code_exercises_need_tests_that_can_fail(sandbox, tmp_path):
    plan = load_plan(ROOT / "generators" / "code_exercises.toml")
    good = ("```python\ndef add(a, b):\n    return a + b\n\ndef test_solution():\n    assert add(2, 3) == 5\n"
            "    assert add(-1, 1) == 0\n```")
    vacuous = "```python\ndef add(a, b):\n    return a + b\n\ndef test_solution():\n    assert True\n```"
    failing = "```python\ndef add(a, b):\n    return a * b\n\ndef test_solution():\n    assert add(2, 3) == 5\n```"
    blind = ("```python\ndef double(x):\n    return x * 2\n\ndef test_solution():\n"
             "    assert double(0) == 0 or double(0) is None\n```")  # passes on the empty solution too
    replies = [(_request(i, "exercise"), text) for i, text in enumerate([good, vacuous, failing, blind])]
    out = tmp_path / "code"
    keys = _write_replies(out, replies)
    summary = verify_plan(plan, [r for r, _ in replies], keys, out, lambda reqs: ([], {}), sandbox.run_many,
                          allow_code_execution=True)
    outcomes = {}
    for folder in ("data", "rejected"):
        for row in pq.read_table(out / "verified" / folder).to_pylist():
            meta = json.loads(row["metadata"])
            outcomes[meta["seed_id"]] = meta["verification"]["outcome"]
    assert outcomes == {"seed-0": "ok", "seed-1": "tests_pass_on_empty_solution", "seed-2": "tests_fail_on_solution",
                        "seed-3": "tests_pass_on_empty_solution"}
    assert summary["kept"] == 1
    [pair] = pq.read_table(out / "verified" / "preferences").to_pylist()
    assert "a - b" in pair["rejected"] and "a + b" in pair["chosen"]


def test_generated_code_never_runs_without_opting_in(tmp_path, llama_server):
    plan = load_plan(ROOT / "generators" / "math_programs.toml")
    with pytest.raises(CodeExecutionRefused):
        verify_plan(plan, [], [], tmp_path, lambda reqs: ([], {}), lambda s, t: iter(()))
    result = CliRunner().invoke(app, ["generate", str(ROOT / "generators" / "math_programs.toml"), "--output",
                                      str(tmp_path / "out"), "--base-url", llama_server], terminal_width=200)
    assert result.exit_code == 2 and "--allow-code-execution" in result.output
    assert not (tmp_path / "out").exists(), "nothing is sent before the opt-in is checked"


def test_math_plan_runs_end_to_end_and_a_rerun_repeats_nothing(llama_server, tmp_path):
    plan = shipped_plan("math_programs.toml", tmp_path / "plans", [
        ("limit = 200", "limit = 2"), ("quota = 8", "quota = 1"), ("max_tokens = 256", "max_tokens = 96")])
    try:
        out = tmp_path / "math"
        args = ["generate", str(plan), "--output", str(out), "--base-url", llama_server, "--model", MODEL,
                "--allow-code-execution", "--no-progress", "--sandbox-workers", "2"]
        first = CliRunner().invoke(app, args, terminal_width=200)
        assert first.exit_code == 0, first.output
        summary = json.loads((out / "verification.json").read_text())
        assert summary["replies"] == 2  # one re-solve and one new problem
        kept = pq.read_table(out / "verified" / "data").num_rows if summary["kept"] else 0
        rejected = pq.read_table(out / "verified" / "rejected").num_rows
        assert kept + rejected == summary["replies"] == sum(g["replies"] for g in summary["groups"])
        for row in pq.read_table(out / "verified" / "rejected").to_pylist():
            meta = json.loads(row["metadata"])
            assert row["reason"] == meta["verification"]["outcome"] != "ok"
            assert meta["template_id"].startswith("math_") and meta["cell"]["source"] == "gsm8k"
        sent = len(list(ledger_lines(out))) + len(list(ledger_lines(out / "solve")))
        ran = _runs(out)
        again = CliRunner().invoke(app, args, terminal_width=200)
        assert again.exit_code == 0, again.output
        assert len(list(ledger_lines(out))) + len(list(ledger_lines(out / "solve"))) == sent
        assert _runs(out) == ran
        assert json.loads((out / "verification.json").read_text()) == summary
    finally:
        plan.unlink(missing_ok=True)


KILL_SCRIPT = r"""
import json, sys
from pathlib import Path
from phi3data.generators.plan import load_plan
from phi3data.generators.requests import GenRequest
from phi3data.generators.sandbox import Sandbox
from phi3data.generators.verified import verify_plan
from phi3data.generators.ledger import read_ledger

out, plan_path = Path(sys.argv[1]), sys.argv[2]
plan = load_plan(plan_path)
requests = [GenRequest(index=i, messages=({"role": "user", "content": f"q {i}"},), params={},
                       cell={"source": "gsm8k", "topic": "arithmetic", "audience": "grade_school", "style": "resolve"},
                       template_id="math_resolve", template_hash="h", seed_id=f"seed-{i}", extra={"gold_final": str(i)})
            for i in range(12)]
keys = [f"key-{i:04d}" for i in range(12)]
with Sandbox(workers=1, allow_code_execution=True, timeout=5) as box:
    verify_plan(plan, requests, keys, out, lambda reqs: ([], {}), box.run_many, allow_code_execution=True)
"""


def test_verification_killed_midway_resumes_without_repeating_or_losing_a_run(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "math"
    # twelve re-solves, each program taking a moment, so the kill lands among them
    replies = [(_request(i, "resolve", str(i)), _program(f"    import time\n    time.sleep(0.4)\n    return {i}"))
               for i in range(12)]
    _write_replies(out, replies)
    cmd = [sys.executable, "-c", KILL_SCRIPT, str(out), str(ROOT / "generators" / "math_programs.toml")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and _runs(out) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _runs(out)
    assert 3 <= before < 12, "the kill should land among the runs"
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    keys = [json.loads(line)["key"] for p in sorted((out / RUNS_DIR).glob("*.jsonl"))
            for line in p.read_text().splitlines() if line.strip().endswith("}")]
    assert len(keys) == len(set(keys)) == 12, "every program ran exactly once over the two runs"
    summary = json.loads((out / "verification.json").read_text())
    assert summary["kept"] == 12 and summary["programs_run"] == 12


def test_code_exercise_plan_runs_end_to_end_against_the_real_server(llama_server, tmp_path):
    plan = shipped_plan("code_exercises.toml", tmp_path / "plans", [
        ('topics = ["string manipulation", "list processing", "arithmetic", "dictionaries", "sorting", "recursion"]',
         'topics = ["arithmetic", "string manipulation"]'),
        ('audiences = ["beginners", "students"]', 'audiences = ["beginners"]'), ("quota = 4 ", "quota = 1 "),
        ("max_tokens = 320", "max_tokens = 160")])
    try:
        out = tmp_path / "code"
        args = ["generate", str(plan), "--output", str(out), "--base-url", llama_server, "--model", MODEL,
                "--allow-code-execution", "--no-progress"]
        first = CliRunner().invoke(app, args, terminal_width=200)
        assert first.exit_code == 0, first.output
        summary = json.loads((out / "verification.json").read_text())
        assert summary["replies"] == 2
        rows = [r for folder in ("data", "rejected") if (out / "verified" / folder).exists()
                for r in pq.read_table(out / "verified" / folder).to_pylist() if r.get("metadata")]
        assert len(rows) == 2
        for row in rows:
            meta = json.loads(row["metadata"])
            assert meta["verification"]["kind"] == "code_exercise" and meta["template_id"] == "code_exercise"
            assert meta["verification"]["outcome"] in summary["failures"] or meta["verification"]["outcome"] == "ok"
        ran = _runs(out)
        again = CliRunner().invoke(app, args, terminal_width=200)
        assert again.exit_code == 0, again.output
        assert _runs(out) == ran and json.loads((out / "verification.json").read_text()) == summary
    finally:
        plan.unlink(missing_ok=True)
