"""Knowledge level: lasting knowledge against ephemeral, time-bound facts.

``knowledge_signals`` counts simple text signals per 100 words (dates, weekdays, "today", clock times, "said",
prices and deals, match results against explanations, definitions, how-to and reasoning words) and derives a weak
label (1 lasting, 0 time-bound, null when unclear) to train the knowledge-level classifier from.

``knowledge_threshold`` is ``edu_threshold`` over a second score column (by default ``knowledge_score``, from an
``edu_score`` stage with ``column = "knowledge_score"``) that also records what it removes.

Phi-3's phase 2 keeps web pages with the right level of knowledge: a page with one day's match result may be
educational enough, but it spends a small model's capacity on facts that do not last. Put this stage after the
educational cut (``edu_threshold``) and every document it drops is one the edu filter keeps: each drop is a
finding (kind ``knowledge_drop``) with the page's id, URL, title, both scores and a short excerpt, and the
stage's report (``reports/<stage>.json`` and ``stats["reports"]``) counts them and lists examples: the most
time-bound, and those the edu score liked most. The keep decision is ``edu_threshold``'s (score, percentile or
token budget, decided over the whole run from integer histograms), so it is the same on every engine.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from phi3data.pipelines.base import Stage, StageOutput, StageParams, register, set_column
from phi3data.pipelines.stages.edu import EduThreshold, EduThresholdParams

KIND = "knowledge_drop"
_MONTHS = "january|february|march|april|may|june|july|august|september|october|november|december"
TIMEBOUND_PATTERNS = (
    r"\b(mon|tues|wednes|thurs|fri|satur|sun)days?\b",                                   # weekdays
    r"\b(today|tonight|yesterday|tomorrow)\b",
    r"\b(this|last|next) (morning|afternoon|evening|night|week|weekend|month|season)\b",
    r"\b(jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec)\.? \d{1,2}\b",                   # dates
    rf"\b({_MONTHS}) \d{{1,2}}\b",
    rf"\b\d{{1,2}} ({_MONTHS.replace('may|', '')})\b",
    r"\b\d{1,2}(:\d\d)? ?[ap]\.?m\b",                                                   # clock times
    r"\b(said|says|told|announced|reported|spokes(wo)?man|spokesperson)\b",              # news attribution
    r"\baccording to\b",
    r"[$€£] ?\d",                                                                        # prices and deals
    r"\b\d+% off\b",
    r"\b(deals?|discounts?|coupons?|promo code|on sale|tickets?)\b",
    r"\b\d{1,3} ?[-–] ?\d{1,3}\b(?! ?(years?|minutes?|hours?|percent|%))",              # match results
    r"\b(won|beat|defeated|season|playoffs?|quarterback|touchdowns?|coach|league|tournament|championship)\b",
)
"""Signals of ephemeral, time-bound facts: one day's news, prices and deals, schedules, match results."""
LASTING_PATTERNS = (
    r"\b(because|therefore|thus|hence|as a result|in order to|so that)\b",                # reasoning
    r"\b(for example|for instance|e\.g\.|such as|in other words|that is,)",               # explanation
    r"\b(is defined as|refers to|is called|is known as|definition)\b",
    r"\b(how to|how (do|does|can)|why)\b",                                               # how-to
    r"\b(steps?|method|process|principle|theory|explains?|understand(ing)?|learn(ing)?)\b",
    r"\b(you can|you should|you need|make sure|tips?|guide)\b",
    r"\b(usually|typically|generally|in general|often)\b",                               # general statements
)
"""Signals of lasting knowledge: explanations, definitions, methods, reasoning, general statements."""
_TIMEBOUND = [re.compile(p, re.IGNORECASE) for p in TIMEBOUND_PATTERNS]
_LASTING = [re.compile(p, re.IGNORECASE) for p in LASTING_PATTERNS]


def signal_rates(text: str) -> tuple[float, float]:
    """(time-bound, lasting) signal matches per 100 words."""
    words = max(len(text.split()), 1)
    timebound = sum(len(r.findall(text)) for r in _TIMEBOUND)
    lasting = sum(len(r.findall(text)) for r in _LASTING)
    return 100.0 * timebound / words, 100.0 * lasting / words


class KnowledgeSignalsParams(StageParams):
    column: str = "knowledge_label"
    """The weak label: 1.0 lasting, 0.0 time-bound, null when the signals do not decide."""
    timebound_min: float = Field(1.5, ge=0)
    """Time-bound (0) when the time-bound rate is at least this and ``ratio`` times the lasting rate."""
    ratio: float = Field(2.0, ge=0)
    lasting_min: float = Field(1.2, ge=0)
    """Lasting (1) when the lasting rate is at least this and the time-bound rate at most ``timebound_max``."""
    timebound_max: float = Field(0.3, ge=0)


@register
class KnowledgeSignals(Stage):
    """Adds ``timebound_rate``, ``lasting_rate`` (signals per 100 words) and a weak label column; drops nothing."""

    type_name = "knowledge_signals"
    Params = KnowledgeSignalsParams
    params: KnowledgeSignalsParams

    def label(self, timebound: float, lasting: float) -> float | None:
        p = self.params
        if timebound >= p.timebound_min and timebound >= p.ratio * lasting:
            return 0.0
        if lasting >= p.lasting_min and timebound <= p.timebound_max:
            return 1.0
        return None

    def process(self, batch: pa.Table) -> StageOutput:
        rates = [signal_rates(t) for t in pc.fill_null(batch.column("text"), "").to_pylist()]
        batch = set_column(batch, "timebound_rate", pa.array([r[0] for r in rates], pa.float32()))
        batch = set_column(batch, "lasting_rate", pa.array([r[1] for r in rates], pa.float32()))
        labels = [self.label(*r) for r in rates]
        return StageOutput(set_column(batch, self.params.column, pa.array(labels, pa.float32())))


class KnowledgeThresholdParams(EduThresholdParams):
    column: str = "knowledge_score"
    compare_column: str = "edu_score"
    """The other score, recorded beside this one in each finding (the edu score the page passed)."""
    excerpt_chars: int = Field(300, ge=0)
    """Characters of each dropped page's text kept in its finding."""
    examples: int = Field(5, ge=0)
    """Dropped pages listed in the report: this many most time-bound, and this many the edu score liked most."""


def title_of(text: str, limit: int = 120) -> str:
    """A page's title as the extractor leaves it: its first non-empty line, shortened."""
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[:limit - 1].rstrip() + "…"
    return ""


def _float(value: float | None) -> float | None:
    return None if value is None or value != value else round(float(value), 4)


@register
class KnowledgeThreshold(EduThreshold):
    """Keeps documents whose knowledge-level score clears a run-wide cut; every drop is a finding."""

    type_name = "knowledge_threshold"
    Params = KnowledgeThresholdParams
    params: KnowledgeThresholdParams
    reports_always = True  # "removed nothing" is news too

    def apply(self, batch: pa.Table, decision: dict) -> StageOutput:
        if batch.num_rows == 0:
            return StageOutput(batch)
        out = super().apply(batch, decision)
        keep, missing = self.keep_mask(batch, decision)
        dropped = np.flatnonzero(~keep & ~missing)
        if not len(dropped):
            return out
        p = self.params
        index = pa.array(dropped)
        rows = batch.take(index)
        texts = pc.fill_null(rows.column("text"), "").to_pylist()
        urls = rows.column("url").to_pylist() if "url" in rows.schema.names else [None] * len(texts)
        other = (rows.column(p.compare_column).to_pylist() if p.compare_column in rows.schema.names
                 else [None] * len(texts))
        scores = self.scores(rows)
        out.findings = [{"id": doc_id, "kind": KIND, "url": url, "title": title_of(text),
                         "excerpt": " ".join(text[:p.excerpt_chars].split()), p.column: _float(score),
                         p.compare_column: _float(edu), "threshold": decision.get("threshold_score",
                                                                                 decision.get("min_score"))}
                        for doc_id, url, text, score, edu in zip(rows.column("id").to_pylist(), urls, texts,
                                                                   scores, other)]
        return out

    def report(self, findings: pa.Table) -> dict:
        """Pages dropped by the knowledge cut (all of which passed the cuts before it), with examples: the
        ``examples`` most time-bound (lowest score first), and the ``examples`` the compared (edu) score liked
        most. Ties break on the other score, then the id, so every engine reports the same pages."""
        p = self.params
        found = []
        if findings.num_rows:
            for doc_id, kind, detail in zip(findings.column("id").to_pylist(), findings.column("kind").to_pylist(),
                                            findings.column("detail").to_pylist()):
                if kind == KIND:
                    found.append(dict(json.loads(detail), id=doc_id))

        def value(finding: dict, column: str, missing: float) -> float:
            return missing if finding.get(column) is None else finding[column]

        inf = float("inf")
        by_score = sorted(found, key=lambda f: (value(f, p.column, inf), -value(f, p.compare_column, -inf),
                                                str(f["id"])))
        by_other = sorted(found, key=lambda f: (-value(f, p.compare_column, -inf), value(f, p.column, inf),
                                                str(f["id"])))
        scores = [f[p.column] for f in found if f.get(p.column) is not None]
        other = [f[p.compare_column] for f in found if f.get(p.compare_column) is not None]
        return {"dropped": len(found), "column": p.column, "compare_column": p.compare_column,
                f"mean_{p.column}": round(float(np.mean(scores)), 4) if scores else None,
                f"mean_{p.compare_column}": round(float(np.mean(other)), 4) if other else None,
                "examples": by_score[:p.examples], f"examples_highest_{p.compare_column}": by_other[:p.examples]}
