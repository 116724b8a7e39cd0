"""Post-generation filters for synthetic corpora (the output of ``phi3data generate``), as ordinary stages so they
run on every engine:

- ``synthetic_cleanup`` strips the formulaic openings and closings of LLM replies ("Sure! Here is ...",
  "As an AI language model ...", a "Title:" label, "I hope this helps!") and drops replies with nothing left;
- ``truncated`` drops (or only marks) replies cut off by the token limit (``finish_reason == "length"``);
- ``regurgitation`` measures how much of a generation is copied word for word from its seed document and drops
  the ones above a bound.

Minimum length is the ``length`` stage and the educational score is ``edu_score``; ``pipelines/synthetic.toml``
chains them all. Cosmopedia also strips the formulaic intros of its generations; the rules here are our own.

Provenance comes from the ``metadata`` JSON that ``phi3data generate`` writes (``finish_reason``, ``seed_text``
...). A Parquet input read by ``phi3data run`` nests that JSON one level down (``{"metadata": "<json>", ...}``),
so :func:`provenance` reads both shapes.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import pyarrow as pa
from pydantic import Field, field_validator

from phi3data.pipelines.base import Filter, StageOutput, StageParams, register, set_column, texts

# --- provenance ---------------------------------------------------------------------------------------------


def provenance(metadata: str | None) -> dict:
    """A generated document's provenance from its ``metadata`` JSON string ({} when absent or not JSON).

    Accepts the flat form ``phi3data generate`` writes and the form a reader makes of a Parquet input whose
    ``metadata`` column is itself JSON (``{"metadata": "<the generate JSON>", "source": ...}``)."""
    if not metadata:
        return {}
    try:
        outer = json.loads(metadata)
    except json.JSONDecodeError:
        return {}
    if not isinstance(outer, dict):
        return {}
    inner = outer.get("metadata")
    if isinstance(inner, str):
        try:
            inner = json.loads(inner)
        except json.JSONDecodeError:
            inner = None
    if isinstance(inner, dict):
        return {**{k: v for k, v in outer.items() if k != "metadata"}, **inner}
    return outer


def _provenances(batch: pa.Table) -> list[dict]:
    if "metadata" not in batch.schema.names:
        return [{} for _ in range(batch.num_rows)]
    return [provenance(m) for m in batch.column("metadata").to_pylist()]


# --- synthetic_cleanup ----------------------------------------------------------------------------------------

MAX_PREAMBLE_CHARS = 300
"""An opening or closing line longer than this is content, not a formula, and is never removed whole."""

_INTERJECTION = re.compile(
    r"^(?:sure|certainly|of course|absolutely|okay|ok|alright|all right|great question|great|no problem|"
    r"sure thing|with pleasure)(?P<mark>[!,.:;\-–—]+\s*|\s*$)", re.IGNORECASE)  # a mark: not "Great Awakening"
# what follows an interjection (or opens a line by itself) when the line only announces the answer
_PREAMBLE_START = re.compile(
    r"^(?:here(?:'s|’s| is| are)|below (?:is|are)|the following (?:is|are)|as requested|let me|let's|"
    r"i(?:'d|’d| would| will|'ll|’ll| can|'m|’m| am| have|'ve|’ve)\b)", re.IGNORECASE)
# a line that opens with "Here is ..." without an interjection is a preamble only if it names what it announces
_ANNOUNCED = re.compile(
    r"\b(?:textbook|section|chapter|course unit|unit|lesson|story|article|blog post|essay|explanation|response|"
    r"answer|draft|version|outline|extract|passage|tutorial|guide|rewrite|write-up|piece)s?\b", re.IGNORECASE)
_FIRST_PERSON_OFFER = re.compile(
    r"^i(?:'d|’d| would|'m|’m| am) (?:be )?(?:happy|glad|delighted|pleased)\b|"
    r"^i(?:'ll|’ll| will| can) (?:help|write|create|provide|generate|draft|compose)\b", re.IGNORECASE)
_AS_AN_AI = re.compile(
    r"(?:^|(?<=[.!?])[ \t]+)As an AI(?: language)? (?:model|assistant)\b[^.!?\n]*[.!?]?[ \t]*",
    re.IGNORECASE | re.MULTILINE)
_TITLE_LINE = re.compile(r"^[#*\s]*title[*\s]*:[*\s]*(.*?)[*\s]*$", re.IGNORECASE)
_CLOSING = re.compile(
    r"^\W*(?:i hope (?:this|that|these|you|it)|hope (?:this|that) helps|let me know if|"
    r"feel free to (?:ask|reach out|let me know|contact)|"
    r"please let me know|if you have any (?:other |more |further |additional )?questions|"
    r"is there anything else|happy (?:learning|studying|reading|exploring)|good luck)\b", re.IGNORECASE)
_TRAILING_CLOSING = re.compile(
    r"(?<=[.!?])[ \t]+(?:i hope (?:this|that|these|you|it)|hope (?:this|that) helps|let me know if|"
    r"feel free to (?:ask|reach out)|please let me know|"
    r"if you have any (?:other |more |further |additional )?questions)\b.*$",
    re.IGNORECASE)
_RULE = re.compile(r"^[\s\-*_=~#]*$")  # blank lines and horizontal rules left around a removed line


def _normalise_title(line: str) -> str:
    return " ".join(re.findall(r"\w+", line.casefold()))


def _clean_opening_line(lines: list[str]) -> bool:
    """Remove or trim one formulaic first line in place; False when the first line is content."""
    line = lines[0].strip()
    short = len(line) <= MAX_PREAMBLE_CHARS
    interjection = _INTERJECTION.match(line)
    if interjection:
        rest = line[interjection.end():]
        if not rest or (short and _PREAMBLE_START.match(rest)):
            del lines[0]
            return True
        if "!" in interjection.group("mark"):  # "Certainly! Photosynthesis is ..." keeps its content
            lines[0] = rest[0].upper() + rest[1:]
            return True
    if short and (_FIRST_PERSON_OFFER.match(line)
                  or (_PREAMBLE_START.match(line) and _ANNOUNCED.search(line) and line[-1] in ":.!")):
        del lines[0]
        return True
    title = _TITLE_LINE.match(line)
    if title:
        following = next((x for x in lines[1:] if x.strip()), "")
        if not title.group(1) or _normalise_title(title.group(1)) == _normalise_title(following):
            del lines[0]  # an empty label, or one the next line (a heading) restates
        else:
            lines[0] = title.group(1)  # keep the title, drop the label
        return True
    return False


def _strip_rules(lines: list[str], at_end: bool) -> None:
    while lines and _RULE.match(lines[-1 if at_end else 0]):
        del lines[-1 if at_end else 0]


def clean_reply(text: str, extra: list[re.Pattern] = ()) -> str:
    """A generated reply without its formulaic openings and closings (and the ``extra`` patterns' matches)."""
    text = _AS_AN_AI.sub("", text)
    for pattern in extra:
        text = pattern.sub("", text)
    lines = text.splitlines()
    _strip_rules(lines, at_end=False)
    while lines and _clean_opening_line(lines):
        _strip_rules(lines, at_end=False)
    _strip_rules(lines, at_end=True)
    while lines and len(lines[-1].strip()) <= MAX_PREAMBLE_CHARS and _CLOSING.match(lines[-1].strip()):
        del lines[-1]
        _strip_rules(lines, at_end=True)
    if lines:
        lines[-1] = _TRAILING_CLOSING.sub("", lines[-1])
    return "\n".join(lines).strip()


class SyntheticCleanupParams(StageParams):
    extra_patterns: list[str] = []
    """Regular expressions (case-insensitive, ``^``/``$`` match at lines) whose matches are removed too."""

    @field_validator("extra_patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
        return patterns


@register
class SyntheticCleanup(Filter):
    """Strips formulaic openings and closings from generated replies; drops replies empty after cleaning."""

    type_name = "synthetic_cleanup"
    Params = SyntheticCleanupParams
    params: SyntheticCleanupParams

    def setup(self) -> None:
        self.extra = [re.compile(p, re.IGNORECASE | re.MULTILINE) for p in self.params.extra_patterns]

    def reasons(self, batch: pa.Table):
        self.ensure_setup()
        cleaned = [clean_reply(t or "", self.extra) for t in texts(batch)]
        return [None if t else "empty_after_cleanup" for t in cleaned], cleaned


# --- truncated ------------------------------------------------------------------------------------------------


class TruncatedParams(StageParams):
    action: Literal["drop", "count"] = "drop"
    """drop: drop truncated replies; count: keep every row and add a bool column ``truncated``."""


@register
class Truncated(Filter):
    """Replies the backend cut off at the token limit (``finish_reason == "length"`` in the metadata)."""

    type_name = "truncated"
    Params = TruncatedParams
    params: TruncatedParams

    def flags(self, batch: pa.Table) -> list[bool]:
        return [p.get("finish_reason") == "length" for p in _provenances(batch)]

    def reasons(self, batch: pa.Table):
        return ["truncated" if flag else None for flag in self.flags(batch)], None

    def process(self, batch: pa.Table) -> StageOutput:
        if self.params.action == "count":
            return StageOutput(set_column(batch, "truncated", pa.array(self.flags(batch), pa.bool_())))
        return super().process(batch)


# --- regurgitation --------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Case-folded word tokens; punctuation and whitespace only separate them."""
    return re.findall(r"\w+", text.casefold())


def ngrams(tokens: list[str], n: int) -> list[str]:
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def seed_overlap(text: str, seed: set[str], n: int) -> float:
    """The fraction of the text's word n-grams (counted with repeats) that occur in the seed's n-gram set; 0.0 for
    a text shorter than n words (it has no n-gram to copy)."""
    grams = ngrams(words(text), n)
    if not grams:
        return 0.0
    return sum(g in seed for g in grams) / len(grams)


class RegurgitationParams(StageParams):
    n: int = Field(8, ge=1, le=64)
    """Words per n-gram. 8 is long enough that a paraphrase rarely repeats a run by chance (shared terms and short
    phrases like "the cell membrane is" are 3-5 words) and short enough that a copied sentence is caught in full;
    benchmark decontamination uses 10-13 for its much larger indexes."""
    max_overlap: float = Field(0.3, ge=0.0, le=1.0)
    """Drop a generation when more than this fraction of its n-grams appear verbatim in its seed."""
    seed_key: str = "seed_text"
    """The metadata key that holds the seed document (or outline) the prompt was given."""
    column: str = "seed_overlap"


@register
class Regurgitation(Filter):
    """Adds ``seed_overlap`` (null without a seed text) and drops generations that copy their seed."""

    type_name = "regurgitation"
    Params = RegurgitationParams
    params: RegurgitationParams

    def overlaps(self, batch: pa.Table) -> list[float | None]:
        n = self.params.n
        seeds: dict[str, set[str]] = {}  # several generations of a plan share a seed
        out: list[float | None] = []
        for text, meta in zip(texts(batch), _provenances(batch)):
            seed = meta.get(self.params.seed_key)
            if not isinstance(seed, str) or not seed.strip():
                out.append(None)
                continue
            if seed not in seeds:
                seeds[seed] = set(ngrams(words(seed), n))
            out.append(seed_overlap(text or "", seeds[seed], n))
        return out

    def reasons(self, batch: pa.Table):
        """Reads the overlap column ``process`` adds."""
        limit = self.params.max_overlap
        values = batch.column(self.params.column).to_pylist()
        return ["regurgitated" if v is not None and v > limit else None for v in values], None

    def process(self, batch: pa.Table) -> StageOutput:
        batch = set_column(batch, self.params.column, pa.array(self.overlaps(batch), pa.float64()))
        return super().process(batch)
