"""Train a classifier from a TOML recipe (``classifiers/*.toml``): load labelled sources, split, train,
evaluate on the held-out split and any extra eval sets, choose the threshold, save with a manifest."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from phi3data.classifiers.data import Example, SourceConfig, data_hash, dedupe, load_source, split
from phi3data.classifiers.embedding_classifier import EmbeddingClassifier, EmbeddingParams
from phi3data.classifiers.evaluate import best_f1_threshold, evaluate_scores, plot_sweep, sweep_markdown
from phi3data.classifiers.fasttext_classifier import FastTextClassifier, FastTextParams
from phi3data.classifiers.saved import Classifier, save_classifier
from phi3data.config import StrictModel, load_toml
from phi3data.io.writers import write_json_atomic


class ClassifierSection(StrictModel):
    name: str
    kind: Literal["fasttext", "embedding"]
    task: Literal["binary", "ordinal"] = "binary"
    """binary: labels 0/1, score = P(1). ordinal: labels 0-5 (annotator grades), score = predicted grade."""
    output: str
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    threshold: float | Literal["best_f1"] = "best_f1"
    """The keep threshold written to the manifest: a number, or the best-F1 threshold on the held-out split."""
    positive_from: float = 3.0
    """ordinal only: grades >= this count as positive for precision/recall/ROC-AUC."""


class EvalSet(StrictModel):
    """An extra labelled set to measure on (never trained on), e.g. the DCLM human labels."""

    name: str
    source: SourceConfig
    task: Literal["binary", "ordinal"] = "binary"


class TrainConfig(StrictModel):
    classifier: ClassifierSection
    source: list[SourceConfig]
    eval: list[EvalSet] = []
    fasttext: FastTextParams = FastTextParams()
    embedding: EmbeddingParams = EmbeddingParams()


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a classifier recipe; errors name the file and field."""
    return load_toml(path, TrainConfig, "classifier recipe")


@dataclass
class TrainResult:
    output: Path
    manifest: dict
    seconds: float
    skipped: dict[str, dict[str, int]]
    """Per source, documents left out by reason (reader rejects, missing labels, too short)."""


def train_classifier(kind: str, task: str, train: list[Example], config: TrainConfig) -> Classifier:
    texts = [e.text for e in train]
    labels = [float(e.label) for e in train]
    if kind == "fasttext":
        return FastTextClassifier.train(texts, labels, task, config.fasttext)
    return EmbeddingClassifier.train(texts, labels, task, config.embedding)


def write_report(out: Path, name: str, report: dict) -> None:
    """The sweep of one evaluation as Markdown and PNG beside the model."""
    (out / f"sweep_{name}.md").write_text(sweep_markdown(report["sweep"]), encoding="utf-8")
    plot_sweep(report["sweep"], out / f"sweep_{name}.png", title=f"{out.name}: {name}")


def train_from_config(config: TrainConfig, base: Path | None = None, output: Path | None = None) -> TrainResult:
    """Train, evaluate and save the classifier a recipe describes. Relative paths resolve against ``base``."""
    started = time.perf_counter()
    section = config.classifier
    skipped: dict[str, dict[str, int]] = {}
    loaded = []
    reported: dict[str, set[Example]] = {}
    for loaded_sources, source in enumerate(config.source, start=1):
        counts: Counter = Counter()
        examples = load_source(source, base, counts)
        loaded += examples
        if source.report is not None:
            reported.setdefault(source.report, set()).update(examples)
        if counts:
            key = source.path if source.path not in skipped else f"{source.path} (source #{len(loaded_sources)})"
            skipped[key] = dict(sorted(counts.items()))
    clashes = set(reported) & ({"test"} | {e.name for e in config.eval})
    if clashes:
        raise ValueError(f"{section.name}: a source's report name is already an evaluation's: {sorted(clashes)}")
    examples = dedupe(loaded)
    if not examples:
        raise ValueError(f"{section.name}: the sources gave no labelled documents")
    train, test = split(examples, section.test_fraction, section.seed)
    if len({e.label for e in train}) < 2:
        raise ValueError(f"{section.name}: the training split has only one label; check the sources' labels")
    classifier = train_classifier(section.kind, section.task, train, config)

    test_scores = classifier.predict([e.text for e in test])
    test_labels = np.array([e.label for e in test])
    binary = test_labels >= (section.positive_from if section.task == "ordinal" else 0.5)
    threshold = best_f1_threshold(binary, test_scores) if section.threshold == "best_f1" else section.threshold
    reports = {"test": evaluate_scores(test_scores, test_labels, [e.text for e in test], task=section.task,
                                       threshold=threshold, positive_from=section.positive_from)}
    for name, members in reported.items():
        held = [e for e in test if e in members]
        if not held:
            raise ValueError(f"{section.name}: no document of the source reported as {name!r} is in the held-out split")
        reports[name] = evaluate_scores(classifier.predict([e.text for e in held]), np.array([e.label for e in held]),
                                        [e.text for e in held], task=section.task, threshold=threshold,
                                        positive_from=section.positive_from)
    for eval_set in config.eval:
        counts = Counter()
        held = load_source(eval_set.source, base, counts)
        if counts:
            skipped[f"eval:{eval_set.name}"] = dict(sorted(counts.items()))
        scores = classifier.predict([e.text for e in held])
        reports[eval_set.name] = evaluate_scores(scores, np.array([e.label for e in held]), [e.text for e in held],
                                                 task=eval_set.task, threshold=threshold,
                                                 positive_from=section.positive_from)

    out = output or Path(section.output)
    if base is not None and not out.is_absolute() and output is None:
        out = base / out
    metrics = {name: {k: v for k, v in r.items() if k != "sweep"} for name, r in reports.items()}
    manifest = save_classifier(classifier, out, name=section.name, threshold=threshold, data_hash=data_hash(train),
                               metrics=metrics, extra={"train_examples": len(train), "test_examples": len(test),
                                                       "labels": sorted({e.label for e in train}),
                                                       "skipped": skipped})
    for name, report in reports.items():
        write_report(out, name, report)
    write_json_atomic(out / "metrics.json", reports, default=float)
    return TrainResult(out, manifest, time.perf_counter() - started, skipped)
