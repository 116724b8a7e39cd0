"""Dedup quality: a benchmark set of planted near-duplicates built from real pages, and the precision and recall of
a dedup run's clusters against exact Jaccard similarity.

**The planted set** (:func:`planted_set`). Real pages (extracted from the shared WARC sample by our own pipeline,
:func:`real_pages`) are the documents; some of them, the *originals*, also get edited copies. Each copy applies
one edit at one strength, so that some copies stay above the Jaccard threshold and some fall below it:

==============  =====================================================================================  ===========
edit            what changes                                                                           strengths
==============  =====================================================================================  ===========
``verbatim``    nothing (an exact copy)                                                                0
``reformat``    case, spacing, line breaks and sentence punctuation: the *normalised* text is equal    0
``boilerplate`` header and footer lines (``strength`` of the words, half at each end) replaced by      .05 .15 .3
                another page's first and last lines
``shuffle``     a ``strength`` share of the paragraphs permuted among their places (each one moves)    .25 .5 1
``trim``        ``strength`` of the words cut, split at random between head and tail                   .1 .25 .4
``rewrite``     ``strength`` of the words edited, half replaced by and half preceded by another        .01 .03 .06
                page's words                                                                           .12
``mixed``       boilerplate ``.1s``, then trim ``.1s``, then rewrite ``.02s``                          .5 1
==============  =====================================================================================  ===========

Original ``k``'s ``c``-th copy gets variant ``(k * copies + c) mod 17`` of the table, so every variant is
planted about equally often. Everything is drawn from ``numpy.random.default_rng`` seeded by ``(seed, k, c)`` (and
the choice of originals by ``seed``): the same pages and seed give byte-identical shards. Document ids are
``d`` + 16 hex digits of xxh64 over (seed, source id, copy number): unique (checked), and unrelated to which
document is the original, so "keep the smallest id" keeps an original or a copy at random. Pages with fewer than
``min_words`` words are left out of the set altogether (no shingles: their Jaccard is undefined).

The set is written as JSONL shards (``<out>/shards/planted-NNNNN.jsonl``: ``id``, ``text``, ``url``; documents in
a seeded random order, so a page and its copies usually sit in different shards) that any recipe reads, and a
manifest ``<out>/planted.json`` (each document's family, edit and strength); :func:`load_planted` reads it back.

**Quality** (:func:`pair_quality`). The truth is exact Jaccard similarity of word ``ngram``-shingle sets, the
shingles of :func:`phi3data.pipelines.stages.dedup.shingle_hashes` (what :func:`~phi3data.pipelines.stages.dedup.
exact_jaccard` compares): a pair is a true near-duplicate when ``J >= threshold``. A pair is *predicted* when the
run put both documents in one cluster (a kept document and the duplicates dropped in its favour, read from the
run's findings, or any ``{id: cluster}`` mapping, e.g. from datatrove's cluster ids). Precision and recall are
reported over every pair of the set (the truth found by a sparse shingle-matrix product, so nothing is
sampled), over the pairs inside planted families, and per document (is it in some true pair / in some cluster).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from phi3data.io.writers import write_json_atomic
from phi3data.pipelines.stages.dedup import shingle_hashes

VARIANTS: list[tuple[str, float]] = (
    [("verbatim", 0.0), ("reformat", 0.0)]
    + [("boilerplate", s) for s in (0.05, 0.15, 0.3)]
    + [("shuffle", s) for s in (0.25, 0.5, 1.0)]
    + [("trim", s) for s in (0.1, 0.25, 0.4)]
    + [("rewrite", s) for s in (0.01, 0.03, 0.06, 0.12)]
    + [("mixed", s) for s in (0.5, 1.0)]
)
"""Every (edit, strength) a copy can get, in the order copies cycle through them."""

MANIFEST = "planted.json"
SHARDS_DIR = "shards"
_WORD = re.compile(r"\S+")


# --- real pages --------------------------------------------------------------------------------------------------


def real_pages(source: Path, work: Path, *, limit_shards: int = 0, workers: int = 2,
               min_chars: int = 200) -> list[dict]:
    """Real pages as ``{"id", "text", "url"}`` dicts, sorted by id: the WARC files under ``source`` extracted by our
    pipeline (resiliparse, main content) or the JSONL files read as they are, then a ``length`` filter.

    Runs a recipe into ``work`` (a run there is reused, as any run is)."""
    from phi3data.pipelines.recipe import load_recipe
    from phi3data.pipelines.runner import run_pipeline

    source = Path(source)
    warcs = sorted(source.glob("*.warc.gz"))
    stages: list[dict] = [{"type": "extract"}] if warcs else []
    stages.append({"type": "length", "min_chars": min_chars})
    input_dir = source
    if limit_shards:
        files = warcs or sorted(p for p in source.iterdir() if p.is_file())
        input_dir = work / "input"
        input_dir.mkdir(parents=True, exist_ok=True)
        for path in files[:limit_shards]:
            link = input_dir / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    recipe = load_recipe({"pipeline": {"name": "dedup-quality-pages"}, "stage": stages})
    run_pipeline(recipe, input_dir, work / "pages", engine="local", workers=workers, progress=False)
    tables = [pq.read_table(p, columns=["id", "text", "url"]) for p in sorted((work / "pages" / "data").glob("*"))]
    pages = [{"id": i, "text": t, "url": u} for table in tables
             for i, t, u in zip(*(table.column(c).to_pylist() for c in ("id", "text", "url")))]
    return sorted(pages, key=lambda p: p["id"])


# --- the edits ---------------------------------------------------------------------------------------------------


def _spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _WORD.finditer(text)]


def _blocks(text: str, words_per_block: int = 40) -> list[str]:
    """A text's paragraphs (non-empty lines); a text of fewer than 4 lines is cut into ``words_per_block`` blocks."""
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) >= 4:
        return lines
    words = text.split()
    return [" ".join(words[i:i + words_per_block]) for i in range(0, len(words), words_per_block)]


def reformat(text: str, rng: np.random.Generator) -> str:
    """Same normalised words, other surface: some ASCII words upper-cased, spaces doubled, blank lines added,
    full stops turned into exclamation marks."""
    out = []
    last = 0
    for start, end in _spans(text):
        out.append(text[last:start])
        word = text[start:end]
        roll = rng.random()
        if roll < 0.1 and word.isascii():
            word = word.upper()
        elif roll < 0.15:
            word = word.replace(".", "!")
        out.append(word)
        last = end
    out.append(text[last:])
    text = "".join(out)
    return text.replace(". ", ".  ").replace("\n", "\n\n")


def boilerplate(text: str, strength: float, donor: str) -> str:
    """Replace about ``strength`` of the words, half from the head and half from the tail (whole paragraphs), with
    the donor page's first and last paragraphs of about the same length."""
    blocks, donor_blocks = _blocks(text), _blocks(donor)
    total = sum(len(b.split()) for b in blocks)
    target = strength * total / 2

    def take(seq: list[str]) -> int:
        n, words = 0, 0
        while n < len(seq) - 1 and (n == 0 or words < target):
            words += len(seq[n].split())
            n += 1
        return n

    head = take(blocks)
    tail = take(blocks[head:][::-1])
    new_head = donor_blocks[:take(donor_blocks)]
    new_tail = donor_blocks[::-1][:take(donor_blocks[::-1])][::-1]
    return "\n".join(new_head + blocks[head:len(blocks) - tail] + new_tail)


def shuffle(text: str, strength: float, rng: np.random.Generator) -> str:
    """Permute a ``strength`` share of the paragraphs (at least 2) among their own places; each of them moves."""
    blocks = _blocks(text)
    k = max(2, round(strength * len(blocks)))
    if len(blocks) < 2:
        return text
    places = np.sort(rng.choice(len(blocks), size=min(k, len(blocks)), replace=False))
    moved = rng.permutation(places)
    fixed = np.flatnonzero(moved == places)
    if fixed.size == 1:  # a paragraph left in place swaps with a neighbour among the chosen
        other = (fixed[0] + 1) % places.size
        moved[[fixed[0], other]] = moved[[other, fixed[0]]]
    elif fixed.size > 1:  # several left in place move round among themselves
        moved[fixed] = np.roll(moved[fixed], 1)
    out = list(blocks)
    for dst, src in zip(places, moved):
        out[dst] = blocks[src]
    return "\n".join(out)


def trim(text: str, strength: float, rng: np.random.Generator) -> str:
    """Cut ``strength`` of the words, a random 20-80% of them from the head and the rest from the tail."""
    spans = _spans(text)
    cut = int(round(strength * len(spans)))
    if cut == 0 or cut >= len(spans):
        return text
    head = int(round(cut * rng.uniform(0.2, 0.8)))
    tail = cut - head
    return text[spans[head][0]:spans[len(spans) - tail - 1][1]]


def rewrite(text: str, strength: float, donor: str, rng: np.random.Generator) -> str:
    """Edit ``strength`` of the words at random places: half are replaced by a donor word, half get a donor word
    inserted before them."""
    spans = _spans(text)
    vocab = donor.split() or ["lorem"]
    k = max(1, int(round(strength * len(spans))))
    places = set(rng.choice(len(spans), size=min(k, len(spans)), replace=False).tolist())
    out, last = [], 0
    for i, (start, end) in enumerate(spans):
        out.append(text[last:start])
        word = text[start:end]
        if i in places:
            new = vocab[int(rng.integers(len(vocab)))]
            word = new if rng.random() < 0.5 else f"{new} {word}"
        out.append(word)
        last = end
    out.append(text[last:])
    return "".join(out)


def edit(text: str, kind: str, strength: float, donor: str, rng: np.random.Generator) -> str:
    """One planted copy of ``text``: ``kind`` at ``strength`` (see the module docstring)."""
    if kind == "verbatim":
        return text
    if kind == "reformat":
        return reformat(text, rng)
    if kind == "boilerplate":
        return boilerplate(text, strength, donor)
    if kind == "shuffle":
        return shuffle(text, strength, rng)
    if kind == "trim":
        return trim(text, strength, rng)
    if kind == "rewrite":
        return rewrite(text, strength, donor, rng)
    if kind == "mixed":
        text = boilerplate(text, 0.1 * strength, donor)
        text = trim(text, 0.1 * strength, rng)
        return rewrite(text, 0.02 * strength, donor, rng)
    raise ValueError(f"unknown edit {kind!r}; one of {sorted({k for k, _ in VARIANTS})}")


# --- the planted set ---------------------------------------------------------------------------------------------


@dataclass
class PlantedSet:
    """A planted set on disk: its JSONL shards, every document's text, and its family, edit and strength."""

    root: Path
    texts: dict[str, str]
    info: dict[str, dict]
    """id -> {"family": original's id or None (a page without copies), "edit", "strength", "source"}."""
    params: dict = field(default_factory=dict)

    @property
    def shards(self) -> Path:
        return self.root / SHARDS_DIR

    def families(self) -> dict[str, list[str]]:
        """Original id -> the original and its copies (sorted ids)."""
        out: dict[str, list[str]] = {}
        for doc, meta in self.info.items():
            if meta["family"] is not None:
                out.setdefault(meta["family"], []).append(doc)
        return {k: sorted(v) for k, v in sorted(out.items())}

    def planted_pairs(self) -> list[tuple[str, str, str, float]]:
        """(original id, copy id, edit, strength) of every planted copy."""
        return sorted((m["family"], doc, m["edit"], m["strength"]) for doc, m in self.info.items()
                      if m["family"] is not None and m["family"] != doc)


def _doc_id(seed: int, source: str, copy: int) -> str:
    return f"d{xxhash.xxh64_hexdigest(f'{seed}|{source}|{copy}')}"


def planted_set(pages: list[dict], out: Path, *, originals: int = 200, copies: int = 4, seed: int = 0,
                shards: int = 4, min_words: int = 50, max_words: int = 5000) -> PlantedSet:
    """Write a planted set built from ``pages`` (``{"id", "text", "url"}``) to ``out`` and return it.

    Every page with at least ``min_words`` words is a document; ``originals`` of those with at most ``max_words``
    words (drawn by ``seed``) each get ``copies`` edited copies. Deterministic in (pages, arguments)."""
    out = Path(out)
    pages = sorted((p for p in pages if len(p["text"].split()) >= min_words), key=lambda p: p["id"])
    if len(pages) < 2:
        raise ValueError(f"need at least 2 pages of {min_words}+ words to plant copies, got {len(pages)}")
    eligible = [i for i, p in enumerate(pages) if len(p["text"].split()) <= max_words]
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(eligible), size=min(originals, len(eligible)), replace=False).tolist())
    chosen_pages = [eligible[i] for i in chosen]
    docs: list[dict] = []
    info: dict[str, dict] = {}
    for page in pages:
        doc = _doc_id(seed, page["id"], 0)
        docs.append({"id": doc, "text": page["text"], "url": page.get("url")})
        info[doc] = {"family": None, "edit": "original", "strength": 0.0, "source": page["id"]}
    for k, index in enumerate(chosen_pages):
        page = pages[index]
        family = _doc_id(seed, page["id"], 0)
        info[family]["family"] = family
        for c in range(copies):
            kind, strength = VARIANTS[(k * copies + c) % len(VARIANTS)]
            copy_rng = np.random.default_rng([seed, k, c])
            donor_index = int(copy_rng.integers(len(pages) - 1))
            donor = pages[donor_index + (donor_index >= index)]["text"]
            doc = _doc_id(seed, page["id"], c + 1)
            docs.append({"id": doc, "text": edit(page["text"], kind, strength, donor, copy_rng),
                         "url": page.get("url")})
            info[doc] = {"family": family, "edit": kind, "strength": strength, "source": page["id"]}
    if len(info) != len(docs):
        raise RuntimeError("planted ids collided; choose another seed")
    order = np.random.default_rng([seed, 1 << 20]).permutation(len(docs))
    shard_dir = out / SHARDS_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    for old in shard_dir.glob("planted-*.jsonl"):
        old.unlink()
    for s, part in enumerate(np.array_split(order, shards)):
        with open(shard_dir / f"planted-{s:05d}.jsonl", "w", encoding="utf-8") as handle:
            for i in part:
                handle.write(json.dumps(docs[i], ensure_ascii=False) + "\n")
    params = {"originals": len(chosen_pages), "copies": copies, "seed": seed, "shards": shards,
              "min_words": min_words, "max_words": max_words, "pages": len(pages), "documents": len(docs)}
    write_json_atomic(out / MANIFEST, {"params": params, "variants": VARIANTS, "documents": info})
    return PlantedSet(out, {d["id"]: d["text"] for d in docs}, info, params)


def load_planted(root: Path) -> PlantedSet:
    """A planted set written by :func:`planted_set`, read back from its shards and manifest."""
    root = Path(root)
    manifest = json.loads((root / MANIFEST).read_text())
    texts = {}
    for shard in sorted((root / SHARDS_DIR).glob("planted-*.jsonl")):
        with open(shard, encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                texts[row["id"]] = row["text"]
    return PlantedSet(root, texts, manifest["documents"], manifest["params"])


# --- exact Jaccard -----------------------------------------------------------------------------------------------


def shingle_sets(texts: list[str], ngram: int, batch: int = 512) -> list[np.ndarray]:
    """Each text's set of shingle hashes (sorted, unique uint64), as ``dedup.shingle_hashes`` makes them."""
    out: list[np.ndarray] = []
    for start in range(0, len(texts), batch):
        hashes, offsets = shingle_hashes(pa.array(texts[start:start + batch], pa.large_string()), ngram)
        out.extend(np.unique(hashes[offsets[i]:offsets[i + 1]]) for i in range(len(offsets) - 1))
    return out


def jaccard_of(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique arrays (0 when either is empty, as ``exact_jaccard``)."""
    if a.size == 0 or b.size == 0:
        return 0.0
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


@dataclass
class Truth:
    """Exact-Jaccard ground truth of a document set: every pair (i < j, by id order) with ``J >= threshold``."""

    ids: list[str]
    sets: list[np.ndarray]
    threshold: float
    ngram: int
    pairs: dict[tuple[str, str], float]
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {d: i for i, d in enumerate(self.ids)}

    def jaccard(self, a: str, b: str) -> float:
        """Exact Jaccard of any two documents of the set."""
        return jaccard_of(self.sets[self.index[a]], self.sets[self.index[b]])


def exact_truth(docs: Mapping[str, str], threshold: float = 0.7, ngram: int = 5, block: int = 256) -> Truth:
    """Every pair of ``docs`` with exact Jaccard ``>= threshold``: intersections of all pairs at once, as the
    product of the binary document x shingle matrix with its transpose, ``block`` rows at a time."""
    from scipy import sparse

    ids = sorted(docs)
    sets = shingle_sets([docs[i] for i in ids], ngram)
    sizes = np.array([s.size for s in sets], dtype=np.int64)
    pairs: dict[tuple[str, str], float] = {}
    if sizes.sum() == 0:
        return Truth(ids, sets, threshold, ngram, pairs)
    _, cols = np.unique(np.concatenate(sets), return_inverse=True)
    rows = np.repeat(np.arange(len(ids)), sizes)
    matrix = sparse.csr_matrix((np.ones(rows.size, dtype=np.int32), (rows, cols.reshape(-1))),
                               shape=(len(ids), int(cols.max()) + 1))
    transposed = matrix.T.tocsc()
    for start in range(0, len(ids), block):
        inter = (matrix[start:start + block] @ transposed).tocoo()
        i, j, n = inter.row + start, inter.col, inter.data.astype(np.int64)
        upper = j > i
        i, j, n = i[upper], j[upper], n[upper]
        jac = n / (sizes[i] + sizes[j] - n)
        hit = jac >= threshold
        for a, b, value in zip(i[hit].tolist(), j[hit].tolist(), jac[hit].tolist()):
            pairs[(ids[a], ids[b])] = value
    return Truth(ids, sets, threshold, ngram, pairs)


# --- predicted clusters ------------------------------------------------------------------------------------------


def run_clusters(output: Path, stages: Iterable[str] | None = None) -> dict[str, str]:
    """``{id: cluster}`` of a phi3data run: every ``duplicate`` finding links the dropped document to the kept
    one it was dropped for; chains across stages (exact, then MinHash) are joined (union-find). Documents in no
    cluster are absent."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    wanted = set(stages) if stages is not None else None
    for path in sorted((Path(output) / "findings").glob("*.parquet")):
        table = pq.read_table(path, columns=["id", "stage", "kind", "detail"])
        table = table.filter(pc.equal(table.column("kind"), "duplicate"))
        for doc, stage, detail in zip(*(table.column(c).to_pylist() for c in ("id", "stage", "detail"))):
            if wanted is not None and stage not in wanted:
                continue
            a, b = root(doc), root(json.loads(detail)["cluster"])
            if a != b:
                parent[max(a, b)] = min(a, b)
            parent.setdefault(min(a, b), min(a, b))
    return {doc: root(doc) for doc in parent}


def run_removed(output: Path) -> set[str]:
    """Ids a phi3data run dropped as duplicates (its ``duplicate`` findings)."""
    removed: set[str] = set()
    for path in sorted((Path(output) / "findings").glob("*.parquet")):
        table = pq.read_table(path, columns=["id", "kind"])
        removed.update(table.filter(pc.equal(table.column("kind"), "duplicate")).column("id").to_pylist())
    return removed


def cluster_pairs(clusters: Mapping[str, Hashable]) -> set[tuple[str, str]]:
    """Every pair (a < b) of documents that share a cluster label."""
    members: dict[Hashable, list[str]] = {}
    for doc, label in clusters.items():
        members.setdefault(label, []).append(doc)
    pairs: set[tuple[str, str]] = set()
    for group in members.values():
        pairs.update(itertools.combinations(sorted(group), 2))
    return pairs


# --- precision and recall ----------------------------------------------------------------------------------------


def _scores(truth: set, predicted: set) -> dict:
    hits = len(truth & predicted)
    return {"truth": len(truth), "predicted": len(predicted), "true_positives": hits,
            "precision": round(hits / len(predicted), 4) if predicted else None,
            "recall": round(hits / len(truth), 4) if truth else None}


def pair_quality(docs: Mapping[str, str] | PlantedSet, clusters: Path | str | Mapping[str, Hashable],
                 threshold: float = 0.7, ngram: int = 5, *, truth: Truth | None = None,
                 info: Mapping[str, dict] | None = None) -> dict:
    """Precision and recall of ``clusters`` against exact Jaccard ``>= threshold`` over word ``ngram`` shingles.

    ``docs``: id -> text, or a :class:`PlantedSet` (then ``info`` defaults to its manifest). ``clusters``: a
    phi3data run's output directory, or ``{id: cluster label}`` (documents absent are alone). ``truth``: a
    precomputed :func:`exact_truth` to reuse across runs. Returns
    ``{"all": ..., "planted": ..., "documents": ..., "by_edit": ...}``: pair scores over every pair of the set
    and over the pairs inside planted families, document scores (in some true pair vs in some cluster), and per
    planted (original, copy) variant how many copies are above the threshold and how many were clustered."""
    if isinstance(docs, PlantedSet):
        info = docs.info if info is None else info
        docs = docs.texts
    if isinstance(clusters, str | Path):
        clusters = run_clusters(Path(clusters))
    clusters = {d: c for d, c in clusters.items() if d in docs}
    if truth is None or truth.threshold != threshold or truth.ngram != ngram:
        truth = exact_truth(docs, threshold, ngram)
    true_pairs = set(truth.pairs)
    predicted = cluster_pairs(clusters)
    result = {"threshold": threshold, "ngram": ngram, "documents_total": len(docs),
              "clusters": len(set(clusters.values())), "all": _scores(true_pairs, predicted)}
    below = [truth.jaccard(a, b) for a, b in predicted - true_pairs]
    result["all"]["false_positive_mean_jaccard"] = round(float(np.mean(below)), 4) if below else None
    in_true = {d for pair in true_pairs for d in pair}
    in_cluster = {d for pair in predicted for d in pair}
    result["documents"] = _scores(in_true, in_cluster)
    if info:
        family = {d: m["family"] for d, m in info.items() if m.get("family") is not None}
        every_family_pair: set[tuple[str, str]] = set()
        members: dict[str, list[str]] = {}
        for d, f in family.items():
            members.setdefault(f, []).append(d)
        for group in members.values():
            every_family_pair.update(itertools.combinations(sorted(group), 2))
        result["planted"] = _scores(true_pairs & every_family_pair, predicted & every_family_pair)
        result["planted"]["family_pairs"] = len(every_family_pair)
        by_edit: dict[str, dict] = {}
        for doc, meta in sorted(info.items()):
            if meta.get("family") in (None, doc):
                continue
            pair = tuple(sorted((doc, meta["family"])))
            jac = truth.pairs.get(pair)
            if jac is None:
                jac = truth.jaccard(*pair)
            row = by_edit.setdefault(f"{meta['edit']} {meta['strength']:g}",
                                     {"copies": 0, "jaccard": [], "above": 0, "clustered": 0, "clustered_above": 0})
            row["copies"] += 1
            row["jaccard"].append(jac)
            row["above"] += jac >= threshold
            row["clustered"] += pair in predicted
            row["clustered_above"] += jac >= threshold and pair in predicted
        for row in by_edit.values():
            values = row.pop("jaccard")
            row["mean_jaccard"] = round(float(np.mean(values)), 4)
            row["recall"] = round(row["clustered_above"] / row["above"], 4) if row["above"] else None
        result["by_edit"] = by_edit
    return result


def removed_agreement(a: set[str], b: set[str]) -> dict:
    """How two runs' removed sets agree: Jaccard of the id sets, and counts in both / only in each."""
    union = a | b
    return {"a": len(a), "b": len(b), "both": len(a & b), "only_a": len(a - b), "only_b": len(b - a),
            "jaccard": round(len(a & b) / len(union), 4) if union else 1.0}
