"""Heuristic quality filters: Gopher repetition and quality (Rae et al. 2021), C4 (Raffel et al. 2020) and
FineWeb's line-level rules (Penedo et al. 2024).

The thresholds and rules follow the papers and datatrove's defaults so results are comparable; the code is
ours and splits words with one regex instead of a spaCy tokenizer, which is what makes it fast. The benchmark
reports how closely the kept documents agree with datatrove's.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from itertools import filterfalse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phi3data.pipelines.base import Filter, StageParams, register, texts

try:  # the hot loops in C (built by `pip install`); the Python below gives the same results, slower
    from phi3data.pipelines.stages import _heuristics_c
except ImportError:  # pragma: no cover - a build without a C compiler
    _heuristics_c = None

# Close to spaCy's English tokenizer on web text: numbers such as 3.6.0 or 1,000 and contractions stay whole,
# runs of dots are one token, and every other punctuation mark is a token of its own.
WORD_RE = re.compile(r"\d+(?:[.,:/]\d+)+|\w+(?:['’]\w+)*|\.{2,}|[^\w\s]")
# Characters that make a "word" a symbol when a word consists only of them.
_PUNCT = set(
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~¡§«¶·»¿‐‑‒–—―‘’‚‛“”„‟†‡•…‰"
    "′″‹›※⁂、。〈〉《》「」『』【】〔〕〜・！＂＃％＆＇（）＊＋，－．／：；＜＝＞？＠［＼］＾＿｀｛｜｝～｟｠｡｢｣､･►"
)
_PUNCT_CHARS = "".join(sorted(_PUNCT))
TERMINAL_PUNCT = (".", "!", "?", '"', "'", "。", "！", "？", "…", "”", "’", "»", "؟", "।", "॥", ";", ":")
SENTENCE_END_RE = re.compile(r"[.!?。！？]+[\"'”’)\]]*\s+(?=\S)")
PARAGRAPH_RE = re.compile(r"\n{2,}")
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


def split_words(text: str) -> list[str]:
    """Words and runs of punctuation, in order. The last batch's splits are remembered: the Gopher filters run
    one after the other on the same texts, and splitting is a third of their time."""
    global _recent_chars
    words = _recent_words.get(text)
    if words is None:
        if _recent_chars > _RECENT_CHAR_LIMIT:
            _recent_words.clear()
            _recent_chars = 0
        words = _recent_words[text] = _find_words(text)
        _recent_chars += len(text)
    return words


def _find_words_py(text: str) -> list[str]:
    """``WORD_RE.findall(text)``, faster: no match spans whitespace (regex ``\\s`` and ``str.split`` agree on
    every code point), so the text is cut at whitespace first, and a piece of letters and digits only (``\\w``
    without ``_``) is one word as it stands; only the other pieces go through the regex."""
    words: list[str] = []
    add, extend, find = words.append, words.extend, WORD_RE.findall
    for piece in text.split():
        if piece.isalnum():
            add(piece)
        else:
            extend(find(piece))
    return words


# ``WORD_RE.findall(text)``: in C when the extension is built
_find_words = _heuristics_c.find_words if _heuristics_c is not None else _find_words_py

_recent_words: dict[str, list[str]] = {}
_recent_chars = 0
_RECENT_CHAR_LIMIT = 32_000_000  # a few batches of web pages; the memory it holds stays bounded


_SYMBOL_LINE_RE = re.compile("^[" + re.escape(_PUNCT_CHARS) + "]+$", re.MULTILINE)  # a line that is a symbol word


def is_symbol(word: str) -> bool:
    return not word.strip(_PUNCT_CHARS)  # nothing left once every punctuation mark is stripped


def _split_lines(text: str) -> list[str]:
    """The text cut at every run of newlines, as ``re.split(r"\\n+", text)`` cuts it, by ``str.split``: empty
    pieces between newlines dropped, the first and last kept as they are."""
    parts = text.split("\n")
    if len(parts) < 3:
        return parts
    return [parts[0], *filter(None, parts[1:-1]), parts[-1]]


def count_sentences(line: str) -> int:
    return len(SENTENCE_END_RE.findall(line)) + 1 if line.strip() else 0


def _duplicates(items: list[str]) -> tuple[int, int]:
    """How many items repeat an earlier one, and how many characters those repeats hold."""
    seen: set[str] = set()
    dup_items = dup_chars = 0
    for item in items:
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return dup_items, dup_chars


# n-grams are compared by a 64-bit key per start position: a polynomial over the document's word ids, modulo
# 2**64. Two different n-grams share a key with probability about 2**-64 per pair; in exchange every n-gram rule
# works on integer arrays instead of tuples of strings (2.5x faster, identical results on the shared web pages).
_KEY_MULT = np.uint64(0x9E3779B97F4A7C15)


class _Words:
    """A document's words as integer ids, with cumulative character lengths, for the n-gram rules."""

    def __init__(self, words: list[str]) -> None:
        array = pa.array(words, pa.string())
        # ids in order of first appearance (Arrow's hash table: faster than a Python dict of the words)
        self.ids = pc.dictionary_encode(array).indices.to_numpy().astype(np.uint64)
        self.in_groups: dict[int, np.ndarray] = {}  # n -> sorted positions whose n-gram occurs more than once
        self.chars = np.zeros(len(words) + 1, dtype=np.int64)
        np.cumsum(pc.utf8_length(array).to_numpy(), out=self.chars[1:])

    def keys(self, n: int, starts: np.ndarray | None = None) -> np.ndarray:
        """The key of the n-gram at every position (or at ``starts`` only)."""
        if starts is None:
            m = len(self.ids) - n + 1
            keys = self.ids[:m].copy()
            for k in range(1, n):
                keys *= _KEY_MULT
                keys += self.ids[k:k + m] + np.uint64(1)
            return keys
        keys = self.ids[starts]
        for k in range(1, n):
            keys *= _KEY_MULT
            keys += self.ids[starts + k] + np.uint64(1)
        return keys

    def gram_chars(self, n: int, starts: np.ndarray) -> np.ndarray:
        """Characters of the words of the n-grams starting at ``starts`` (without the spaces between them)."""
        return self.chars[starts + n] - self.chars[starts]


def _top_ngram_chars(words: _Words, n: int) -> int:
    """Characters covered by the most frequent n-gram (its length times its count); among equally frequent
    n-grams, the one seen first."""
    if len(words.ids) < n:
        return 0
    positions, keys = _sorted_grams(words, n)
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1]))) if len(keys) else np.zeros(0, int)
    counts = np.diff(np.append(starts, len(keys)))
    words.in_groups[n] = np.sort(positions[np.repeat(counts >= 2, counts)])
    best = int(counts.max()) if len(counts) else 1
    start = int(positions[starts[counts == best]].min()) if best > 1 else 0  # all distinct: the first n-gram
    return int(words.gram_chars(n, np.array([start]))[0] + n - 1) * best


def _dup_ngram_chars(words: _Words, n: int) -> int:
    """Characters in n-grams that repeat an earlier n-gram, skipping past each repeat (Gopher's rule).

    Sequentially: walk the positions; a position whose n-gram was seen at an earlier walked position is a repeat,
    counted, and the walk jumps n positions ahead (the positions jumped over are never seen). Only positions whose
    n-gram occurs earlier at all can be repeats, so the walk visits just those; for each it follows the chain of
    earlier occurrences back past the ones a jump skipped."""
    m = len(words.ids) - n + 1
    if m <= 0:
        return 0
    prev = _previous_occurrence(words, n)
    repeats: list[int] = []
    next_walked = 0
    for j in sorted(prev):
        if j < next_walked:
            continue
        p = prev[j]
        while p >= 0:
            r = bisect.bisect_left(repeats, p) - 1  # the last repeat before p: did its jump skip p?
            if r >= 0 and p < repeats[r] + n:
                p = prev.get(p, -1)
            else:
                break
        if p >= 0:
            repeats.append(j)
            next_walked = j + n
    return int(words.gram_chars(n, np.asarray(repeats, dtype=np.int64)).sum())


def _previous_occurrence(words: _Words, n: int) -> dict[int, int]:
    """For each position whose n-gram occurred before, the position of the previous occurrence."""
    positions, keys = _sorted_grams(words, n)
    same = keys[1:] == keys[:-1]
    later, earlier = positions[1:][same], positions[:-1][same]
    words.in_groups[n] = np.union1d(later, earlier)
    return dict(zip(later.tolist(), earlier.tolist()))


def _sorted_grams(words: _Words, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The positions of the document's n-grams sorted by n-gram (equal ones in document order), with their keys.

    Two equal n-grams start with equal shorter n-grams, so only positions whose k-gram (k < n) occurs more than
    once can hold a repeated n-gram: when a shorter size was done before (the rules go 2, 3, 4, then 5 ... 10),
    only those positions are sorted, usually a small part of the document. Positions left out are all distinct."""
    m = len(words.ids) - n + 1
    shorter = [k for k in words.in_groups if k < n]
    if shorter:
        positions = words.in_groups[max(shorter)]
        positions = positions[positions < m]
        keys = words.keys(n, positions)
    else:
        positions = np.arange(m)
        keys = words.keys(n)
    order = np.argsort(keys, kind="stable")
    return positions[order], keys[order]


class GopherRepetitionParams(StageParams):
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: list[tuple[int, float]] = [(2, 0.2), (3, 0.18), (4, 0.16)]
    dup_n_grams: list[tuple[int, float]] = [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]


@register
class GopherRepetition(Filter):
    """Drops documents with repeated lines, paragraphs or n-grams."""

    type_name = "gopher_repetition"
    Params = GopherRepetitionParams
    params: GopherRepetitionParams

    def reasons(self, batch: pa.Table):
        return [self.check(t) for t in texts(batch)], None

    def check(self, text: str) -> str | None:
        p = self.params
        if not text:
            return "empty"
        size = len(text)
        paragraphs = PARAGRAPH_RE.split(text.strip())
        dup_items, dup_chars = _duplicates(paragraphs)
        if p.dup_para_frac is not None and dup_items / len(paragraphs) > p.dup_para_frac:
            return "dup_para_frac"
        if p.dup_para_char_frac is not None and dup_chars / size > p.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _split_lines(text)
        dup_items, dup_chars = _duplicates(lines)
        if p.dup_line_frac is not None and dup_items / len(lines) > p.dup_line_frac:
            return "dup_line_frac"
        if p.dup_line_char_frac is not None and dup_chars / size > p.dup_line_char_frac:
            return "dup_line_char_frac"
        if _heuristics_c is not None:
            return _heuristics_c.repetition_reason(split_words(text), size, p.top_n_grams, p.dup_n_grams)
        return self.ngram_reason_py(split_words(text), size)

    def ngram_reason_py(self, words: list[str], size: int) -> str | None:
        """The n-gram rules in Python: what the C helper computes."""
        p = self.params
        words = _Words(words)
        for n, frac in p.top_n_grams:
            if _top_ngram_chars(words, n) / size > frac:
                return f"top_{n}_gram"
        for n, frac in p.dup_n_grams:
            if _dup_ngram_chars(words, n) / size > frac:
                return f"dup_{n}_gram"
        return None


class GopherQualityParams(StageParams):
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2
    stop_words: list[str] = list(STOP_WORDS)


@register
class GopherQuality(Filter):
    """Gopher's document-quality rules: word counts and lengths, symbols, bullets, ellipses, stop words."""

    type_name = "gopher_quality"
    Params = GopherQualityParams
    params: GopherQualityParams

    def reasons(self, batch: pa.Table):
        stop_words = set(self.params.stop_words)
        return [self.check(t, stop_words) for t in texts(batch)], None

    def check(self, text: str, stop_words: set[str]) -> str | None:
        p = self.params
        words = split_words(text)
        n_words = len(words)
        if n_words == 0:
            return "short_doc"
        # each distinct word is classified once and weighted by its count (a web page repeats most of its words);
        # the symbol words are found by one regex over the distinct words, one per line
        counts = Counter(words)
        symbols = _SYMBOL_LINE_RE.findall("\n".join(counts))
        n_content = n_words - sum(counts[w] for w in symbols)
        if p.min_doc_words is not None and n_content < p.min_doc_words:
            return "short_doc"
        if p.max_doc_words is not None and n_content > p.max_doc_words:
            return "long_doc"
        content_chars = sum(map(len, words)) - sum(len(w) * counts[w] for w in symbols)
        avg_len = content_chars / max(n_content, 1)
        if p.min_avg_word_length is not None and avg_len < p.min_avg_word_length:
            return "below_avg_word_length"
        if p.max_avg_word_length is not None and avg_len > p.max_avg_word_length:
            return "above_avg_word_length"
        if p.max_symbol_word_ratio is not None:
            if text.count("#") / n_words > p.max_symbol_word_ratio:
                return "too_many_hashes"
            if (text.count("...") + text.count("…")) / n_words > p.max_symbol_word_ratio:
                return "too_many_ellipsis"
        lines = text.splitlines() or [""]
        if p.max_bullet_lines_ratio is not None:
            bullets = sum(1 for line in lines if line.lstrip().startswith(("•", "-")))
            if bullets / len(lines) > p.max_bullet_lines_ratio:
                return "too_many_bullets"
        if p.max_ellipsis_lines_ratio is not None:
            ellipsis = sum(1 for line in lines if line.rstrip().endswith(("...", "…")))
            if ellipsis / len(lines) > p.max_ellipsis_lines_ratio:
                return "too_many_end_ellipsis"
        if p.min_alpha_words_ratio is not None:
            # words with no letter at all, looked for among the words that are not all letters
            no_alpha = sum(counts[w] for w in filterfalse(str.isalpha, counts) if not any(map(str.isalpha, w)))
            if (n_words - no_alpha) / n_words < p.min_alpha_words_ratio:
                return "below_alpha_ratio"
        if p.min_stop_words is not None and len(stop_words.intersection(counts)) < p.min_stop_words:
            return "not_enough_stop_words"
        return None


class C4QualityParams(StageParams):
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True
    remove_citations: bool = True


CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                  "use cookies")
C4_END_PUNCT = (".", "?", "!", '"', "'")


@register
class C4Quality(Filter):
    """C4's rules: keep only lines that end in terminal punctuation and have enough words, drop documents
    with too few sentences, 'lorem ipsum' or curly brackets. The document text becomes its kept lines."""

    type_name = "c4_quality"
    Params = C4QualityParams
    params: C4QualityParams

    def reasons(self, batch: pa.Table):
        reasons: list[str | None] = []
        new_texts: list[str] = []
        for text in texts(batch):
            reason, kept = self.check(text)
            reasons.append(reason)
            new_texts.append(kept if reason is None else text)
        return reasons, new_texts

    def check(self, text: str) -> tuple[str | None, str]:
        p = self.params
        sentences = 0
        kept: list[str] = []
        for line in text.splitlines():
            line = line.strip()
            # the line-dropping checks are independent of one another: the cheapest go first (most web lines
            # lack terminal punctuation); words are counted on the line before citations are cut, as in C4
            cleaned = CITATION_RE.sub("", line) if p.remove_citations and "[" in line else line
            if p.filter_no_terminal_punct and (not cleaned.endswith(C4_END_PUNCT) or cleaned.endswith("...")):
                continue
            words = line.split()
            # a line no longer than the limit cannot hold a longer word
            if 0 < p.max_word_length < len(line) and any(len(w) > p.max_word_length for w in words):
                continue
            if len(words) < p.min_words_per_line:
                continue
            line = cleaned
            lowered = line.lower()
            if p.filter_lorem_ipsum and "lorem ipsum" in lowered:
                return "lorem_ipsum", text
            if p.filter_javascript and "javascript" in lowered:
                continue
            if p.filter_curly_bracket and "{" in line:
                return "curly_bracket", text
            if p.filter_policy and any(phrase in lowered for phrase in POLICY_PHRASES):
                continue
            sentences += count_sentences(line)
            kept.append(line)
        if p.min_num_sentences > 0 and sentences < p.min_num_sentences:
            return "too_few_sentences", text
        return None, "\n".join(kept).strip()


class FineWebQualityParams(StageParams):
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


@register
class FineWebQuality(Filter):
    """FineWeb's rules: enough lines ending in punctuation, not mostly short lines, few duplicated line
    characters, and not list-like (many newlines per word)."""

    type_name = "fineweb_quality"
    Params = FineWebQualityParams
    params: FineWebQualityParams

    def reasons(self, batch: pa.Table):
        return [self.check(t) for t in texts(batch)], None

    def check(self, text: str) -> str | None:
        p = self.params
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return "empty"
        ratio = sum(1 for line in lines if line.endswith(TERMINAL_PUNCT)) / len(lines)
        if ratio < p.line_punct_thr and not (ratio == 0 and p.line_punct_exclude_zero):
            return "line_punct_ratio"
        if sum(1 for line in lines if len(line) <= p.short_line_length) / len(lines) > p.short_line_thr:
            return "short_line_ratio"
        non_newline = len(text) - text.count("\n")
        if non_newline and _duplicates(lines)[1] / non_newline > p.char_duplicates_ratio:
            return "char_dup_ratio"
        newlines = text.count("\n")
        # every whitespace-separated token holds at least one word, so only a text with many newlines per token
        # can fail the rule: just then are its words counted
        if newlines > p.new_line_ratio * len(text.split()):
            words = split_words(text)
            if not words or newlines / len(words) > p.new_line_ratio:
                return "list_ratio"
        return None
