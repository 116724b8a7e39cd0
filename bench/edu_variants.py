"""Educational-value classifier variants, each measured on DCLM human labels held out from its training.

Label sources: OpenStax textbook sections (1) vs the English pages of the shared WARC sample (0); the 499 DCLM
human majority labels; optionally SmolLM2-135M grades from `phi3data classify annotate --json-mode` (``--llm``).
Models: fastText (word bigrams) and all-MiniLM-L6-v2 int8 embeddings with a logistic or ridge (regression) head.

Held-out protocol, the same for every variant:
- DCLM is cut into 5 folds by hashed id (``sample_key(id, 1) % 5``). A variant that trains on DCLM labels is
  trained 5 times, each time without one fold, and scores that fold: every document is scored by a model that
  never saw its label ("5-fold" column, ROC-AUC over all 499 out-of-fold scores; "folds" is mean ± sd per fold).
- "30% split": the recipes' own split (``split(examples, 0.3, seed=0)``): trained on the other 70%.
- Variants that use no DCLM label score all 499 documents in both columns with one model.
- "books vs web": ROC-AUC on the 20% of textbook sections and web pages held out by hashed id (never trained on).

Run:  python -m bench.edu_variants [--llm out/annotations_dclm.jsonl] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DCLM = SHARED / "quality" / "dclm_majority_labeled.jsonl"
OPENSTAX = SHARED / "textbooks" / "openstax.jsonl.gz"
WARC = SHARED / "web" / "warc"
FOLDS = 5


@dataclass
class Variant:
    name: str
    kind: str  # fasttext | embedding
    head: str = "logistic"  # embedding only: logistic | ridge
    dclm: bool = True
    books: float = 0.0  # weight of textbook sections as positives (0: not used)
    web: float = 0.0  # weight of web pages as negatives (0: not used)
    params: dict | None = None


VARIANTS = [
    Variant("fastText, books vs web (the old default)", "fasttext", dclm=False, books=1, web=1,
            params={"epoch": 20, "lr": 0.2}),
    Variant("embedding + logistic, books vs web", "embedding", dclm=False, books=1, web=1),
    Variant("embedding + ridge, books vs web", "embedding", "ridge", dclm=False, books=1, web=1),
    Variant("fastText, DCLM", "fasttext", params={"epoch": 25, "lr": 0.3, "min_count": 1}),
    Variant("embedding + logistic, DCLM", "embedding"),
    Variant("embedding + ridge, DCLM", "embedding", "ridge", params={"alpha": 3.0}),
    Variant("fastText, DCLM + books", "fasttext", books=1, params={"epoch": 25, "lr": 0.3, "min_count": 1}),
    Variant("fastText, DCLM + books + web", "fasttext", books=1, web=1,
            params={"epoch": 25, "lr": 0.3, "min_count": 1}),
    Variant("embedding + ridge, DCLM + books (w 0.05)", "embedding", "ridge", books=0.05, params={"alpha": 3.0}),
    Variant("embedding + logistic, DCLM + books + web (w 0.1)", "embedding", books=0.1, web=0.1),
    Variant("embedding + logistic, DCLM + books + web (w 1)", "embedding", books=1, web=1),
]


def load(quick: bool) -> dict[str, list]:
    from phi3data.classifiers.data import SourceConfig, dedupe, load_source

    books = load_source(SourceConfig(path=str(OPENSTAX), label=1))
    web = load_source(SourceConfig(path=str(WARC), label=0, languages=["en"], min_chars=200))
    if quick:
        books, web = books[:200], web[:200]
    return {"dclm": load_source(SourceConfig(path=str(DCLM), label_key="label")),
            "books": dedupe(books), "web": dedupe(web)}


def fit_fasttext(texts: list[str], labels: np.ndarray, weights: np.ndarray, params: dict) -> Callable:
    from phi3data.classifiers.fasttext_classifier import FastTextClassifier, FastTextParams

    # fastText has no sample weights: a document of weight w is written round(w) times (at least once)
    repeat = np.maximum(np.rint(weights), 1).astype(int)
    texts = [t for t, r in zip(texts, repeat, strict=True) for _ in range(r)]
    labels = np.repeat(labels, repeat)
    model = FastTextClassifier.train(texts, labels.tolist(), "binary", FastTextParams(**params))
    return lambda examples: model.predict([e.text for e in examples])


def fit_head(features: np.ndarray, labels: np.ndarray, weights: np.ndarray, head: str, params: dict) -> Callable:
    """The same heads as ``EmbeddingClassifier.train`` (logistic: C; ridge: alpha), with sample weights."""
    from sklearn.linear_model import LogisticRegression, Ridge

    if head == "logistic":
        model = LogisticRegression(C=params.get("c", 1.0), max_iter=2000)
        model.fit(features, (labels >= 0.5).astype(int), sample_weight=weights)
        return model.decision_function
    model = Ridge(alpha=params.get("alpha", 1.0)).fit(features, labels, sample_weight=weights)
    return model.predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", type=Path, help="annotations JSONL of DCLM documents (classify annotate output)")
    parser.add_argument("--quick", action="store_true", help="200 textbook sections and web pages only")
    parser.add_argument("--only", help="run only the variants whose name contains this")
    args = parser.parse_args()

    from phi3data.classifiers.data import sample_key, split
    from phi3data.classifiers.embedding_classifier import MiniLMEncoder
    from phi3data.classifiers.evaluate import roc_auc

    started = time.perf_counter()
    data = load(args.quick)
    dclm = data["dclm"]
    y_dclm = np.array([e.label for e in dclm])
    fold = np.array([sample_key(e.id, 1) % FOLDS for e in dclm])
    _, dclm_test = split(dclm, 0.3, seed=0)
    test30 = np.isin([e.id for e in dclm], [e.id for e in dclm_test])
    tb_train, tb_test = split(data["books"] + data["web"], 0.2, seed=0)
    print(f"DCLM {len(dclm)} ({int(y_dclm.sum())} positive), folds {np.bincount(fold).tolist()}, 30% split "
          f"{int(test30.sum())}; books {len(data['books'])}, web {len(data['web'])}, books/web held out "
          f"{len(tb_test)}", flush=True)

    encoder = MiniLMEncoder("onnx-int8", 256)
    texts = {id(e): e.text for e in dclm + tb_train + tb_test}
    embedded: dict[int, np.ndarray] = {}

    def features(examples: list) -> np.ndarray:
        missing = [e for e in examples if id(e) not in embedded]
        if missing:
            embedded.update(zip(map(id, missing), encoder.encode([texts[id(e)] for e in missing]), strict=True))
        return np.stack([embedded[id(e)] for e in examples])

    def train(variant: Variant, dclm_rows: np.ndarray) -> Callable:
        rows = [dclm[i] for i in np.flatnonzero(dclm_rows)] if variant.dclm else []
        weights = [1.0] * len(rows)
        for e in tb_train:
            w = variant.books if e.label == 1 else variant.web
            if w > 0:
                rows.append(e)
                weights.append(w)
        labels, weights = np.array([e.label for e in rows]), np.array(weights)
        params = variant.params or {}
        if variant.kind == "fasttext":
            return fit_fasttext([e.text for e in rows], labels, weights, params)
        predict = fit_head(features(rows), labels, weights, variant.head, params)
        return lambda examples: predict(features(examples))

    results = []
    for variant in VARIANTS:
        if args.only and args.only not in variant.name:
            continue
        t0 = time.perf_counter()
        oof = np.zeros(len(dclm))
        if variant.dclm:
            for k in range(FOLDS):
                held = fold == k
                oof[held] = train(variant, ~held)([dclm[i] for i in np.flatnonzero(held)])
        model = train(variant, ~test30)
        s30 = model([dclm[i] for i in np.flatnonzero(test30)])
        if not variant.dclm:
            oof = model(dclm)
        per_fold = [roc_auc(y_dclm[fold == k], oof[fold == k]) for k in range(FOLDS)]
        tb_auc = roc_auc(np.array([e.label for e in tb_test]), model(tb_test))
        row = {"variant": variant.name, "dclm_5fold": roc_auc(y_dclm, oof), "fold_mean": float(np.mean(per_fold)),
               "fold_sd": float(np.std(per_fold)), "dclm_30": roc_auc(y_dclm[test30], s30), "books_vs_web": tb_auc}
        results.append(row)
        print(f"{variant.name:50s} 5-fold {row['dclm_5fold']:.3f} ({row['fold_mean']:.3f} ± {row['fold_sd']:.3f})"
              f"  30% split {row['dclm_30']:.3f}  books vs web {tb_auc:.3f}  [{time.perf_counter() - t0:.0f}s]",
              flush=True)

    if args.llm:
        graded = {}
        for line in args.llm.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("score") is not None:
                graded[record["id"]] = record["score"]
        rows = [i for i, e in enumerate(dclm) if e.id in graded]
        scores = np.array([graded[dclm[i].id] for i in rows], dtype=float)
        counts = {int(s): int((scores == s).sum()) for s in np.unique(scores)}
        print(f"SmolLM2 grades as scores (zero-shot, nothing trained): ROC-AUC "
              f"{roc_auc(y_dclm[rows], scores):.3f} on {len(rows)} DCLM documents; grades {counts}")
    print(f"done in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
