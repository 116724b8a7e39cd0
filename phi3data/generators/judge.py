"""Preference pairs for DPO from an LLM judge with a rubric, for open-ended prompts that no program can check.

A plan with a ``[judge]`` section answers each of its prompts twice: the plan's own requests give answer A, and a
second step sends the same messages with another seed for answer B. The judge then reads the prompt, both answers
and the rubric, reasons, and ends with its verdict (``Verdict: A`` or ``Verdict: B``). With ``both_orders`` it is
asked again with the answers swapped, and a pair is kept only when both verdicts pick the same answer, so a judge
that prefers whichever answer comes first yields nothing rather than noise.

Each step is a ``generate`` call into its own folder under ``judge/`` (its own ledger, content-keyed requests), so
a killed run resumes with nothing re-sent. Pairs go to ``judge/preferences.jsonl`` (``prompt``, ``chosen``,
``rejected``, ``why``: the judge's reasoning, ``verdicts``); prompts without a pair are counted by reason.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from phi3data.generators.plan import GenerationPlan
from phi3data.generators.requests import GenRequest
from phi3data.io.writers import write_json_atomic, write_jsonl_atomic

JUDGE_DIR = "judge"
_VERDICT = re.compile(r"verdict\s*[:\-]?\s*\**\s*\(?([AB])\b", re.IGNORECASE)
GenerateStep = Callable[[str, list[GenRequest]], tuple[list[str], dict[str, dict]]]


def parse_verdict(text: str) -> str | None:
    """``A`` or ``B`` from the judge's last ``Verdict: X`` line, else None."""
    found = _VERDICT.findall(text or "")
    return found[-1].upper() if found else None


def _seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:4], "big") % (2 ** 31)


def _ok(rows: dict[str, dict], key: str) -> str | None:
    row = rows.get(key)
    return row["text"].strip() if row is not None and row.get("status") == "ok" and row["text"].strip() else None


def judge_pairs(plan: GenerationPlan, requests: Sequence[GenRequest], keys: Sequence[str], rows: dict[str, dict],
                output: Path, generate_step: GenerateStep) -> dict:
    """Second answers, judge verdicts in one or both orders, and the pairs they agree on; returns a summary."""
    judge, rubric = plan.judge, plan.rubric_template
    first = {key: _ok(rows, key) for key in keys}
    live = [(r, k) for r, k in zip(requests, keys) if first[k]]
    seconds = [GenRequest(index=i, messages=r.messages, params={**r.params, "seed": _seed(k, "second")},
                          cell=dict(r.cell), template_id=r.template_id, template_hash=r.template_hash,
                          seed_id=k, extra={"prompt_key": k, "answer": "B"}) for i, (r, k) in enumerate(live)]
    second_keys, second_rows = generate_step("answers-b", seconds) if seconds else ([], {})
    second = {k: _ok(second_rows, sk) for (_, k), sk in zip(live, second_keys)}
    both = [(r, k) for r, k in live if second[k] and second[k] != first[k]]
    orders = ("ab", "ba") if judge.both_orders else ("ab",)
    verdicts: dict[str, dict[str, str | None]] = {k: {} for _, k in both}
    reasons: dict[str, dict[str, str]] = {k: {} for _, k in both}
    for order in orders:
        judge_requests = []
        for i, (request, key) in enumerate(both):
            a, b = (first[key], second[key]) if order == "ab" else (second[key], first[key])
            prompt = rubric.render(prompt=request.messages[-1]["content"], answer_a=a, answer_b=b)
            judge_requests.append(GenRequest(
                index=i, messages=({"role": "user", "content": prompt},),
                params={"max_tokens": judge.max_tokens, "temperature": 0.0, "seed": _seed(key, order)},
                cell=dict(request.cell), template_id=rubric.id, template_hash=rubric.hash, seed_id=key,
                extra={"prompt_key": key, "order": order}))
        judge_keys, judge_rows = generate_step(f"verdicts-{order}", judge_requests) if judge_requests else ([], {})
        for (_, key), judge_key in zip(both, judge_keys):
            text = _ok(judge_rows, judge_key) or ""
            verdict = parse_verdict(text)
            # a verdict names a position; map it back to the first or the second answer
            verdicts[key][order] = None if verdict is None else (
                ("first" if verdict == "A" else "second") if order == "ab" else ("second" if verdict == "A" else
                                                                                  "first"))
            reasons[key][order] = text
    pairs, outcomes = [], Counter()
    for request, key in zip(requests, keys):
        if not first[key]:
            outcomes["no_first_answer"] += 1
            continue
        if not second.get(key):
            outcomes["no_second_answer"] += 1
            continue
        if key not in verdicts:
            outcomes["identical_answers"] += 1
            continue
        picked = set(verdicts[key].values())
        if None in picked:
            outcomes["no_verdict"] += 1
            continue
        if len(picked) > 1:
            outcomes["inconsistent_verdicts"] += 1
            continue
        winner = picked.pop()
        chosen, rejected = (first[key], second[key]) if winner == "first" else (second[key], first[key])
        outcomes["pair"] += 1
        pairs.append({"prompt": request.messages[-1]["content"], "chosen": chosen, "rejected": rejected,
                      "why": reasons[key]["ab"], "verdicts": verdicts[key], "source": f"judge:{key[:24]}",
                      "metadata": json.dumps({"plan": plan.name, "cell": request.cell, "request_key": key,
                                              "rubric": [rubric.id, rubric.hash]}, sort_keys=True)})
    path = output / JUDGE_DIR / "preferences.jsonl"
    write_jsonl_atomic(path, pairs)
    summary = {"prompts": len(keys), "pairs": len(pairs), "outcomes": dict(sorted(outcomes.items())),
               "both_orders": judge.both_orders}
    write_json_atomic(output / JUDGE_DIR / "summary.json", summary)
    return summary
