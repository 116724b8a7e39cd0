"""`phi3data generate`'s runner against the real llama.cpp server (SmolLM2-135M) on 127.0.0.1, through a
fault-injecting proxy that records every request: provenance and coverage, a rerun that sends nothing, faults that
are retried or recorded (never lost, never duplicated), and kill -9 in the middle of a run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import MODEL
from fault_proxy import FaultProxy

from phi3data.generators.client import ClientConfig, LLMClient
from phi3data.generators.ledger import ledger_lines, read_ledger
from phi3data.generators.requests import GenRequest
from phi3data.generators.runner import generate

TOPICS = ["photosynthesis", "the water cycle", "fractions", "volcanoes", "the French revolution", "magnets",
          "gravity", "cells", "rivers", "the moon", "bees", "rain", "clouds", "trees", "the sun", "soil"]


def requests(n: int, max_tokens: int = 12) -> list[GenRequest]:
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        audience = "children" if i % 2 else "students"
        out.append(GenRequest(index=i, messages=({"role": "user",
                                                 "content": f"Write one sentence about {topic} for {audience}."},),
                              params={"max_tokens": max_tokens, "temperature": 0.0, "seed": 1000 + i},
                              cell={"topic": topic, "audience": audience, "style": "textbook"},
                              template_id="one_sentence", template_hash="t0", seed_id=f"seed-{i}",
                              seed_text=f"A note on {topic}."))
    return out


def client(url: str, **kw) -> LLMClient:
    return LLMClient(ClientConfig(**{"base_url": url, "model": MODEL, "max_concurrency": 2, "timeout_s": 60, **kw}))


def data_rows(out: Path) -> list[dict]:
    return pq.read_table(out / "data").to_pylist()


@pytest.fixture
def proxy(llama_server):
    p = FaultProxy(llama_server)
    yield p
    p.close()


def test_generates_with_provenance_and_coverage_and_a_rerun_sends_nothing(proxy, tmp_path):
    plan = requests(6)
    out = tmp_path / "gen"
    first = generate(plan, out, client(proxy.url), plan_name="unit")
    assert (first.planned, first.sent, first.answered, first.failed, first.pending) == (6, 6, 6, 0, 0)
    assert len(proxy.bodies) == 6
    rows = data_rows(out)
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6 and all(r["text"].strip() for r in rows)
    meta = [json.loads(r["metadata"]) for r in rows]
    assert [m["seed_id"] for m in meta] == [f"seed-{i}" for i in range(6)], "rows follow the plan's order"
    for m, request in zip(meta, plan):
        assert m["cell"] == request.cell and m["template_id"] == "one_sentence" and m["model"] == MODEL
        assert m["params"]["seed"] == request.params["seed"] and m["finish_reason"] in ("stop", "length")
        assert m["usage"]["completion_tokens"] > 0 and m["request_key"] == request.key(proxy.url, MODEL)
    coverage = json.loads((out / "coverage.json").read_text())
    assert coverage["totals"]["planned"] == coverage["totals"]["generated"] == 6 and not coverage["short_cells"]
    assert "| **total** | 6 | 6 |" in (out / "coverage.md").read_text()
    before = {p.name: p.read_bytes() for p in sorted((out / "data").glob("*.parquet"))}

    again = generate(plan, out, client(proxy.url), plan_name="unit")
    assert again.sent == 0 and again.already_answered == 6 and len(proxy.bodies) == 6, "a rerun sends nothing"
    assert {p.name: p.read_bytes() for p in sorted((out / "data").glob("*.parquet"))} == before

    changed = [GenRequest(**{**r.__dict__, "template_hash": "t1"}) if r.index < 2 else r for r in plan]
    third = generate(changed, out, client(proxy.url), plan_name="unit")
    assert third.sent == 2 and len(proxy.bodies) == 8, "a changed template is a new request, not a stale hit"


def test_faults_are_retried_or_recorded_never_lost_or_duplicated(proxy, tmp_path):
    plan = requests(8)
    out = tmp_path / "gen"
    proxy.script = [("status", 500, {}), ("status", 429, {"Retry-After": "0"}), ("drop",), ("truncate",),
                    ("malformed",), ("status", 400, {})]
    summary = generate(plan, out, client(proxy.url, max_retries=5, backoff_initial_s=0.0, max_concurrency=1),
                       plan_name="unit", concurrency=1)
    assert summary.answered == 7 and summary.failed == 1 and summary.pending == 0
    rows = data_rows(out)
    failures = pq.read_table(out / "failures").to_pylist()
    assert len(rows) == 7 and len(failures) == 1 and failures[0]["error_class"] == "http_400"
    assert {r["id"] for r in rows}.isdisjoint({f["id"] for f in failures})
    assert len({r["id"] for r in rows} | {f["id"] for f in failures}) == 8, "every request is a row: none lost"
    coverage = json.loads((out / "coverage.json").read_text())
    assert coverage["totals"]["failed"] == 1 and len(coverage["short_cells"]) == 1

    sent_before = len(proxy.bodies)
    rerun = generate(plan, out, client(proxy.url), plan_name="unit")
    assert rerun.sent == 1 and len(proxy.bodies) == sent_before + 1, "only the failed request is sent again"
    assert len(data_rows(out)) == 8 and pq.read_table(out / "failures").num_rows == 0
    statuses = [json.loads(line)["status"] for line in ledger_lines(out)]
    assert statuses.count("failed") == 1 and statuses.count("ok") == 8, "the failure stays in the ledger as history"


GENERATE_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_generate import client, requests
from phi3data.generators.runner import generate
generate(requests(int(sys.argv[4]), max_tokens=24), Path(sys.argv[1]), client(sys.argv[2]), plan_name="unit",
         concurrency=1)
"""


def test_kill_9_mid_run_then_resume_sends_nothing_answered_and_loses_nothing(proxy, tmp_path):
    n = 16
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", GENERATE_SCRIPT, str(out), proxy.url,
                                str(Path(__file__).parent), str(n)])
    try:
        while sum(1 for _ in ledger_lines(out)) < 5 if (out / "ledger").exists() else True:
            if process.poll() is not None:
                pytest.fail("the generate process ended before it could be killed")
            time.sleep(0.05)
        process.send_signal(signal.SIGSTOP)  # freeze, count what is recorded, then kill: nothing moves between
        answered = read_ledger(out).answered()
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert 5 <= len(answered) < n
    sent_before = len(proxy.bodies)
    resumed = generate(requests(n, max_tokens=24), out, client(proxy.url), plan_name="unit", concurrency=1)
    answered_prompts = {r.messages[0]["content"] for r in requests(n, max_tokens=24)
                        if r.key(proxy.url, MODEL) in answered}
    resent = [b for b in proxy.bodies[sent_before:] if b["messages"][0]["content"] in answered_prompts]
    assert resent == [], "nothing the ledger had answered is sent again"
    assert resumed.sent == n - len(answered) and resumed.pending == 0
    rows = data_rows(out)
    assert len(rows) == n and len({r["id"] for r in rows}) == n

    reference = generate(requests(n, max_tokens=24), tmp_path / "whole", client(proxy.url), plan_name="unit",
                         concurrency=1)
    assert reference.answered == n
    assert [(r["id"], r["text"]) for r in rows] == [(r["id"], r["text"]) for r in data_rows(tmp_path / "whole")]


@pytest.mark.cluster
def test_ray_fans_out_over_two_real_servers_and_answers_each_request_once(ray_cluster, llama_server, tmp_path,
                                                                         monkeypatch):
    """Two llama.cpp server processes, one Ray actor each (on a two-node Ray cluster): every request is answered
    exactly once, by one of the replicas, and a rerun over the same replica group sends nothing. The driver
    reports progress while the actors work: growing counts, the last one the total."""
    from conftest import running_llama_server

    from phi3data.generators import fanout

    monkeypatch.setattr(fanout, "PROGRESS_EVERY_S", 0.05)

    plan = requests(10)
    with running_llama_server(tmp_path, threads=1) as second:
        first_proxy, second_proxy = FaultProxy(llama_server), FaultProxy(second)
        try:
            replicas = [first_proxy.url, second_proxy.url]
            out = tmp_path / "gen"
            reports: list[dict] = []
            summary = generate(plan, out, client(first_proxy.url), plan_name="unit", replicas=replicas,
                               progress=reports.append)
            assert summary.answered == 10 and summary.pending == 0 and summary.failed == 0
            done = [r["done"] for r in reports]
            assert done == sorted(done) and any(0 < d < 10 for d in done), f"progress while sending: {done}"
            assert reports[-1]["done"] == reports[-1]["total"] == reports[-1]["answered"] == 10
            assert reports[-1]["failed"] == 0 and reports[-1]["completion_tokens"] > 0
            tokens = [r["completion_tokens"] for r in reports]
            assert tokens == sorted(tokens)
            prompts = [[b["messages"][0]["content"] for b in p.bodies] for p in (first_proxy, second_proxy)]
            assert len(prompts[0]) == len(prompts[1]) == 5, "round-robin: half each"
            assert sorted(prompts[0] + prompts[1]) == sorted(r.messages[0]["content"] for r in plan)
            rows = [json.loads(line) for line in ledger_lines(out)]
            assert len(rows) == 10 and len({r["key"] for r in rows}) == 10
            assert len(list((out / "ledger").iterdir())) == 2, "one ledger file per replica's actor"
            assert len(data_rows(out)) == 10
            again = generate(plan, out, client(first_proxy.url), plan_name="unit",
                             replicas=list(reversed(replicas)))
            assert again.sent == 0 and len(first_proxy.bodies) + len(second_proxy.bodies) == 10
        finally:
            first_proxy.close()
            second_proxy.close()


def test_generate_command_runs_a_plan_end_to_end_and_resumes(llama_server, tmp_path):
    """`phi3data generate` on a small plan (OpenStax outlines x one style x two audiences) against the real
    server: a corpus with provenance, a coverage report, and a rerun that sends nothing. The output is read by
    `phi3data run` with the synthetic recipe unchanged."""
    from typer.testing import CliRunner

    from phi3data.cli import app
    from phi3data.pipelines.recipe import load_recipe
    from phi3data.pipelines.runner import run_pipeline

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "lesson.j2").write_text("Write a short lesson for {{ audience }} about {{ topic }}.\n"
                                              "Outline:\n{{ outline }}\n", encoding="utf-8")
    plan = tmp_path / "plan.toml"
    plan.write_text('name = "lessons"\nmodel = "x"\nseed = 1\n\n[sampling]\nmax_tokens = 24\ntemperature = 0.0\n\n'
                    '[styles]\nlesson = "t/lesson.j2"\n\n[audiences]\nkids = "young children"\n'
                    'adults = "adults"\n\n[[seeds]]\nname = "books"\nkind = "outlines"\n'
                    'path = "{data}/textbooks/openstax.jsonl.gz"\ntopic_field = "metadata.source"\n'
                    'styles = ["lesson"]\naudiences = ["kids", "adults"]\nlimit = 2\n', encoding="utf-8")
    out = tmp_path / "out"
    args = ["generate", str(plan), "--output", str(out), "--base-url", llama_server, "--model", MODEL,
            "--concurrency", "1", "--no-progress"]
    dry = CliRunner().invoke(app, [*args, "--dry-run"], terminal_width=200)
    assert dry.exit_code == 0, dry.output + repr(dry.exception)
    assert not out.exists(), "a dry run sends and writes nothing"
    first = CliRunner().invoke(app, args, terminal_width=200)
    assert first.exit_code == 0, first.output + repr(first.exception)
    rows = data_rows(out)
    planned = json.loads((out / "manifest.json").read_text())["requests"]
    assert planned >= 2 and len(rows) == planned and "complete" in first.output
    meta = json.loads(rows[0]["metadata"])
    assert meta["plan"] == "lessons" and meta["template_id"] and len(meta["template_hash"]) >= 8
    assert meta["cell"]["style"] == "lesson" and meta["seed_text"] and meta["model"] == MODEL
    again = CliRunner().invoke(app, args, terminal_width=200)
    assert again.exit_code == 0 and f"{planned} answered before, 0 sent now" in again.output

    curated = run_pipeline(load_recipe(Path(__file__).parents[1] / "pipelines" / "synthetic.toml"), out / "data",
                           tmp_path / "curated", progress=False)
    assert curated.stats["documents_read"] == planned and curated.stats["rejects_out"] == 0


def test_a_token_budget_stops_the_run_cleanly_and_a_rerun_finishes_it(proxy, tmp_path):
    plan = requests(8)
    out = tmp_path / "gen"
    # each request is estimated at prompt chars / 4 + max_tokens (about 25 tokens): about three fit
    capped = generate(plan, out, client(proxy.url, max_total_tokens=80, max_concurrency=1), plan_name="unit",
                      concurrency=1)
    assert capped.stopped and 0 < capped.answered < 8 and capped.pending == 8 - capped.answered
    assert capped.failed == 0, "requests the budget kept back are not failures"
    coverage = json.loads((out / "coverage.json").read_text())
    assert coverage["totals"]["pending"] == capped.pending
    sent = len(proxy.bodies)
    assert sent == capped.answered
    finished = generate(plan, out, client(proxy.url), plan_name="unit")
    assert finished.sent == capped.pending and len(proxy.bodies) == 8 and finished.pending == 0


def test_vllm_in_process_without_vllm_says_how_to_install(tmp_path):
    """vLLM is imported only when asked for; without it the command says which extra installs it."""
    from typer.testing import CliRunner

    from phi3data.cli import app

    plan = Path(__file__).resolve().parents[1] / "generators" / "chat.toml"  # topic seeds: no files to read
    result = CliRunner().invoke(app, ["generate", str(plan), "--output", str(tmp_path / "o"), "--vllm-model",
                                      "HuggingFaceTB/SmolLM2-135M-Instruct"])
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert result.exit_code == 2, result.output
        assert "pip install 'phi3data[vllm]'" in result.stderr
        assert not (tmp_path / "o" / "ledger").exists()
    else:
        pytest.fail("this test is for a machine without vLLM; with it, run the vLLM check in docs/benchmarks.md")
