"""The edu_score stage and the edu_threshold global stage (score / percentile / token budget), with a real
fastText classifier trained on the DCLM human labels, and the same decision on the local, Ray and Spark engines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import SHARED, read_output, require_shared

from phi3data.classifiers.data import SourceConfig
from phi3data.classifiers.saved import load_classifier
from phi3data.classifiers.tokens import count_tokens
from phi3data.classifiers.train import ClassifierSection, TrainConfig, train_from_config
from phi3data.documents import make_batch
from phi3data.pipelines.base import merge_summaries
from phi3data.pipelines.recipe import RecipeError, load_recipe
from phi3data.pipelines.runner import run_pipeline
from phi3data.pipelines.stages.edu import EduScore, EduScoreParams, EduThreshold, EduThresholdParams

DCLM = SHARED / "quality" / "dclm_majority_labeled.jsonl"


@pytest.fixture(scope="module")
def dclm_model(tmp_path_factory) -> Path:
    config = TrainConfig(
        classifier=ClassifierSection(name="t", kind="fasttext", output="unused", test_fraction=0.3),
        source=[SourceConfig(path=str(require_shared(DCLM)), label_key="label")],
        fasttext={"epoch": 25, "lr": 0.3, "min_count": 1, "bucket": 50_000},
    )
    return train_from_config(config, output=tmp_path_factory.mktemp("dclm_fasttext")).output


@pytest.fixture(scope="module")
def scored(dclm_model) -> pa.Table:
    docs = [json.loads(line) for line in DCLM.read_text().splitlines()]
    batch = make_batch({"id": f"d{i}", "text": d["text"], "source": "dclm"} for i, d in enumerate(docs))
    return EduScore(EduScoreParams(model=str(dclm_model))).process(batch).batch


def threshold(**params) -> EduThreshold:
    return EduThreshold(EduThresholdParams(high=1.0, **params))


def decide_over(stage: EduThreshold, batches: list[pa.Table]) -> dict:
    summary: dict = {}
    for batch in batches:
        summary = merge_summaries(summary, stage.summarize(batch))
    return stage.decide(summary)


def split_batches(table: pa.Table, sizes: list[int]) -> list[pa.Table]:
    out, start = [], 0
    for size in sizes:
        out.append(table.slice(start, size))
        start += size
    out.append(table.slice(start))
    return out


def test_edu_score_column_matches_the_classifier(dclm_model, scored):
    classifier, manifest = load_classifier(dclm_model)
    scores = scored.column("edu_score")
    assert scores.type == pa.float32() and scored.num_rows == 499
    expected = classifier.predict(scored.column("text").to_pylist())
    assert np.array_equal(scores.to_numpy(), expected)
    assert 0.0 <= float(np.min(expected)) < float(np.max(expected)) <= 1.0
    assert set(manifest["files"]) == {"model.bin"} and len(manifest["data_hash"]) == 64
    assert manifest["metrics"]["test"]["roc_auc"] >= 0.75


def test_tampered_model_is_refused(dclm_model, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in dclm_model.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    with open(copy / "model.bin", "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="does not match its manifest"):
        load_classifier(copy)


@pytest.mark.parametrize("params", [{"mode": "percentile", "top_percent": 30.0},
                                    {"mode": "token_budget", "token_budget": 40_000},
                                    {"mode": "score", "min_score": 0.6}])
def test_decision_is_order_independent_and_apply_keeps_exactly_it(scored, params):
    stage = threshold(**params)
    batches = split_batches(scored, [100, 37, 200])
    decision = decide_over(stage, batches)
    assert decision == decide_over(stage, [scored]) == decide_over(stage, list(reversed(batches)))
    kept = pa.concat_tables([stage.apply(b, decision).batch for b in batches])
    dropped_counts = sum(stage.apply(b, decision).drops.get("edu_threshold:below_threshold", 0) for b in batches)
    assert kept.num_rows + dropped_counts == scored.num_rows
    kept_scores = kept.column("edu_score").to_numpy()
    kept_ids = set(kept.column("id").to_pylist())
    dropped = np.array([i not in kept_ids for i in scored.column("id").to_pylist()])
    dropped_scores = scored.column("edu_score").to_numpy()[dropped]  # by id: tied scores are not lost
    assert 0 < kept.num_rows < scored.num_rows and dropped.sum() == scored.num_rows - kept.num_rows
    assert kept_scores.min() >= dropped_scores.max(), "only the highest-scoring documents are kept"
    tokens = int(count_tokens(kept.column("text")).sum())
    if params["mode"] == "percentile":
        assert kept.num_rows == decision["kept_docs"]
        assert abs(kept.num_rows - 0.30 * scored.num_rows) <= 5, "the cut is the one nearest the target"
    elif params["mode"] == "token_budget":
        assert tokens == decision["kept_tokens"] <= 40_000
        bins = stage.score_bins(stage.scores(scored))
        next_bin = bins[bins < decision["threshold_bin"]].max()
        next_tokens = int(count_tokens(scored.column("text")).sum(where=bins == next_bin))
        assert tokens + next_tokens > 40_000, "the budget is filled: the next score bin would not fit"
    else:
        assert (kept_scores >= 0.6).all() and (dropped_scores < 0.6).all()


@pytest.mark.parametrize("params", [{"mode": "percentile", "top_percent": 50.0}, {"mode": "score", "min_score": 0.0}])
def test_missing_scores_are_counted_not_binned(params):
    """A null or NaN score is neither in the histogram (it used to land in bin 0) nor kept: it is dropped and
    counted as missing_score."""
    scores = pa.array([0.9, None, 0.2, float("nan"), 0.7, 0.4], pa.float32())
    batch = make_batch({"id": f"d{i}", "text": "one two three", "source": "t"} for i in range(6))
    batch = batch.append_column("edu_score", scores)
    stage = threshold(**params)
    summary = stage.summarize(batch)
    assert summary["missing_score"] == 2 and sum(summary["docs"]) == 4 and summary["docs"][0] == 0
    decision = stage.decide(summary)
    assert decision["missing_score"] == 2 and decision["total_docs"] == 4
    out = stage.apply(batch, decision)
    assert out.drops["edu_threshold:missing_score"] == 2
    assert not {"d1", "d3"} & set(out.batch.column("id").to_pylist())
    if params["mode"] == "percentile":
        assert out.batch.column("id").to_pylist() == ["d0", "d4"]
    else:
        assert out.batch.column("id").to_pylist() == ["d0", "d2", "d4", "d5"]


def test_recipe_hash_follows_the_classifier_it_loads(dclm_model, tmp_path):
    """Retraining a classifier in place changes the recipe hash, so a resumed run cannot mix old and new scores."""
    import shutil

    model = Path(shutil.copytree(dclm_model, tmp_path / "model"))
    recipe = {"pipeline": {"name": "edu"}, "stage": [{"type": "edu_score", "model": str(model)}]}
    before = load_recipe(recipe).config_hash()
    assert load_recipe(recipe).config_hash() == before
    config = TrainConfig(
        classifier=ClassifierSection(name="t", kind="fasttext", output="unused", test_fraction=0.3, seed=1),
        source=[SourceConfig(path=str(DCLM), label_key="label")],
        fasttext={"epoch": 5, "lr": 0.3, "min_count": 1, "bucket": 50_000},
    )
    train_from_config(config, output=model)  # retrained in the same directory
    assert load_recipe(recipe).config_hash() != before


def test_threshold_params_are_checked():
    base = {"pipeline": {"name": "x"}, "stage": [{"type": "edu_threshold", "mode": "percentile"}]}
    with pytest.raises(RecipeError, match="needs top_percent"):
        load_recipe(base)
    base["stage"][0].update(top_percent=150)
    with pytest.raises(RecipeError, match="top_percent"):
        load_recipe(base)


@pytest.mark.cluster
def test_same_kept_documents_on_local_ray_and_spark(dclm_model, ray_cluster, spark_local, tmp_path):
    shards = tmp_path / "in"
    shards.mkdir()
    lines = DCLM.read_text().splitlines()
    for k in range(4):
        rows = [dict(json.loads(line), id=f"d{i}") for i, line in enumerate(lines) if i % 4 == k]
        (shards / f"part-{k}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = load_recipe({
        "pipeline": {"name": "edu_test"},
        "output": {"batch_size": 64},
        "stage": [{"type": "edu_score", "model": str(dclm_model)},
                  {"type": "edu_threshold", "mode": "percentile", "top_percent": 25.0, "high": 1.0}],
    })
    outputs, decisions = {}, {}
    for engine in ("local", "spark", "ray"):
        out = tmp_path / engine
        summary = run_pipeline(recipe, shards, out, engine=engine, workers=2, progress=False)
        outputs[engine] = read_output(out)
        decisions[engine] = summary.stats["decisions"]
    assert outputs["local"] == outputs["spark"] == outputs["ray"]
    assert decisions["local"] == decisions["spark"] == decisions["ray"]
    decision = decisions["local"]["edu_threshold"]
    assert len(outputs["local"]) == decision["kept_docs"] and abs(decision["kept_docs"] - 0.25 * 499) <= 10
    assert len(outputs["local"]) > 0.2 * 499
