"""Verified math problems with programs (TinyGSM style): generate, re-solve, run in the sandbox, keep what checks.

After ``generate`` has answered a plan with a ``[verify]`` section:

1. every reply is parsed into its problem statement and its ``solution()`` program (``verify.parse_reply``);
2. a reply of a *gold style* re-solves its seed problem: its program's answer must equal the seed's gold answer;
3. a reply of another style states a *new* problem: ``samples`` independent solve requests are generated for it
   (their own ledger under ``solve/``, so they too are sent exactly once) and the problem is kept when ``agree``
   of their programs, and the reply's own program, return the same answer (self-consistency);
4. every program runs in the sandbox once: each run is appended to ``verify/runs-*.jsonl`` keyed by the program's
   source, so a rerun after a kill runs only what has no recorded result;
5. outputs: ``verified/data`` (kept problems as documents, with the verification in ``metadata``),
   ``verified/rejected`` (every failure with its reason), ``verified/preferences`` (a passing and a failing
   solution of the same problem: ``prompt``, ``chosen``, ``rejected``, ``why``) and ``verification.json`` (pass
   rates per cell and template, failures by reason, the sandbox's isolation level).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from phi3data.generators.ledger import LedgerWriter, read_ledger
from phi3data.generators.plan import GenerationPlan
from phi3data.generators.requests import GenRequest
from phi3data.generators.sandbox import CodeExecutionRefused
from phi3data.generators.verify import (
    Program,
    answer_of,
    check_against_gold,
    consensus,
    exercise_outcome,
    mutate_solution,
    parse_exercise,
    parse_reply,
    run_key,
    same_answer,
)
from phi3data.io.writers import write_json_atomic

RUNS_DIR = "verify"
VERIFIED_DIR = "verified"
SOLVE_DIR = "solve"
RunPrograms = Callable[[list[str], float], Iterator[tuple[int, dict]]]
"""Runs sources in the sandbox, yielding (index, result) as each finishes; a result has ``status``, ``exit_code``,
``stdout``, ``stderr`` and ``isolation``."""


@dataclass
class Item:
    """One generated reply and how it is checked."""

    request: GenRequest
    key: str
    reply: str
    program: Program
    gold: bool


def solve_requests(plan: GenerationPlan, items: Sequence[Item]) -> list[GenRequest]:
    """``samples`` independent solve requests for every new problem (in plan order, seeds fixed by the problem)."""
    verify = plan.verify
    template = plan.solve_template
    out: list[GenRequest] = []
    for item in items:
        if item.gold or not item.program.problem:
            continue
        prompt = template.render(problem=item.program.problem)
        messages = ({"role": "system", "content": plan.system},) if plan.system else ()
        messages += ({"role": "user", "content": prompt},)
        for sample in range(verify.samples):
            seed = int.from_bytes(hashlib.sha256(f"{item.key}:{sample}".encode()).digest()[:4], "big") % (2 ** 31)
            params = {"max_tokens": plan.sampling.max_tokens, "temperature": max(plan.sampling.temperature, 0.7),
                      "top_p": plan.sampling.top_p, "seed": seed}
            out.append(GenRequest(index=len(out), messages=messages, params=params, cell=dict(item.request.cell),
                                  template_id=template.id, template_hash=template.hash, seed_id=item.key,
                                  extra={"problem_key": item.key, "sample": sample}))
    return out


def read_runs(output: Path) -> dict[str, dict]:
    """Recorded sandbox runs by program key (a line cut short by a kill is ignored: that program runs again)."""
    rows: dict[str, dict] = {}
    for path in sorted((output / RUNS_DIR).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows.setdefault(row["key"], row)
    return rows


def run_once(programs: Iterable[tuple[str, str]], output: Path, run_programs: RunPrograms,
             timeout: float) -> dict[str, dict]:
    """Run every (owner, source) that has no recorded result; returns all results by ``run_key``."""
    done = read_runs(output)
    todo: dict[str, str] = {}
    for owner, source in programs:
        key = run_key(owner, source)
        if key not in done:
            todo.setdefault(key, source)
    if todo:
        keys = list(todo)
        with LedgerWriter(output, sync_every=16, folder=RUNS_DIR) as writer:
            for index, result in run_programs([todo[k] for k in keys], timeout):
                row = {"key": keys[index], **{k: result.get(k) for k in ("status", "exit_code", "stdout", "stderr",
                                                                        "isolation", "cpu_seconds", "wall_seconds")}}
                writer.append(row)
                done[row["key"]] = row
    return done


def outcome(owner: str, program: Program, runs: dict[str, dict]) -> tuple[object | None, str]:
    if program.reason is not None:
        return None, program.reason
    return answer_of(runs[run_key(owner, program.source)])


def verify_plan(plan: GenerationPlan, requests: Sequence[GenRequest], keys: Sequence[str], output: Path,
                generate_solves: Callable[[list[GenRequest]], tuple[list[str], dict[str, dict]]],
                run_programs: RunPrograms, *, allow_code_execution: bool = False) -> dict:
    """Check every answered request of a verified plan and write the verified outputs; returns the summary.

    ``generate_solves(requests)`` sends the solve requests exactly once (``generate`` into ``solve/``) and returns
    their keys and ledger rows; ``run_programs`` is the sandbox."""
    verify = plan.verify
    if not (verify.allow_code_execution or allow_code_execution):
        raise CodeExecutionRefused(f"verifying the replies of {plan.path}")
    rows = read_ledger(output).rows
    answered = [(r, k, rows[k]["text"]) for r, k in zip(requests, keys) if rows.get(k, {}).get("status") == "ok"]
    if verify.kind == "code_exercise":
        return _verify_exercises(plan, answered, output, run_programs)
    items = [Item(r, k, text, parse_reply(text), r.cell["style"] in verify.gold_styles) for r, k, text in answered]
    solves = solve_requests(plan, items)
    solve_keys, solve_rows = generate_solves(solves) if solves else ([], {})
    samples: dict[str, list[tuple[GenRequest, str, Program, str]]] = defaultdict(list)
    for request, key in zip(solves, solve_keys):
        row = solve_rows.get(key)
        if row is not None and row.get("status") == "ok":
            samples[request.extra["problem_key"]].append((request, row["text"], parse_reply(row["text"]), key))
    programs = [(i.key, i.program) for i in items] + [(k, p) for group in samples.values() for _, _, p, k in group]
    runs = run_once([(owner, p.source) for owner, p in programs if p.reason is None], output, run_programs,
                    verify.timeout)
    isolation = next((r.get("isolation") for r in runs.values() if r.get("isolation")), None)

    kept, rejected, pairs = [], [], []
    stats: dict[str, Counter] = defaultdict(Counter)
    by_seed: dict[tuple, list[tuple[Item, str]]] = defaultdict(list)
    for item in items:
        answer, result = outcome(item.key, item.program, runs)
        sample_results = [(req, text, *outcome(k, p, runs)) for req, text, p, k in samples.get(item.key, [])]
        if item.gold:
            if result == "ok":
                result = check_against_gold(answer, item.request.extra.get("gold_final"))
        elif not item.program.problem:
            result = "no_problem"
        elif result == "ok":
            agreed, result = consensus([a for _, _, a, r in sample_results if r == "ok"],
                                       verify.agree or verify.samples)
            if result == "ok" and not same_answer(answer, agreed):
                result = "disagreement"
        verification = {"kind": verify.kind, "outcome": result, "answer": answer, "gold": item.gold,
                        "gold_final": item.request.extra.get("gold_final"),
                        "samples": [{"outcome": r, "answer": a} for _, _, a, r in sample_results],
                        "isolation": isolation}
        _record(plan, item.request, item.key, item.reply, result, verification, stats, kept, rejected)
        pairs.extend(_pairs(item, answer, result, sample_results))
        if item.gold:
            by_seed[(item.request.seed_id, item.request.cell["style"])].append((item, result))
    pairs.extend(_gold_pairs(by_seed))
    return _finish(output, kept, rejected, pairs, stats, isolation, len(runs))


def _record(plan: GenerationPlan, request: GenRequest, key: str, reply: str, result: str, verification: dict,
            stats: dict[str, Counter], kept: list[dict], rejected: list[dict]) -> None:
    """Count a checked reply under its cell and template, and file it as kept or rejected with its reason."""
    cell = request.cell
    group = f"{cell['source']}/{cell['topic']}/{cell['audience']}/{cell['style']}|{request.template_id}"
    stats[group]["replies"] += 1
    stats[group][result] += 1
    meta = {"plan": plan.name, "cell": cell, "template_id": request.template_id,
            "template_hash": request.template_hash, "seed_id": request.seed_id, "request_key": key,
            "verification": verification}
    record = {"id": f"{plan.name}-{key[:24]}", "text": reply, "source": f"synthetic/{plan.name}",
              "metadata": json.dumps(meta, default=str, sort_keys=True), "reason": result}
    (kept if result == "ok" else rejected).append(record)


def _finish(output: Path, kept: list[dict], rejected: list[dict], pairs: list[dict], stats: dict[str, Counter],
            isolation: object, runs: int) -> dict:
    _write(output / VERIFIED_DIR / "data", [{k: v for k, v in r.items() if k != "reason"} for r in kept])
    _write(output / VERIFIED_DIR / "rejected", rejected)
    _write(output / VERIFIED_DIR / "preferences", pairs)
    summary = _summary(stats, isolation, runs, len(pairs))
    write_json_atomic(output / "verification.json", summary)
    return summary


def _verify_exercises(plan: GenerationPlan, answered: list[tuple[GenRequest, str, str]], output: Path,
                      run_programs: RunPrograms) -> dict:
    """Code exercises: kept when the tests pass on the solution and fail on the empty and mutated solutions."""
    exercises = [(r, k, text, parse_exercise(text)) for r, k, text in answered]
    programs = [(f"{key}:{name}", src) for _, key, _, ex in exercises if ex.reason is None
                for name, src in ex.variants().items()]
    runs = run_once(programs, output, run_programs, plan.verify.timeout)
    isolation = next((r.get("isolation") for r in runs.values() if r.get("isolation")), None)
    kept, rejected, pairs = [], [], []
    stats: dict[str, Counter] = defaultdict(Counter)
    for request, key, text, exercise in exercises:
        if exercise.reason is not None:
            result, checks = exercise.reason, {}
        else:
            variant_runs = {name: runs[run_key(f"{key}:{name}", src)] for name, src in exercise.variants().items()}
            result = exercise_outcome(variant_runs)
            checks = {name: {"status": run.get("status"), "exit_code": run.get("exit_code")}
                      for name, run in variant_runs.items()}
            if result == "ok" and "mutated" in exercise.variants():
                prompt = request.messages[-1]["content"]
                pairs.append({"prompt": prompt, "chosen": exercise.solution,
                              "rejected": mutate_solution(exercise.solution),
                              "why": "its own tests fail on it (a mutated solution)",
                              "source": f"verification:{key[:24]}"})
        verification = {"kind": "code_exercise", "outcome": result, "checks": checks, "isolation": isolation}
        _record(plan, request, key, text, result, verification, stats, kept, rejected)
    return _finish(output, kept, rejected, pairs, stats, isolation, len(runs))


def _gold_pairs(by_seed: dict[tuple, list[tuple[Item, str]]]) -> list[dict]:
    """Pairs from replies re-solving the same seed problem: one that reached the gold answer, one that did not."""
    pairs = []
    for group in by_seed.values():
        good = [item for item, result in group if result == "ok"]
        bad = [(item, result) for item, result in group if result != "ok"]
        for chosen, (rejected, why) in zip(good, bad):
            pairs.append({"prompt": chosen.request.messages[-1]["content"], "chosen": chosen.reply,
                          "rejected": rejected.reply, "why": why, "source": f"verification:{chosen.key[:24]}"})
    return pairs


def _pairs(item: Item, answer: object, result: str, samples: list[tuple]) -> list[dict]:
    """Pairs from the solve samples of a kept new problem: a sample that returned the agreed answer against one
    that failed or returned another."""
    if item.gold or result != "ok":
        return []
    good = [s for s in samples if s[3] == "ok" and same_answer(s[2], answer)]
    bad = [s for s in samples if s[3] != "ok" or not same_answer(s[2], answer)]
    pairs = []
    for (g_req, g_text, _, _), (_, b_text, b_answer, b_result) in zip(good, bad):
        why = b_result if b_result != "ok" else f"returned {b_answer!r}, not the agreed {_plain(answer)!r}"
        pairs.append({"prompt": g_req.messages[-1]["content"], "chosen": g_text, "rejected": b_text, "why": why,
                      "source": f"verification:{item.key[:24]}"})
    return pairs


def _plain(value: object) -> object:
    """12.0 -> 12: agreed answers are compared as floats but read best as the integers they usually are."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _write(directory: Path, rows: list[dict]) -> None:
    from phi3data.generators.runner import ROWS_PER_SHARD, _write_shards

    for stale in directory.glob("part-*.parquet") if directory.exists() else []:
        stale.unlink()
    tables = [pa.Table.from_pylist(rows[i:i + ROWS_PER_SHARD]) for i in range(0, len(rows), ROWS_PER_SHARD)]
    _write_shards(directory, tables, pa.schema([("id", pa.string())]) if not tables else None)


def _summary(stats: dict[str, Counter], isolation: object, runs: int, pairs: int) -> dict:
    groups = []
    totals: Counter = Counter()
    for group, counts in sorted(stats.items()):
        cell, template = group.split("|", 1)
        totals.update(counts)
        groups.append({"cell": cell, "template": template, **counts,
                       "pass_rate": round(counts["ok"] / counts["replies"], 4) if counts["replies"] else 0.0})
    failures = {k: v for k, v in totals.items() if k not in ("replies", "ok")}
    return {"groups": groups, "replies": totals["replies"], "kept": totals["ok"],
            "pass_rate": round(totals["ok"] / totals["replies"], 4) if totals["replies"] else 0.0,
            "failures": dict(sorted(failures.items())), "programs_run": runs, "preference_pairs": pairs,
            "isolation": isolation}
