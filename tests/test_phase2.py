"""The phase-2 knowledge-level filter on real pages: the knowledge_level rubric (JSON mode against the real
llama.cpp server with SmolLM2-135M-Instruct), the weak signal labels, the knowledge-level classifier trained with
its recipe through `phi3data classify train`, and pipelines/phase2.toml on real phase-1 web data (two WARC shards
of the shared sample through web_quality.toml), the same on the local engine and Spark, with the pages the
knowledge cut removes although the edu cut keeps them recorded as findings and as examples in the run's stats."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MODEL, ROOT, SHARED, WARC_DIR, read_output, require_shared
from typer.testing import CliRunner

from phi3data.classifiers.annotate import (
    JSON_INSTRUCTION,
    JSON_SCHEMA,
    build_prompt,
    load_rubric,
    plan_annotation,
    read_rubric,
)
from phi3data.classifiers.data import SourceConfig
from phi3data.classifiers.train import ClassifierSection, TrainConfig, train_from_config
from phi3data.cli import classify_app
from phi3data.config import read_toml
from phi3data.documents import make_batch
from phi3data.pipelines.recipe import load_recipe
from phi3data.pipelines.runner import run_pipeline
from phi3data.pipelines.stages.knowledge import (
    KIND,
    KnowledgeSignals,
    KnowledgeSignalsParams,
    KnowledgeThreshold,
    KnowledgeThresholdParams,
    signal_rates,
)

DCLM = SHARED / "quality" / "dclm_majority_labeled.jsonl"
OPENSTAX = SHARED / "textbooks" / "openstax.jsonl.gz"
SHARDS = ("web-sample-00004.warc.gz", "web-sample-00005.warc.gz")  # news-heavy and guide-heavy
PHASE2 = ROOT / "pipelines" / "phase2.toml"
KNOWLEDGE_RECIPE = ROOT / "classifiers" / "knowledge_level_fasttext.toml"

SPORTS = ("The Chargers beat the Raiders 24-17 on Sunday night. Coach Anthony Lynn said on Monday that the team "
          "had won its third game of the season, and tickets for next week's playoff match go on sale today at "
          "7 p.m. for $45. The quarterback threw two touchdowns, the league announced.")
GUIDE = ("Compound interest is interest calculated on the principal and on the interest already earned. Because "
         "the interest is added to the balance, the balance grows faster over time. For example, if you invest "
         "100 at 5 percent, you earn 5 in the first year and 5.25 in the second. In general, the longer the money "
         "stays invested, the more the effect matters, which is why you should understand how to compare rates.")


@pytest.fixture(scope="module")
def phase1(tmp_path_factory) -> Path:
    """Phase-1 web data: web_quality.toml over two real WARC shards of the shared sample."""
    warc = tmp_path_factory.mktemp("warc")
    for name in SHARDS:
        (warc / name).symlink_to(require_shared(WARC_DIR / name))
    out = tmp_path_factory.mktemp("phase1")
    run_pipeline(load_recipe(ROOT / "pipelines" / "web_quality.toml"), warc, out, engine="local", workers=2,
                 progress=False)
    return out / "data"


@pytest.fixture(scope="module")
def labels(phase1, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("knowledge_labels")
    run_pipeline(load_recipe(ROOT / "pipelines" / "knowledge_labels.toml"), phase1, out, engine="local", workers=2,
                 progress=False)
    return out / "data"


@pytest.fixture(scope="module")
def knowledge_model(labels, tmp_path_factory) -> tuple[Path, dict]:
    """classifiers/knowledge_level_fasttext.toml trained through the CLI, its paths pointed at this run's labels
    (the DCLM check uses the labels of the same signals on DCLM's documents, computed here too)."""
    dclm_labels = tmp_path_factory.mktemp("knowledge_labels_dclm")
    run_pipeline(load_recipe(ROOT / "pipelines" / "knowledge_labels.toml"), require_shared(DCLM), dclm_labels,
                 engine="local", workers=1, progress=False)
    out = tmp_path_factory.mktemp("knowledge_level_fasttext")
    text = KNOWLEDGE_RECIPE.read_text()
    for old, new in (("out/classifiers/knowledge_level_fasttext", out), ("out/knowledge_labels_dclm/data",
                     dclm_labels / "data"), ("out/knowledge_labels/data", labels),
                     ("../shared/data/textbooks/openstax.jsonl.gz", require_shared(OPENSTAX))):
        assert f'"{old}"' in text, f"{KNOWLEDGE_RECIPE} no longer names {old}"
        text = text.replace(f'"{old}"', f'"{new}"')
    recipe = out.parent / "knowledge_level_fasttext.toml"
    recipe.write_text(text)
    result = CliRunner().invoke(classify_app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def edu_model(tmp_path_factory) -> Path:
    """A small, fast edu classifier (fastText on the DCLM human labels) standing in for the quickstart's."""
    config = TrainConfig(classifier=ClassifierSection(name="edu", kind="fasttext", output="unused", test_fraction=0.3),
                         source=[SourceConfig(path=str(require_shared(DCLM)), label_key="label")],
                         fasttext={"epoch": 25, "lr": 0.3, "min_count": 1, "bucket": 50_000})
    return train_from_config(config, output=tmp_path_factory.mktemp("edu_fasttext")).output


@pytest.fixture(scope="module")
def phase2_spec(edu_model, knowledge_model) -> dict:
    """pipelines/phase2.toml as shipped, with its two classifiers replaced by the ones trained here."""
    spec = read_toml(PHASE2)
    models = {"edu_score": str(edu_model), "knowledge_score": str(knowledge_model[0])}
    for stage in spec["stage"]:
        if stage["type"] == "edu_score":
            stage["model"] = models.pop(stage["name"])
    assert not models, f"{PHASE2} lacks the scoring stages {sorted(models)}"
    return spec


@pytest.fixture(scope="module")
def local_run(phase2_spec, phase1, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phase2-local")
    run_pipeline(load_recipe(phase2_spec), phase1, out, engine="local", workers=2, progress=False)
    return out


def stats_of(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())


def findings_of(out: Path) -> dict[str, dict]:
    table = pq.read_table(out / "findings")
    return {doc: dict(json.loads(detail), kind=kind) for doc, kind, detail in
            zip(table.column("id").to_pylist(), table.column("kind").to_pylist(), table.column("detail").to_pylist())}


# --- the rubric ---------------------------------------------------------------------------------------------------

def test_knowledge_rubric_has_its_own_json_reply_format(tmp_path):
    template, instruction, schema = read_rubric("knowledge_level")
    assert "{text}" in template and "<!--" not in template and "match" in template
    assert schema["properties"]["score"]["enum"] == [0, 1, 2, 3, 4, 5] and "level" not in schema["properties"]
    assert load_rubric("knowledge_level") == template
    prompt = build_prompt(template, "Page text.", 100, json_mode=True, instruction=instruction)
    assert prompt.endswith(instruction) and "Page text." in prompt and "primary" not in prompt
    # the educational rubric and its score-and-level format are unchanged
    assert read_rubric(None)[1:] == (JSON_INSTRUCTION, JSON_SCHEMA)
    assert build_prompt(load_rubric(), "x", 10, json_mode=True).endswith(JSON_INSTRUCTION)
    plan = plan_annotation([require_shared(DCLM)], tmp_path / "a.jsonl", n=1, rubric="knowledge_level",
                           json_mode=True)
    assert plan.json_schema == schema and plan.prompts[0].endswith(instruction)
    bad = tmp_path / "bad.md"
    bad.write_text("Grade {text}\n<!-- json\n{\"schema\": {}}\n-->\n")
    with pytest.raises(ValueError, match="bad.md.*instruction"):
        read_rubric(bad)


def test_knowledge_rubric_on_the_real_server(llama_server, phase1, tmp_path):
    """JSON mode constrains SmolLM2's reply to the rubric's own schema: a 0-5 score and a reason, no level."""
    output = tmp_path / "ann.jsonl"
    result = CliRunner().invoke(classify_app, [
        "annotate", str(phase1), "-o", str(output), "--base-url", llama_server, "--model", MODEL, "--sample", "2",
        "--rubric", "knowledge_level", "--max-doc-chars", "300", "--max-tokens", "48", "--json-mode",
        "--concurrency", "2", "--yes"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert record["status"] == "ok" and 0 <= record["score"] <= 5, record.get("error") or record["reply"]
        assert record["reply"].lstrip().startswith('{"score"') and '"level"' not in record["reply"]


# --- weak labels and the classifier --------------------------------------------------------------------------------

def test_signals_label_match_reports_and_explanations(labels):
    stage = KnowledgeSignals(KnowledgeSignalsParams())
    batch = make_batch([{"id": "sports", "text": SPORTS, "source": "t"}, {"id": "guide", "text": GUIDE, "source": "t"},
                        {"id": "short", "text": "Hello there.", "source": "t"}])
    out = stage.process(batch).batch
    assert out.num_rows == 3 and out.column("knowledge_label").to_pylist() == [0.0, 1.0, None]
    assert out.column("timebound_rate").to_pylist()[0] == pytest.approx(signal_rates(SPORTS)[0], rel=1e-6)
    real = pq.read_table(labels).column("knowledge_label").to_pylist()
    counts = {label: real.count(label) for label in (0.0, 1.0, None)}
    assert counts[0.0] >= 15 and counts[1.0] >= 15 and counts[None] > 0, counts


def test_knowledge_classifier_trains_from_its_recipe(knowledge_model):
    _, manifest = knowledge_model
    test, dclm = manifest["metrics"]["test"], manifest["metrics"]["dclm_signals"]
    assert test["n"] >= 30 and test["roc_auc"] >= 0.7, test
    assert dclm["n"] >= 100 and dclm["roc_auc"] >= 0.65, dclm  # the same signals on documents never trained on
    assert any(counts.get("missing_label", 0) > 0 for counts in manifest["skipped"].values())  # undecided pages


# --- the knowledge cut and its findings ----------------------------------------------------------------------------

def test_threshold_records_each_drop_and_reports_examples():
    stage = KnowledgeThreshold(KnowledgeThresholdParams(mode="score", min_score=0.5, high=1.0, examples=2,
                                                        excerpt_chars=20))
    rows = [{"id": f"d{i}", "text": f"Title {i}\n" + "word " * 30, "source": "t", "url": f"https://x/{i}"}
            for i in range(5)]
    batch = make_batch(rows).append_column("knowledge_score", pa.array([0.9, 0.1, 0.4, None, 0.45], pa.float32()))
    batch = batch.append_column("edu_score", pa.array([0.2, 0.3, 0.8, 0.5, 0.8], pa.float32()))
    decision = stage.decide(stage.summarize(batch))
    out = stage.apply(batch, decision)
    assert out.batch.column("id").to_pylist() == ["d0"]
    assert out.drops == {"knowledge_threshold:below_threshold": 3, "knowledge_threshold:missing_score": 1}
    assert [f["id"] for f in out.findings] == ["d1", "d2", "d4"]  # the missing score is counted, not a finding
    first = out.findings[0]
    assert first["kind"] == KIND and first["url"] == "https://x/1" and first["title"] == "Title 1"
    assert first["knowledge_score"] == pytest.approx(0.1) and first["edu_score"] == pytest.approx(0.3)
    assert len(first["excerpt"]) <= 20 and first["threshold"] == 0.5
    from phi3data.documents import make_findings

    report = stage.report(make_findings(stage.name, out.findings))
    assert report["dropped"] == 3
    assert [e["id"] for e in report["examples"]] == ["d1", "d2"]                      # most time-bound first
    assert [e["id"] for e in report["examples_highest_edu_score"]] == ["d2", "d4"]   # tie on edu: lower score


@pytest.mark.parametrize("engine", ["local", pytest.param("spark", marks=pytest.mark.cluster)])
def test_phase2_recipe_keeps_both_cuts_and_shows_what_edu_keeps(engine, engine_up, phase2_spec, phase1, local_run,
                                                               tmp_path):
    """pipelines/phase2.toml on real phase-1 pages: the edu cut, then the knowledge cut of the pages it kept; each
    page the knowledge cut removes is a finding with its URL, both scores and an excerpt, and the report in the
    run's stats lists examples. Spark gives the same pages, decisions and report as the local engine."""
    if engine == "local":
        out = local_run
    else:
        out = tmp_path / engine
        run_pipeline(load_recipe(phase2_spec), phase1, out, engine=engine, workers=2, progress=False)
        assert read_output(out) == read_output(local_run)
        for key in ("decisions", "reports", "documents_out"):
            assert stats_of(out)[key] == stats_of(local_run)[key]
    stats = stats_of(out)
    edu, knowledge = stats["decisions"]["edu_threshold"], stats["decisions"]["knowledge_threshold"]
    docs_in = stats["documents_read"]
    assert abs(edu["kept_docs"] - 0.30 * docs_in) <= 0.05 * docs_in and knowledge["total_docs"] == edu["kept_docs"]
    assert 0 < knowledge["kept_docs"] < edu["kept_docs"] and stats["documents_out"] == knowledge["kept_docs"]

    findings = {doc: f for doc, f in findings_of(out).items() if f["kind"] == KIND}
    kept = {doc for doc, _ in read_output(out)}
    assert len(findings) == edu["kept_docs"] - knowledge["kept_docs"] and not kept & set(findings)
    for finding in findings.values():  # the edu cut kept it, the knowledge cut removed it
        assert finding["edu_score"] >= edu["threshold_score"] and finding["knowledge_score"] < \
            knowledge["threshold_score"] + 1e-3
        assert finding["url"] and finding["excerpt"] and len(finding["excerpt"]) <= 300
    kept_scores = pq.read_table(out / "data", columns=["knowledge_score"]).column("knowledge_score").to_pylist()
    assert min(kept_scores) >= max(f["knowledge_score"] for f in findings.values())

    report = stats["reports"]["knowledge_threshold"]
    assert report == json.loads((out / "reports" / "knowledge_threshold.json").read_text())
    assert report["dropped"] == len(findings) and len(report["examples"]) == 5
    for example in report["examples"] + report["examples_highest_edu_score"]:
        assert findings[example["id"]]["url"] == example["url"]
        assert {"url", "title", "excerpt", "edu_score", "knowledge_score"} <= set(example)
    lowest = sorted(f["knowledge_score"] for f in findings.values())[:5]
    assert [e["knowledge_score"] for e in report["examples"]] == lowest
