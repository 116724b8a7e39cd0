"""Training and measuring classifiers on the real DCLM human labels: fastText and MiniLM embeddings + head,
through the `phi3data classify train/evaluate` commands; metric functions checked against scikit-learn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED, require_shared
from typer.testing import CliRunner

from phi3data.classifiers.embedding_classifier import MiniLMEncoder
from phi3data.classifiers.evaluate import agreement, binary_metrics, quadratic_kappa, roc_auc, threshold_sweep
from phi3data.classifiers.saved import load_classifier
from phi3data.cli import classify_app
from phi3data.documents import make_batch
from phi3data.pipelines.stages.edu import EduScore, EduScoreParams

DCLM = SHARED / "quality" / "dclm_majority_labeled.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_recipe(path: Path, kind: str, out: Path, extra: str = "", task: str = "binary", label_key: str = "label",
                 source_path: Path = DCLM) -> Path:
    path.write_text(f"""
[classifier]
name = "test_{kind}"
kind = "{kind}"
task = "{task}"
output = "{out}"
test_fraction = 0.3

[[source]]
path = "{require_shared(source_path)}"
label_key = "{label_key}"
{extra}
""")
    return path


def train_cli(recipe: Path, out: Path, min_auc: float | None = None) -> dict:
    """Train through the CLI; returns the manifest (and checks the held-out ROC-AUC when ``min_auc`` is given)."""
    result = CliRunner().invoke(classify_app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "ROC-AUC" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    if min_auc is not None:
        assert manifest["metrics"]["test"]["roc_auc"] >= min_auc, manifest["metrics"]["test"]
    return manifest


def test_roc_auc_and_confusion_match_sklearn():
    from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(labels * 0.3 + rng.random(300), 1)  # rounded: many ties
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    m = binary_metrics(labels, scores, 0.7)
    assert m["confusion_matrix"] == confusion_matrix(labels, scores >= 0.7).tolist()
    assert m["f1"] == pytest.approx(f1_score(labels, scores >= 0.7))
    assert np.isnan(roc_auc(np.ones(5), np.arange(5)))


def test_best_f1_threshold_is_the_smallest_threshold_with_the_best_f1():
    from phi3data.classifiers.evaluate import best_f1_threshold

    rng = np.random.default_rng(1)
    for _ in range(100):
        labels = rng.integers(0, 2, int(rng.integers(3, 80)))
        scores = np.round(rng.random(len(labels)) * 3 + labels * rng.random(), 1)
        candidates = np.unique(scores)
        f1s = np.array([binary_metrics(labels, scores, t)["f1"] for t in candidates])  # brute force
        best = best_f1_threshold(labels, scores)
        assert best == candidates[np.flatnonzero(f1s > f1s.max() - 1e-12)[0]]


def test_agreement_and_sweep():
    grades = np.array([0, 1, 2, 3, 4, 5, 5, 2])
    assert quadratic_kappa(grades, grades) == pytest.approx(1.0)
    assert quadratic_kappa(grades, 5 - grades) < 0
    a = agreement(grades, grades + 0.4)
    assert a["exact"] == 1.0 and a["within_1"] == 1.0
    rows = threshold_sweep(np.array([0.1, 0.5, 0.9]), np.array([10, 20, 30]), np.array([0.0, 0.5, 1.0]),
                           np.array([0, 1, 1]))
    assert [r["kept_tokens"] for r in rows] == [60, 50, 0] and rows[1]["precision"] == 1.0
    assert np.isnan(rows[2]["precision"]) and rows[2]["recall"] == 0.0


def test_fasttext_on_dclm_labels(tmp_path):
    out = tmp_path / "ft"
    recipe = write_recipe(tmp_path / "ft.toml", "fasttext", out,
                          "[fasttext]\nepoch = 25\nlr = 0.3\nmin_count = 1\nbucket = 100000\n")
    manifest = train_cli(recipe, out, min_auc=0.80)
    test = manifest["metrics"]["test"]
    assert sum(map(sum, test["confusion_matrix"])) == manifest["test_examples"] == test["n"]
    assert manifest["train_examples"] + manifest["test_examples"] == 499
    assert (out / "sweep_test.png").read_bytes()[:8] == PNG_MAGIC
    assert "kept_tokens_frac" in (out / "sweep_test.md").read_text()

    evaluated = tmp_path / "eval"
    result = CliRunner().invoke(classify_app, ["evaluate", str(out), str(DCLM), "-o", str(evaluated)])
    assert result.exit_code == 0, result.output
    assert (evaluated / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    report = json.loads((evaluated / "metrics.json").read_text())
    assert report["n"] == 499 and report["roc_auc"] > test["roc_auc"] - 0.05  # includes its training data


def test_fasttext_ordinal_grades(tmp_path):
    """0-5 grades: fastText multi-class, score = expected grade; agreement is reported."""
    graded = tmp_path / "graded.jsonl"
    rows = [json.loads(line) for line in require_shared(DCLM).read_text().splitlines()]
    graded.write_text("\n".join(json.dumps({"id": f"g{i}", "text": r["text"], "grade": 4 if r["label"] else 1})
                                for i, r in enumerate(rows)))
    out = tmp_path / "ord"
    recipe = write_recipe(tmp_path / "ord.toml", "fasttext", out, "[fasttext]\nepoch = 25\nlr = 0.3\nmin_count = 1\n"
                          "bucket = 100000\n", task="ordinal", label_key="grade", source_path=graded)
    manifest = train_cli(recipe, out)
    test = manifest["metrics"]["test"]
    assert manifest["labels"] == [1.0, 4.0] and 0 <= manifest["threshold"] <= 5
    assert test["roc_auc"] >= 0.75 and "quadratic_kappa" in test["agreement"]
    classifier, _ = load_classifier(out)
    scores = classifier.predict([rows[0]["text"], rows[1]["text"]])
    assert ((scores >= 1.0) & (scores <= 4.0)).all()


def test_onnx_embeddings_match_torch():
    texts = ["The mitochondria is the powerhouse of the cell.", "Buy cheap shoes now!!! Free shipping", "x"]
    onnx = MiniLMEncoder("onnx").encode(texts)
    torch = MiniLMEncoder("torch").encode(texts)
    assert onnx.shape == torch.shape == (3, 384)
    assert np.allclose(np.linalg.norm(onnx, axis=1), 1.0, atol=1e-5)
    cosines = (onnx * torch).sum(1)
    assert (cosines > 0.95).all(), cosines


def test_int8_build_is_cached_close_to_float_and_per_document(tmp_path, monkeypatch):
    from phi3data.classifiers.embedding_classifier import onnx_model_path
    from phi3data.classifiers.minilm_int8 import int8_model_path

    monkeypatch.setenv("PHI3DATA_CACHE", str(tmp_path))
    built = int8_model_path(onnx_model_path())
    assert built.parent.parent == tmp_path and built.stat().st_size > 1_000_000
    stamp = built.stat().st_mtime_ns
    assert int8_model_path(onnx_model_path()) == built and built.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not [p for p in built.parent.iterdir() if p != built]  # no build leftovers

    texts = [json.loads(line)["text"] for line in DCLM.read_text().splitlines()[:24]]
    int8 = MiniLMEncoder("onnx-int8").encode(texts)
    float32 = MiniLMEncoder("onnx").encode(texts)
    cosines = (int8 * float32).sum(1)
    assert cosines.mean() > 0.99 and cosines.min() > 0.97, cosines
    # a document's embedding does not depend on the documents encoded with it
    alone = MiniLMEncoder("onnx-int8").encode(texts[5:6])
    assert np.array_equal(alone[0], int8[5])


def test_embedding_on_dclm_labels(tmp_path):
    out = tmp_path / "emb"
    recipe = write_recipe(tmp_path / "emb.toml", "embedding", out,
                          "[embedding]\nmax_tokens = 256\nc = 1.0\n")
    manifest = train_cli(recipe, out, min_auc=0.80)
    assert set(manifest["files"]) == {"head.safetensors"} and manifest["params"]["backend"] == "onnx-int8"
    classifier, _ = load_classifier(out)
    texts = [json.loads(line)["text"] for line in DCLM.read_text().splitlines()[:4]]
    scores = classifier.predict(texts)
    assert ((scores > 0) & (scores < 1)).all()
    batch = make_batch({"id": str(i), "text": t} for i, t in enumerate(texts))
    staged = EduScore(EduScoreParams(model=str(out))).process(batch).batch.column("edu_score").to_numpy()
    assert np.allclose(staged, scores, atol=1e-6)


def test_unusable_training_records_are_counted_not_dropped_silently(tmp_path):
    """Malformed lines, records without text and documents without a label are left out of training, and the
    manifest says how many of each, per source."""
    rows = [json.loads(line) for line in require_shared(DCLM).read_text().splitlines()[:120]]
    lines = [json.dumps(r) for r in rows[:100]]
    lines += ['{"text": "cut short by a crash', json.dumps({"label": 1})]  # malformed JSON, no text
    lines += [json.dumps({"text": r["text"]}) for r in rows[100:110]]  # no label
    lines += [json.dumps({"text": r["text"], "label": None}) for r in rows[110:113]]  # null label
    data = tmp_path / "labelled.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "model"
    recipe = write_recipe(tmp_path / "r.toml", "fasttext", out, source_path=data,
                          extra="[fasttext]\nepoch = 5\nmin_count = 1\nbucket = 20000\n")
    manifest = train_cli(recipe, out)
    assert manifest["skipped"] == {str(data): {"missing_label": 13, "rejected:malformed_json": 1,
                                               "rejected:missing_text": 1}}
    assert manifest["train_examples"] + manifest["test_examples"] == len({r["text"] for r in rows[:100]})
