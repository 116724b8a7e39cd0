"""Global thresholds on a numeric column: an absolute value, the top fraction of documents, or a token budget.

A global stage (see ``GlobalStage``): every worker histograms the column (and the tokens each bin holds) into
fixed bins, the driver sums the integer histograms and picks the cut, and a second pass keeps the documents at
or above it. Integer histograms add up the same in any order, so the cut is identical on every engine.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import model_validator

from phi3data.pipelines.base import GlobalStage, StageOutput, StageParams, register

CHARS_PER_TOKEN = 4.0
"""Token counts for budgets are estimated from characters (about 4 per token for English BPE vocabularies)."""


class ScoreThresholdParams(StageParams):
    column: str
    """The numeric column to threshold, e.g. "edu_score" or "language_score"."""
    mode: Literal["absolute", "top_fraction", "token_budget"] = "absolute"
    value: float
    """absolute: the minimum score; top_fraction: the fraction of documents to keep (0-1];
    token_budget: how many tokens to keep, highest scores first."""
    low: float = 0.0
    high: float = 5.0
    bins: int = 1000
    """Scores are histogrammed into ``bins`` equal bins over [low, high]; the cut falls on a bin edge."""

    @model_validator(mode="after")
    def _check(self):
        if self.high <= self.low:
            raise ValueError("high must be greater than low")
        if self.mode == "top_fraction" and not 0 < self.value <= 1:
            raise ValueError("top_fraction value must be in (0, 1]")
        if self.mode == "token_budget" and self.value <= 0:
            raise ValueError("token_budget value must be positive")
        return self


@register
class ScoreThreshold(GlobalStage):
    """Keep documents whose ``column`` is at or above a cut chosen over the whole dataset."""

    type_name = "score_threshold"
    Params = ScoreThresholdParams
    params: ScoreThresholdParams

    def _bin_index(self, scores: np.ndarray) -> np.ndarray:
        p = self.params
        idx = np.floor((scores - p.low) / (p.high - p.low) * p.bins).astype(np.int64)
        return np.clip(idx, 0, p.bins - 1)

    def _scores(self, batch: pa.Table) -> np.ndarray:
        if self.params.column not in batch.schema.names:
            raise ValueError(f"{self.name}: column {self.params.column!r} is not in the batch; "
                             f"a stage before it must add it (columns: {', '.join(batch.schema.names)})")
        # a missing score sorts below every real one
        return pc.fill_null(batch.column(self.params.column), self.params.low - 1.0).to_numpy().astype(np.float64)

    def summarize(self, batch: pa.Table) -> dict:
        idx = self._bin_index(self._scores(batch))
        tokens = np.ceil(pc.utf8_length(batch.column("text")).to_numpy() / CHARS_PER_TOKEN).astype(np.int64)
        docs = np.bincount(idx, minlength=self.params.bins)
        toks = np.bincount(idx, weights=tokens, minlength=self.params.bins).astype(np.int64)
        return {"documents": docs.tolist(), "tokens": toks.tolist()}

    def decide(self, summary: dict) -> dict:
        p = self.params
        edges = np.linspace(p.low, p.high, p.bins + 1)
        docs = np.array(summary.get("documents", [0] * p.bins), dtype=np.int64)
        toks = np.array(summary.get("tokens", [0] * p.bins), dtype=np.int64)
        if p.mode == "absolute":
            cut_bin = int(self._bin_index(np.array([p.value]))[0])
            threshold = p.value
        else:
            # walk down from the highest bin until the target is reached
            kept_docs = np.cumsum(docs[::-1])[::-1]
            kept_toks = np.cumsum(toks[::-1])[::-1]
            if p.mode == "top_fraction":
                target, kept = p.value * docs.sum(), kept_docs
            else:
                target, kept = p.value, kept_toks
            reaching = np.nonzero(kept >= target)[0]
            cut_bin = int(reaching[-1]) if len(reaching) else 0
            threshold = float(edges[cut_bin])
        return {"threshold": threshold, "cut_bin": cut_bin, "mode": p.mode,
                "documents_kept": int(docs[cut_bin:].sum()), "documents_total": int(docs.sum()),
                "tokens_kept": int(toks[cut_bin:].sum()), "tokens_total": int(toks.sum())}

    def apply(self, batch: pa.Table, decision: dict) -> StageOutput:
        if batch.num_rows == 0:
            return StageOutput(batch)
        scores = self._scores(batch)
        if self.params.mode == "absolute":
            keep = scores >= decision["threshold"]
        else:
            keep = self._bin_index(scores) >= decision["cut_bin"]
        dropped = int((~keep).sum())
        drops = {f"{self.name}:below_threshold": dropped} if dropped else {}
        return StageOutput(batch.filter(pa.array(keep, pa.bool_())), Counter(drops))
