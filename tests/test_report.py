"""`phi3data report`: the HTML report of real runs over the shared data, opened in headless Chromium (Debian's
/usr/bin/chromium driven by Playwright, no browser download).

Each report kind is built from a small real run: a curation run (two WARC shards, one truncated, plus a JSONL file
with planted documents), a dedup + decontamination run over its output, token shards and a two-phase mix, a
generation run against the session's llama.cpp server, and the toy ablation ladder. In the browser each page must
load with no console error and no request but the file itself, show every section the run has, show the numbers
of the run's own JSON files, and show planted HTML (`<script>`, an `<img onerror>`) as text without running it.
A full-page screenshot of each kind goes to pytest's tmp dir (printed, kept as an artifact).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MODEL, ROOT, SHARED, WARC_DIR, require_shared
from typer.testing import CliRunner

from phi3data.cli import app

CHROMIUM = Path(os.environ.get("PHI3DATA_CHROMIUM", "/usr/bin/chromium"))
SCRIPT = "<script>window.__pwned=1</script>"
BROKEN_SCRIPT = "<script>window.__pwned=2</script>"
IMG = '<img src=x onerror="window.__pwned=3">'
SEED_SCRIPT = "<script>window.__pwned=4</script>"
ARC = SHARED / "eval" / "gauntlet" / "arc_easy.jsonl"
SIZE_BOUND = 3_000_000  # bytes: samples and excerpts are capped, so a report stays small


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), terminal_width=400)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def _books(n: int) -> list[str]:
    out = []
    with gzip.open(require_shared(SHARED / "textbooks" / "openstax.jsonl.gz"), "rt", encoding="utf-8") as handle:
        for line in handle:
            text = json.loads(line)["text"]
            if 3000 < len(text) < 9000:
                out.append(text)
            if len(out) == n:
                return out
    raise AssertionError("too few textbook sections")


def _arc_quiz() -> str:
    with open(require_shared(ARC), encoding="utf-8") as handle:
        row = json.loads(handle.readline())
    return row["query"] + "\n" + "\n".join(f"{label}. {c}" for label, c in zip("ABCD", row["choices"]))


def _with(text: str, planted: str) -> str:
    """``planted`` as its own paragraph after the first paragraph of a real textbook section."""
    head, _, tail = text.partition("\n\n")
    return f"{head}\n\n{planted}\n\n{tail}"


# ---------------------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def curation(tmp_path_factory) -> dict:
    """web_quality over two real WARC shards (one cut short: a reject) and planted JSONL documents, through the
    CLI (which writes the report with replayed drop examples); then exact dedup + ARC decontamination over it."""
    tmp = tmp_path_factory.mktemp("report-curation")
    inp = tmp / "in"
    inp.mkdir()
    (inp / "web-sample-00000.warc.gz").symlink_to(require_shared(WARC_DIR / "web-sample-00000.warc.gz"))
    small = (WARC_DIR / "web-sample-00008.warc.gz").read_bytes()
    (inp / "web-sample-00008.warc.gz").write_bytes(small[: int(len(small) * 0.6)])
    books = _books(4)  # sections 0, 2 and 3 pass web_quality's filters (1 has too many repeated lines)
    lines = [json.dumps({"id": "plant-a", "text": _with(books[0], f"Read this: {SCRIPT} and go on."),
                         "url": "https://planted.example/a"}),
             json.dumps({"id": "plant-b", "text": _with(books[0], f"Read this: {SCRIPT} and go on."),
                         "url": "https://planted.example/b"}),
             json.dumps({"id": "plant-arc", "text": _with(books[2], _arc_quiz()), "url": "https://planted.example/q"}),
             json.dumps({"id": "plant-lorem", "text": _with(books[3], "Lorem ipsum dolor sit amet, and an image "
                                                                      f"follows here: {IMG} as you can see."),
                         "url": "https://planted.example/lorem"}),
             '{"id": "plant-broken", "text": "' + BROKEN_SCRIPT + ' never closed']
    (inp / "planted.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp / "web"
    printed = _cli("run", str(ROOT / "pipelines" / "web_quality.toml"), "--input", str(inp), "--output", str(out),
                   "--no-progress")
    post_recipe = tmp / "post.toml"
    post_recipe.write_text('[pipeline]\nname = "dedup_decon"\n\n[[stage]]\ntype = "exact_dedup"\n\n'
                           f'[[stage]]\ntype = "decontaminate"\nbenchmarks = ["{ARC}"]\n', encoding="utf-8")
    post = tmp / "post"
    post_printed = _cli("run", str(post_recipe), "--input", str(out / "data"), "--output", str(post), "--no-progress")
    return {"tmp": tmp, "input": inp, "out": out, "printed": printed, "post": post, "post_printed": post_printed}


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the report tests drive Chromium with Playwright: pip install -c constraints.txt -e '.[test]'")
    if not CHROMIUM.exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y --no-install-recommends chromium "
                    f"(make install does it), or set PHI3DATA_CHROMIUM")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield instance
        instance.close()


def open_report(browser, html: Path, shot: Path):
    """Open a report; assert no console error, no page error and no request but the file; take a screenshot."""
    assert html.is_file() and html.stat().st_size < SIZE_BOUND, html
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    started = time.perf_counter()
    page.goto(html.resolve().as_uri(), wait_until="load")
    print(f"{html.name}: {html.stat().st_size:,} bytes, loaded in {time.perf_counter() - started:.2f}s; "
          f"screenshot {shot}", file=sys.stderr)
    page.screenshot(path=str(shot), full_page=True)
    assert errors == []
    assert [u for u in requests if u != html.resolve().as_uri() and not u.startswith("data:")] == []
    assert page.evaluate("typeof window.__pwned") == "undefined"
    return page


def sections(page) -> set[str]:
    return set(page.eval_on_selector_all("section[data-section]", "s => s.map(e => e.dataset.section)"))


# --------------------------------------------------------------------------------------------------------- tests
def test_curation_report_shows_the_run(curation, browser, tmp_path):
    out = curation["out"]
    stats = json.loads((out / "stats.json").read_text())
    assert f"report: {out / 'report.html'}" in curation["printed"].replace("\n", "")
    page = open_report(browser, out / "report.html", tmp_path / "curation.png")
    assert sections(page) >= {"summary", "funnel", "drops", "scores", "languages", "domains", "lengths", "rejects"}

    # the funnel: every stage's documents in and out, as data and as the numbers a person reads
    rows = page.eval_on_selector_all("#funnel-table tr[data-stage]", "rs => rs.map(r => [r.dataset.stage, "
                                     "+r.dataset.in, +r.dataset.out, r.cells[2].innerText, r.cells[3].innerText])")
    assert rows[0][:3] == ["(read)", stats["documents_read"], stats["documents_read"]]
    assert rows[1:] == [[s["name"], s["in"], s["out"], f"{s['in']:,}", f"{s['out']:,}"] for s in stats["stages"]]
    cards = dict(page.eval_on_selector_all(".card[data-card]", "cs => cs.map(c => [c.dataset.card, "
                                                                "c.querySelector('b').innerText])"))
    assert cards["documents read"] == f"{stats['documents_read']:,}"
    assert cards["documents kept"] == f"{stats['documents_out']:,}"

    # drops by reason equal stats.json; the replay gave examples, beside kept documents
    drops = dict(page.eval_on_selector_all("#drops-table tr[data-reason]", "rs => rs.map(r => [r.dataset.reason, "
                                                                               "+r.dataset.count])"))
    assert drops == {reason: n for s in stats["stages"] for reason, n in s["drops"].items()}
    assert page.locator(".doc.dropped").count() >= 5 and page.locator(".pair .doc.kept").count() >= 5
    # bad input by reason equals stats.json, with its excerpt
    rejects = dict(page.eval_on_selector_all("[data-reject]",
                                             "hs => hs.map(h => [h.dataset.reject, +h.dataset.count])"))
    assert rejects == stats["read_rejects"] and "malformed_json" in rejects and "truncated_gzip" in rejects
    # the language-score histogram marks the recipe's threshold
    assert page.locator("[data-histogram=language_score] line.threshold").count() == 1

    # planted HTML is shown as text and never runs (open_report checked window.__pwned)
    body = page.inner_text("body")
    assert BROKEN_SCRIPT in body  # the malformed line's excerpt
    assert IMG in body  # the document dropped by c4_quality:lorem_ipsum, replayed
    assert page.locator("img").count() == 0 and page.locator("script").count() == 0

    # the replay is faithful: what it kept is in the output, what it dropped is not
    from phi3data.report.curation import build

    context = build(out, curation["input"])
    kept_ids = {r["id"] for r in _rows(out)}
    assert context["replay"]["kept"] >= 1
    assert all(d["id"] not in kept_ids for d in context["replay"]["drops"])
    assert {d["id"] for d in context["replay"]["drops"]} >= {"plant-lorem"}


def _rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [r for p in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(p, columns=["id"]).to_pylist()]


def test_dedup_and_contamination_report(curation, browser, tmp_path):
    post = curation["post"]
    stats = json.loads((post / "stats.json").read_text())
    decon = json.loads((post / "reports" / "decontaminate.json").read_text())
    assert decon["totals"]["documents"] >= 1
    page = open_report(browser, post / "report.html", tmp_path / "dedup_decontaminate.png")
    assert sections(page) >= {"funnel", "drops", "dedup", "contamination"}
    # the planted duplicate pair, side by side: plant-a kept, plant-b dropped; both texts shown (as text)
    cluster = page.locator("[data-cluster=plant-a] + .pair")
    assert "plant-b" in cluster.inner_text() and cluster.inner_text().count(SCRIPT) == 2
    # contamination: per-benchmark documents equal the stage's report; the ARC item beside the document
    shown = dict(page.eval_on_selector_all("table[data-report] tr[data-benchmark]",
                                           "rs => rs.map(r => [r.dataset.benchmark, +r.dataset.documents])"))
    assert shown == {b: e["documents"] for b, e in decon["benchmarks"].items()}
    section = page.inner_text("#contamination")
    assert "gauntlet/arc_easy" in section and "Which statement best explains why photosynthesis" in section
    assert "plant-arc" in section
    hit = page.inner_text("[data-hit=plant-arc]")  # the item as the benchmark file has it, beside the document
    assert "nearly all ecosystems.\nMost ecosystems are found" in hit  # the file's own text: choices unlabelled
    drops = dict(page.eval_on_selector_all("#drops-table tr[data-reason]", "rs => rs.map(r => [r.dataset.reason, "
                                                                               "+r.dataset.count])"))
    assert drops == {reason: n for s in stats["stages"] for reason, n in s["drops"].items()}


def test_compare_two_recipes_on_one_page(curation, browser, tmp_path):
    runs = [curation["out"], curation["post"]]
    target = tmp_path / "compare.html"
    printed = _cli("report", *map(str, runs), "--compare", "--output", str(target))
    assert f"report: {target}" in printed.replace("\n", "")
    page = open_report(browser, target, tmp_path / "compare.png")
    assert sections(page) == {"funnels", "scores"}
    shown = page.eval_on_selector_all("#compare-table tr[data-run]", "rs => rs.map(r => [r.dataset.run, "
                                      "+r.dataset.read, +r.dataset.kept])")
    for (directory, read, kept), run in zip(shown, runs):
        stats = json.loads((run / "stats.json").read_text())
        assert directory == str(run) and (read, kept) == (stats["documents_read"], stats["documents_out"])
    assert page.locator("[data-histogram=language_score] svg").count() == 1


def test_token_shards_and_mix_report(curation, browser, tmp_path):
    tokens = tmp_path / "tokens"
    for name, source in (("web", curation["out"] / "data"), ("post", curation["post"] / "data")):
        printed = _cli("tokenize", str(source), "--output", str(tokens / name), "--tokenizer", "phi3-mini",
                       "--no-progress")
        assert f"report: {tokens / name / 'report.html'}" in printed.replace("\n", "")
    mix = tmp_path / "mix.toml"
    mix.write_text(f'name = "two"\nseed = 1\n\n[[phases]]\nname = "phase1"\ntokens = 200_000\nsources = [\n'
                   f'  {{ name = "web", path = "{tokens / "web"}", weight = 0.7 }},\n'
                   f'  {{ name = "post", path = "{tokens / "post"}", weight = 0.3 }},\n]\n\n'
                   f'[[phases]]\nname = "phase2"\ntokens = 100_000\nsources = [\n'
                   f'  {{ name = "post", path = "{tokens / "post"}", weight = 1.0 }},\n]\n', encoding="utf-8")
    mixed = tmp_path / "mixed"
    printed = _cli("mix", str(mix), "--output", str(mixed))
    assert f"report: {mixed / 'report.html'}" in printed.replace("\n", "")

    manifest = json.loads((tokens / "web" / "manifest.json").read_text())
    page = open_report(browser, tokens / "web" / "report.html", tmp_path / "tokens.png")
    part = page.locator("section[data-part]")
    assert part.count() == 1 and int(part.get_attribute("data-tokens")) == manifest["tokens"]
    assert int(part.get_attribute("data-documents")) == manifest["documents"]
    assert page.locator("section[data-part] svg").count() == 1  # the document-length histogram

    page = open_report(browser, mixed / "report.html", tmp_path / "mix.png")
    for phase in ("phase1", "phase2"):
        report = json.loads((mixed / phase / "manifest.json").read_text())
        section = page.locator(f"section[data-part={phase}]")
        assert int(section.get_attribute("data-tokens")) == report["tokens"]
        shown = dict(section.locator("tr[data-source]").evaluate_all(
            "rs => rs.map(r => [r.dataset.source, +r.dataset.tokens])"))
        assert shown == {r["source"]: r["tokens"] for r in report["sources"]}
        assert section.locator("[data-repeats]").count() == 1
    assert "Mixture proportions" in page.inner_text("section[data-part=phase1]")


def test_generation_report(llama_server, browser, tmp_path):
    """A small plan against the real server; the seeds carry a <script> that the provenance shows as text."""
    seeds = tmp_path / "seeds.jsonl"
    books = _books(2)
    seeds.write_text("\n".join(json.dumps({"id": f"s{i}", "text": f"{SEED_SCRIPT}\n{book[:400]}",
                                           "metadata": {"source": f"book{i}"}}) for i, book in enumerate(books))
                     + "\n", encoding="utf-8")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "lesson.j2").write_text("Write two sentences for {{ audience }} about {{ topic }}.\n"
                                              "Outline:\n{{ outline }}\n", encoding="utf-8")
    plan = tmp_path / "plan.toml"
    plan.write_text('name = "lessons"\nmodel = "x"\nseed = 1\n\n[sampling]\nmax_tokens = 16\ntemperature = 0.0\n\n'
                    '[styles]\nlesson = "t/lesson.j2"\n\n[audiences]\nkids = "young children"\nadults = "adults"\n\n'
                    f'[[seeds]]\nname = "books"\nkind = "outlines"\npath = "{seeds}"\n'
                    'topic_field = "metadata.source"\nstyles = ["lesson"]\naudiences = ["kids", "adults"]\n',
                    encoding="utf-8")
    out = tmp_path / "gen"
    # in a process of its own: the runner's asyncio loop cannot run inside Playwright's (the browser is open)
    proc = subprocess.run([sys.executable, "-m", "phi3data.cli", "generate", str(plan), "--output", str(out),
                           "--base-url", llama_server, "--model", MODEL, "--concurrency", "1", "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    printed = proc.stdout
    assert f"report: {out / 'report.html'}" in printed.replace("\n", "")
    coverage = json.loads((out / "coverage.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    page = open_report(browser, out / "report.html", tmp_path / "generation.png")
    assert sections(page) >= {"summary", "coverage", "failures", "samples", "usage"}
    assert page.locator("#coverage svg.heatmap").count() == 1
    shown = page.eval_on_selector_all("#coverage-table tr[data-cell]", "rs => rs.map(r => [+r.dataset.planned, "
                                      "+r.dataset.kept])")
    assert [p for p, _ in shown] == [c["planned"] for c in coverage["cells"]]
    assert sum(k for _, k in shown) == manifest["answered"] == coverage["totals"]["generated"]
    assert page.locator("[data-sample]").count() == len(coverage["cells"])
    assert SEED_SCRIPT in page.inner_text("#samples")  # the seed outline, as text
    usage = dict(page.eval_on_selector_all("#usage-table tr[data-usage]", "rs => rs.map(r => [r.dataset.usage, "
                                           "r.cells[1].innerText])"))
    assert usage["completion_tokens"] == f"{manifest['client_usage']['completion_tokens']:,}"


def test_ladder_report(browser, tmp_path):
    from test_ladder import _ablate, _config

    out = tmp_path / "ladder"
    proc = _ablate(_config(tmp_path), out)
    stdout, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, stdout
    assert f"report: {out / 'report.html'}" in stdout.replace("\n", "")
    fits = json.loads((out / "fits.json").read_text())
    page = open_report(browser, out / "report.html", tmp_path / "ladder.png")
    assert sections(page) == {"summary", "plots", "fits", "verdict", "runs"}
    assert page.locator("figure[data-plot] img").count() == 2  # inline PNGs: data: URIs, nothing fetched
    shown = page.eval_on_selector_all("#fits-table tr[data-metric]", "rs => rs.map(r => [r.dataset.metric, "
                                      "r.dataset.recipe, +r.dataset.b])")
    assert sorted((m, r) for m, r, _ in shown) == sorted((m, r) for m in fits for r in fits[m])
    for metric, recipe, b in shown:
        assert b == pytest.approx(fits[metric][recipe]["b"])
    assert page.locator("#verdict-table tr[data-comparison]").count() >= 1
    assert "textbooks vs web" in page.inner_text("#verdict")
    assert page.locator("#runs-table tr[data-run]").count() == 4


def test_an_unknown_directory_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "holds no phi3data output" in result.stderr
