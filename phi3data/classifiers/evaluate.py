"""Measure a classifier: precision, recall, F1, ROC-AUC, confusion matrix, agreement with the annotator, and a
threshold sweep of kept documents and kept tokens (a table and a PNG plot)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from phi3data.classifiers.tokens import count_tokens


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half); NaN with one class only."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    # average ranks over tied groups: a group of c equal scores after k smaller ones has rank k + (c + 1) / 2
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - counts + (counts + 1) / 2)[group]
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Precision, recall, F1, accuracy and the confusion matrix [[tn, fp], [fn, tp]] at ``score >= threshold``."""
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(scores) >= threshold
    tp = int((predicted & labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    tn = int((~predicted & ~labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "f1": f1,
            "accuracy": (tp + tn) / max(len(labels), 1), "confusion_matrix": [[tn, fp], [fn, tp]],
            "roc_auc": roc_auc(labels, scores), "n": int(len(labels)), "positives": int(labels.sum())}


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold with the highest F1 (the smallest such, over the observed scores)."""
    labels = np.asarray(labels).astype(bool)
    candidates, group = np.unique(np.asarray(scores), return_inverse=True)
    # predicted positive at threshold t = every score >= t: cumulative counts from the top score down
    kept = np.cumsum(np.bincount(group, minlength=len(candidates))[::-1])[::-1]
    tp = np.cumsum(np.bincount(group, weights=labels, minlength=len(candidates))[::-1])[::-1]
    f1 = np.divide(2 * tp, kept + labels.sum(), out=np.zeros(len(candidates)), where=tp > 0)
    return float(candidates[int(np.argmax(f1))])


def quadratic_kappa(a: np.ndarray, b: np.ndarray, classes: int = 6) -> float:
    """Cohen's kappa with quadratic weights between two integer gradings 0..classes-1."""
    a = np.clip(np.asarray(a, dtype=int), 0, classes - 1)
    b = np.clip(np.asarray(b, dtype=int), 0, classes - 1)
    observed = np.zeros((classes, classes))
    np.add.at(observed, (a, b), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / max(observed.sum(), 1)
    idx = np.arange(classes)
    weights = (idx[:, None] - idx[None, :]) ** 2 / (classes - 1) ** 2
    denominator = (weights * expected).sum()
    return float(1 - (weights * observed).sum() / denominator) if denominator else float("nan")


def agreement(annotator: np.ndarray, predicted: np.ndarray) -> dict:
    """How well 0-5 predictions agree with the annotator's grades."""
    annotator = np.asarray(annotator, dtype=np.float64)
    rounded = np.clip(np.rint(np.asarray(predicted, dtype=np.float64)), 0, 5)
    pearson = float(np.corrcoef(annotator, predicted)[0, 1]) if len(annotator) > 1 and annotator.std() > 0 \
        and np.std(predicted) > 0 else float("nan")
    return {"exact": float((rounded == annotator).mean()), "within_1": float((np.abs(rounded - annotator) <= 1).mean()),
            "quadratic_kappa": quadratic_kappa(annotator, rounded), "pearson": pearson}


def threshold_sweep(scores: np.ndarray, tokens: np.ndarray, thresholds: np.ndarray,
                    labels: np.ndarray | None = None) -> list[dict]:
    """For each threshold: documents and tokens kept (``score >= t``), and precision/recall when labels are known."""
    scores = np.asarray(scores, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.int64)
    total_docs, total_tokens = len(scores), int(tokens.sum())
    rows = []
    for t in thresholds:
        kept = scores >= t
        row = {"threshold": float(t), "kept_docs": int(kept.sum()),
               "kept_docs_frac": float(kept.sum() / max(total_docs, 1)), "kept_tokens": int(tokens[kept].sum()),
               "kept_tokens_frac": float(tokens[kept].sum() / max(total_tokens, 1))}
        if labels is not None:
            metrics = binary_metrics(labels, scores, t)
            precision = metrics["precision"] if kept.any() else float("nan")  # undefined when nothing is kept
            row.update(precision=precision, recall=metrics["recall"], f1=metrics["f1"])
        rows.append(row)
    return rows


def sweep_markdown(rows: list[dict]) -> str:
    """The sweep as a Markdown table."""
    columns = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict], path: Path, title: str = "threshold sweep") -> Path:
    """Kept documents, kept tokens (and precision/recall) against the threshold, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thresholds = [r["threshold"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(thresholds, [r["kept_docs_frac"] for r in rows], label="kept documents")
    ax.plot(thresholds, [r["kept_tokens_frac"] for r in rows], label="kept tokens")
    if rows and "precision" in rows[0]:
        ax.plot(thresholds, [r["precision"] for r in rows], "--", label="precision")
        ax.plot(thresholds, [r["recall"] for r in rows], "--", label="recall")
    ax.set_xlabel("score threshold (keep score >= threshold)")
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate_scores(scores: np.ndarray, labels: np.ndarray, texts: list[str], *, task: str, threshold: float,
                    positive_from: float = 3.0, sweep_points: int = 21) -> dict:
    """A full report for scores against labels.

    ``task`` "binary": labels are 0/1. ``task`` "ordinal": labels are 0-5 grades; P/R/F1/AUC use
    ``label >= positive_from`` as the positive class, and agreement compares grades.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    binary = labels >= positive_from if task == "ordinal" else labels >= 0.5
    report = {"task": task, **binary_metrics(binary, scores, threshold)}
    if task == "ordinal":
        report["agreement"] = agreement(labels, scores)
    low, high = (0.0, 5.0) if task == "ordinal" else (0.0, 1.0)
    thresholds = np.linspace(low, high, sweep_points)
    report["sweep"] = threshold_sweep(scores, count_tokens(texts), thresholds, binary)
    return report
