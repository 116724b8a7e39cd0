"""Deduplication: exact (normalised text, optionally URL), repeated lines across documents, and MinHash-LSH
near-duplicates. All three are keyed global stages (see ``KeyedStage`` and ``phi3data.pipelines.shuffle``):

- a document's key rows come from its normalised text alone, so every engine computes the same ones;
- the representative kept of a group or cluster is the document with the smallest id (string order), so local,
  Ray and Spark keep exactly the same documents whatever the order shards finish in;
- a document with no words (exact, lines) or fewer words than one shingle (MinHash) gets no key: it is never
  matched by accident, and is kept (``short = "keep"``) or dropped under its own reason (``short = "drop"``).

MinHash: word n-gram shingles of the normalised text, each hashed once (xxh64 of the words, combined by a
polynomial), then ``bands x rows`` multiply-shift hash functions; a band's rows hash to one 64-bit bucket key.
Documents sharing a bucket in any band are candidates; candidate pairs are linked to their group's smallest
document and the clusters are the connected components. Every run samples candidate pairs and non-candidate
pairs and reports their exact Jaccard similarity (the audit), so the run's precision and misses are measured.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash
from pydantic import Field

from phi3data.io.writers import write_json_atomic
from phi3data.pipelines.base import KeyedStage, StageOutput, StageParams, register, set_column
from phi3data.pipelines.shuffle import (
    KEYS_SCHEMA,
    SEP,
    ShuffleJob,
    components_distributed,
    components_on_driver,
    document_keys,
    parse_node,
    read_part,
    reduce_groups,
    resolved_rows,
    sha256_file,
    write_parquet_hashed,
)

MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_SHINGLE_MULT = np.uint64(0x9E3779B97F4A7C15)
_PUNCTUATION = r"[\p{P}\p{S}]+"


def normalised_words(texts: pa.Array | pa.ChunkedArray) -> pa.ListArray:
    """Each text as a list of words: lower case, punctuation and symbols removed, split on white space."""
    lowered = pc.utf8_lower(pc.fill_null(texts, ""))
    spaced = pc.utf8_trim_whitespace(pc.replace_substring_regex(lowered, _PUNCTUATION, " "))
    # a text with no words splits into [""]: make it an empty list
    words = pc.utf8_split_whitespace(pc.if_else(pc.equal(spaced, ""), pa.scalar(None, spaced.type), spaced))
    words = words.combine_chunks() if isinstance(words, pa.ChunkedArray) else words
    return pc.fill_null(words, pa.scalar([], words.type))


def word_hashes(words: pa.Array) -> np.ndarray:
    """xxh64 of every word (each distinct word of the batch hashed once)."""
    if len(words) == 0:
        return np.zeros(0, dtype=np.uint64)
    encoded = pc.dictionary_encode(words)
    table = np.array([xxhash.xxh64_intdigest(w) for w in encoded.dictionary.to_pylist()], dtype=np.uint64)
    return table[encoded.indices.to_numpy(zero_copy_only=False)]


def _mix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: spreads the bits of combined hashes."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def shingle_hashes(texts: pa.Array | pa.ChunkedArray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every word n-gram of every text, and each text's offsets into them (len + 1).

    A text with fewer than ``ngram`` words has no shingles."""
    words = normalised_words(texts)
    counts = pc.list_value_length(words).to_numpy(zero_copy_only=False).astype(np.int64)
    hashes = word_hashes(words.flatten())
    starts = np.concatenate([[0], np.cumsum(counts)])
    shingles_per_doc = np.maximum(counts - ngram + 1, 0)
    total = hashes.shape[0]
    with np.errstate(over="ignore"):
        combined = np.zeros(max(total - ngram + 1, 0), dtype=np.uint64)
        for t in range(ngram):
            combined = combined * _SHINGLE_MULT + hashes[t:t + combined.shape[0]]
    combined = _mix(combined)
    # positions whose n-gram stays inside its own document
    valid = np.zeros(combined.shape[0], dtype=bool)
    for doc in np.flatnonzero(shingles_per_doc):
        valid[starts[doc]:starts[doc] + shingles_per_doc[doc]] = True
    offsets = np.concatenate([[0], np.cumsum(shingles_per_doc)])
    return combined[valid], offsets


def permutations(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` multiply-shift hash functions (odd multipliers, random addends) from ``seed``."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, np.iinfo(np.int64).max, size=count, dtype=np.int64).astype(np.uint64) | np.uint64(1)
    b = rng.integers(0, np.iinfo(np.int64).max, size=count, dtype=np.int64).astype(np.uint64)
    return a, b


def minhash_signatures(texts: pa.Array | pa.ChunkedArray, ngram: int, num_perm: int, seed: int = 1,
                       chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(signatures, has_shingles): a ``len(texts) x num_perm`` uint32 MinHash signature per text."""
    shingles, offsets = shingle_hashes(texts, ngram)
    docs = len(offsets) - 1
    a, b = permutations(num_perm, seed)
    signatures = np.full((docs, num_perm), np.iinfo(np.uint32).max, dtype=np.uint64)
    doc_of = np.repeat(np.arange(docs), np.diff(offsets))
    buffer = np.empty((chunk, num_perm), dtype=np.uint64)  # reused: the hashing is most of a dedup's time
    shift = np.uint64(32)
    with np.errstate(over="ignore"):
        for start in range(0, shingles.shape[0], chunk):
            block = shingles[start:start + chunk]
            values = buffer[:block.shape[0]]
            np.multiply(block[:, None], a[None, :], out=values)
            values += b
            values >>= shift
            owners = doc_of[start:start + chunk]
            firsts = np.concatenate([[0], np.flatnonzero(np.diff(owners)) + 1])
            rows = owners[firsts]
            signatures[rows] = np.minimum(signatures[rows], np.minimum.reduceat(values, firsts, axis=0))
    return signatures.astype(np.uint32), np.diff(offsets) > 0


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``docs x bands`` uint64 bucket keys: each band's ``rows`` signature values hashed together."""
    keys = np.zeros((signatures.shape[0], bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            acc = np.full(signatures.shape[0], np.uint64(band + 1) * _SHINGLE_MULT, dtype=np.uint64)
            for r in range(rows):
                acc = acc * _SHINGLE_MULT + signatures[:, band * rows + r].astype(np.uint64)
            keys[:, band] = _mix(acc)
    return keys


def exact_jaccard(a: str, b: str, ngram: int) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (the ground truth MinHash estimates)."""
    sa, sb = shingle_sets([a, b], ngram)
    return jaccard(sa, sb)


def shingle_sets(texts: list[str], ngram: int) -> list[np.ndarray]:
    """Each text's distinct shingle hashes (sorted), shingled in one batch."""
    shingles, offsets = shingle_hashes(pa.array(texts, pa.large_string()), ngram)
    return [np.unique(shingles[offsets[i]:offsets[i + 1]]) for i in range(len(texts))]


def jaccard(sa: np.ndarray, sb: np.ndarray) -> float:
    """Jaccard similarity of two sorted arrays of distinct hashes (0 when either is empty)."""
    if not len(sa) or not len(sb):
        return 0.0
    common = len(np.intersect1d(sa, sb, assume_unique=True))
    return common / (len(sa) + len(sb) - common)


def _text_hashes(texts: list[str]) -> np.ndarray:
    return np.array([xxhash.xxh64_intdigest(t) for t in texts], dtype=np.uint64)


# --- the stages -----------------------------------------------------------------------------------------------


class DedupParams(StageParams):
    mode: Literal["keep_one", "drop_all", "annotate"] = "keep_one"
    """keep_one: keep each cluster's smallest id; drop_all: drop every member of a cluster; annotate: keep all
    and add ``<column>`` (the cluster's representative id) and ``<column>_size``."""
    column: str = "dup_cluster"
    short: Literal["keep", "drop"] = "keep"
    """Documents too short to key (no words; for MinHash fewer words than one shingle) are never matched:
    keep them, or drop them under the reason ``too_short``."""
    partitions: int = Field(16, gt=0, le=65536)
    """Key partitions (reduce tasks); changes the work layout, not the result."""
    against: list[str] = []
    """Indexes saved by earlier runs (``<output>/index/<stage name>``): documents matching an earlier one are
    dropped, recording the earlier document's id."""
    save_index: bool = True
    """Save the keys of the documents this run keeps to ``<output>/index/<stage name>``, for later runs."""


class _DedupStage(KeyedStage):
    """What exact and MinHash dedup share: keys -> groups -> clusters -> keep, drop or annotate."""

    params: DedupParams

    def identity(self) -> dict:
        return {"against": {d: _index_digest(Path(d)) for d in self.params.against}} if self.params.against else {}

    def doc_keys(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(keys: docs x bands uint64, keyed: which documents have keys)."""
        raise NotImplementedError

    def keys(self, batch: pa.Table) -> pa.Table:
        keys, keyed = self.doc_keys(batch)
        ids = np.array(batch.column("id").to_pylist(), dtype=object)[keyed]
        keys = keys[keyed]
        bands = keys.shape[1]
        return pa.table({"band": pa.array(np.tile(np.arange(bands, dtype=np.int16), len(ids)), pa.int16()),
                         "key": pa.array(keys.reshape(-1), pa.uint64()),
                         "id": pa.array(np.repeat(ids, bands).tolist(), pa.string())})

    def resolve(self, job: ShuffleJob) -> dict:
        p = self.params
        index_files = [str(f) for d in p.against for f in _index_files(Path(d), self)]
        keys_files = [str(f) for f in job.keys_files]
        edges_dir = job.work / "edges"
        reduced = job.run("reduce", functools.partial(reduce_groups, keys_files, index_files, str(edges_dir),
                                                      p.partitions),
                          [{"task": f"p{q:05d}", "part": q} for q in range(p.partitions)])
        edge_files = {f: sha for r in reduced for f, sha in r["files"].items()}
        links = sum(r["links"] for r in reduced)
        method = self.components_method(links)
        rounds = 0
        if method == "driver":
            clusters = components_on_driver(list(edge_files))
        else:
            clusters, rounds = components_distributed(job, edge_files, p.partitions)
        resolved = resolved_rows(clusters)
        resolved_path = job.work / "resolved.parquet"
        files = {job.relative(resolved_path): write_parquet_hashed(resolved, resolved_path, row_group_size=65536)}
        duplicates = _dropped_mask(resolved, p.mode)
        decision = {
            "documents_keyed": _keyed_documents(keys_files),
            "candidate_groups": sum(r["groups"] for r in reduced),
            "links": links,
            "components": method,
            "rounds": rounds,
            "clusters": int(pc.count_distinct(resolved.column("cluster")).as_py()) if resolved.num_rows else 0,
            "in_clusters": resolved.num_rows,
            "to_drop": int(duplicates.sum()),
            "matched_earlier": int(np.asarray(resolved.column("earlier").to_pylist(), dtype=bool).sum()),
            "resolved": files,
        }
        decision.update(self.audit(job, resolved))
        if p.save_index:
            decision["index"] = self.save_index(job, resolved)
        return decision

    def components_method(self, links: int) -> str:
        return "driver"

    def audit(self, job: ShuffleJob, resolved: pa.Table) -> dict:
        return {}

    def save_index(self, job: ShuffleJob, resolved: pa.Table) -> str:
        """The keys of the documents this run keeps, as an index a later run dedups against."""
        out = job.output / "index" / self.name
        dropped = set(zip(resolved.column("shard").to_pylist(), resolved.column("id").to_pylist(),
                          _dropped_mask(resolved, self.params.mode).tolist()))
        dropped = {(s, i) for s, i, d in dropped if d}
        files = {}
        for stem, keys_file in zip(job.stems, job.keys_files):
            table = pq.read_table(keys_file)
            nodes = table.column("node").to_pylist()
            keep, renamed = [], []
            for node in nodes:
                _, doc, shard = parse_node(node)
                keep.append((shard, doc) not in dropped)
                renamed.append(f"0{doc}{SEP}")
            table = table.set_column(3, "node", pa.array(renamed, pa.string())).filter(pa.array(keep))
            path = out / f"{stem}.parquet"
            files[path.name] = write_parquet_hashed(table, path)
        write_json_atomic(out / INDEX_META, {"stage": self.type_name, "params": self.params.model_dump(mode="json"),
                                      "files": files})
        return job.relative(out)

    def apply_resolved(self, batch: pa.Table, decision: dict, resolved: pa.Table) -> StageOutput:
        p = self.params
        clusters = dict(zip(resolved.column("id").to_pylist(),
                            zip(resolved.column("cluster").to_pylist(), resolved.column("size").to_pylist(),
                                resolved.column("earlier").to_pylist())))
        ids = batch.column("id").to_pylist()
        drops: Counter = Counter()
        findings = []
        keep = []
        _, keyed = self.doc_keys(batch) if p.short == "drop" else (None, None)
        for row, doc in enumerate(ids):
            entry = clusters.get(doc)
            if keyed is not None and not keyed[row]:
                keep.append(False)
                drops[f"{self.name}:too_short"] += 1
                continue
            if entry is None or p.mode == "annotate":
                keep.append(True)
                continue
            cluster, size, earlier = entry
            drop = p.mode == "drop_all" or earlier or cluster != doc
            keep.append(not drop)
            if drop:
                reason = "matches_earlier" if earlier else "duplicate"
                drops[f"{self.name}:{reason}"] += 1
                findings.append({"id": doc, "kind": reason, "cluster": cluster, "size": size})
        if p.mode == "annotate":
            reps = [clusters.get(doc, (doc, 1, False)) for doc in ids]
            batch = set_column(batch, p.column, pa.array([r[0] for r in reps], pa.string()))
            batch = set_column(batch, f"{p.column}_size", pa.array([r[1] for r in reps], pa.int64()))
        if drops:
            batch = batch.filter(pa.array(keep, pa.bool_()))
        return StageOutput(batch, drops, findings=findings)


def _dropped_mask(resolved: pa.Table, mode: str) -> np.ndarray:
    if mode == "annotate" or resolved.num_rows == 0:
        return np.zeros(resolved.num_rows, dtype=bool)
    earlier = np.asarray(resolved.column("earlier").to_pylist(), dtype=bool)
    if mode == "drop_all":
        return np.ones(resolved.num_rows, dtype=bool)
    ids = np.asarray(resolved.column("id").to_pylist(), dtype=object)
    reps = np.asarray(resolved.column("cluster").to_pylist(), dtype=object)
    return earlier | (ids != reps)


def _keyed_documents(keys_files: list[str]) -> int:
    return sum(pq.read_table(f, columns=["band"], filters=[("band", "=", 0)]).num_rows for f in keys_files)


INDEX_META = "index.json"


def _index_files(directory: Path, stage: KeyedStage) -> list[Path]:
    """An earlier run's saved index, checked to be keyed the same way as this stage."""
    meta_path = directory / INDEX_META
    if not meta_path.exists():
        raise ValueError(f"{stage.name}: {directory} is not a dedup index (no {INDEX_META}); pass "
                         f"<earlier output>/index/<stage name>")
    meta = json.loads(meta_path.read_text())
    mine = stage.params.model_dump(mode="json")
    keying = ("ngram", "bands", "rows", "seed", "with_url", "partitions")
    differ = [k for k in keying if meta["params"].get(k) != mine.get(k)]
    if meta["stage"] != stage.type_name or differ:
        raise ValueError(f"{stage.name}: the index {directory} was keyed by {meta['stage']} with other settings "
                         f"({', '.join(differ) or 'stage type'}); dedup against it with the same ones")
    return [directory / name for name in sorted(meta["files"])]


def _index_digest(directory: Path) -> str:
    meta = directory / INDEX_META
    if not meta.exists():
        raise ValueError(f"{directory} is not a dedup index (no {INDEX_META}); pass <earlier output>/index/<stage>")
    return sha256_file(meta)


class ExactDedupParams(DedupParams):
    with_url: bool = False
    """Key on the URL and the text together (the same text at two URLs is then kept twice)."""


@register
class ExactDedup(_DedupStage):
    """Documents whose normalised text (optionally with the URL) is identical: one kept, the smallest id."""

    type_name = "exact_dedup"
    Params = ExactDedupParams
    params: ExactDedupParams

    def doc_keys(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        words = normalised_words(batch.column("text"))
        keyed = pc.list_value_length(words).to_numpy(zero_copy_only=False) > 0
        joined = pc.binary_join(words, pa.scalar(" ", words.type.value_type)).to_pylist()
        if self.params.with_url:
            urls = pc.fill_null(batch.column("url"), "").to_pylist()
            joined = [f"{u}\n{t}" for u, t in zip(urls, joined)]
        return _text_hashes(joined)[:, None], keyed


class MinHashParams(DedupParams):
    ngram: int = Field(5, gt=0)
    """Words per shingle."""
    bands: int = Field(14, gt=0)
    rows: int = Field(8, gt=0)
    """bands x rows hash functions; two documents become candidates when all rows of one band agree. The
    default, datatrove's 14 x 8, makes documents with Jaccard 0.685 candidates half the time (0.72: 65%)."""
    seed: int = 1
    threshold: float = Field(0.7, gt=0, le=1)
    """The Jaccard similarity the audit measures against (what counts as a true near-duplicate)."""
    audit_pairs: int = Field(200, ge=0)
    """Candidate pairs and non-candidate pairs sampled for the exact-Jaccard audit in each run's stats."""
    components: Literal["auto", "driver", "distributed"] = "auto"
    """Where connected components are found: the driver (all edges in memory), the engine (large-star /
    small-star rounds of tasks), or auto: the driver up to ``driver_max_links`` links."""
    driver_max_links: int = Field(20_000_000, gt=0)


@register
class MinHashDedup(_DedupStage):
    """Near-duplicates by MinHash-LSH: one kept per cluster (the smallest id), with an exact-Jaccard audit."""

    type_name = "minhash_dedup"
    Params = MinHashParams
    params: MinHashParams

    def doc_keys(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        signatures, keyed = minhash_signatures(batch.column("text"), p.ngram, p.bands * p.rows, p.seed)
        return band_keys(signatures, p.bands, p.rows), keyed

    def components_method(self, links: int) -> str:
        if self.params.components != "auto":
            return self.params.components
        return "driver" if links <= self.params.driver_max_links else "distributed"

    def audit(self, job: ShuffleJob, resolved: pa.Table) -> dict:
        """Exact Jaccard of sampled candidate pairs (member, representative) and of sampled non-candidates."""
        p = self.params
        if p.audit_pairs == 0:
            return {}
        own = resolved.filter(pc.and_(pc.invert(resolved.column("earlier")),
                                      pc.not_equal(resolved.column("id"), resolved.column("cluster"))))
        members = sorted(zip(own.column("id").to_pylist(), own.column("shard").to_pylist(),
                             own.column("cluster").to_pylist()), key=lambda r: xxhash.xxh64_intdigest(r[0]))
        candidate_pairs = [(m[0], m[2]) for m in members[:p.audit_pairs]]
        clustered = dict(zip(resolved.column("id").to_pylist(), resolved.column("cluster").to_pylist()))
        every = []
        for keys_file in job.keys_files:
            nodes = pq.read_table(keys_file, columns=["node"], filters=[("band", "=", 0)]).column("node")
            every.extend(parse_node(n)[1] for n in nodes.to_pylist())
        every.sort(key=xxhash.xxh64_intdigest)
        others = []
        for a, b in zip(every[0::2], every[1::2]):
            if len(others) >= p.audit_pairs:
                break
            if clustered.get(a, a) != clustered.get(b, b):
                others.append((a, b))
        needed = {d for pair in candidate_pairs + others for d in pair}
        texts = _texts_of(job, needed)
        order = sorted(texts)
        sets = dict(zip(order, shingle_sets([texts[d] for d in order], p.ngram)))
        cand = [jaccard(sets[a], sets[b]) for a, b in candidate_pairs if a in sets and b in sets]
        non = [jaccard(sets[a], sets[b]) for a, b in others if a in sets and b in sets]
        audit = {"threshold": p.threshold, "candidate_pairs": len(cand), "non_candidate_pairs": len(non)}
        if cand:
            audit["candidate_precision"] = round(sum(j >= p.threshold for j in cand) / len(cand), 4)
            audit["candidate_mean_jaccard"] = round(float(np.mean(cand)), 4)
        if non:
            audit["non_candidate_above_threshold"] = sum(j >= p.threshold for j in non)
            audit["non_candidate_max_jaccard"] = round(float(max(non)), 4)
        return {"audit": audit}


def _texts_of(job: ShuffleJob, ids: set[str]) -> dict[str, str]:
    texts = {}
    if not ids:
        return texts
    wanted = pa.array(sorted(ids), pa.string())
    for path in job.data_files.values():
        table = pq.read_table(path, columns=["id", "text"], filters=pc.is_in(pc.field("id"), wanted))
        texts.update(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))
    return texts


# --- repeated lines ------------------------------------------------------------------------------------------


class LineDedupParams(StageParams):
    min_chars: int = Field(10, ge=1)
    """Lines shorter than this (after normalising) are never treated as repeated."""
    min_documents: int = Field(2, ge=2)
    """A line counts as repeated when at least this many documents hold it."""
    partitions: int = Field(16, gt=0, le=65536)
    drop_empty: bool = True
    """Drop a document left without text once its repeated lines are removed (reason ``emptied``)."""


@register
class LineDedup(KeyedStage):
    """Lines repeated across documents (boilerplate): each kept only in the document with the smallest id."""

    type_name = "line_dedup"
    Params = LineDedupParams
    params: LineDedupParams

    def line_keys(self, text: str) -> list[tuple[int, str]]:
        """(key, line) of every line long enough to count, in order."""
        out = []
        for line in (text or "").split("\n"):
            norm = " ".join(line.lower().split())
            out.append((xxhash.xxh64_intdigest(norm) if len(norm) >= self.params.min_chars else 0, line))
        return out

    def keys(self, batch: pa.Table) -> pa.Table:
        return document_keys(batch.column("id").to_pylist(),
                             [(k for k, _ in self.line_keys(text) if k) for text in batch.column("text").to_pylist()])

    def resolve(self, job: ShuffleJob) -> dict:
        p = self.params
        items = [{"task": f"p{q:05d}", "part": q} for q in range(p.partitions)]
        results = job.run("lines", functools.partial(_repeated_lines, [str(f) for f in job.keys_files],
                                                     str(job.work / "lines"), p.min_documents), items)
        return {"repeated_lines": sum(r["repeated"] for r in results),
                "removals": sum(r["removals"] for r in results),
                "resolved": {job.relative(Path(f)): sha for r in results for f, sha in r["files"].items()}}

    def apply_resolved(self, batch: pa.Table, decision: dict, resolved: pa.Table) -> StageOutput:
        remove: dict[str, set[int]] = {}
        for doc, key in zip(resolved.column("id").to_pylist(), resolved.column("key").to_pylist()):
            remove.setdefault(doc, set()).add(key)
        texts = batch.column("text").to_pylist()
        new_texts, keep = [], []
        drops: Counter = Counter()
        for doc, text in zip(batch.column("id").to_pylist(), texts):
            gone = remove.get(doc)
            if gone:
                text = "\n".join(line for key, line in self.line_keys(text) if key not in gone)
            new_texts.append(text)
            emptied = bool(gone) and not text.strip()
            keep.append(not (emptied and self.params.drop_empty))
            if emptied and self.params.drop_empty:
                drops[f"{self.name}:emptied"] += 1
        batch = set_column(batch, "text", pa.array(new_texts, pa.large_string()))
        return StageOutput(batch.filter(pa.array(keep, pa.bool_())) if drops else batch, drops)


LINE_REMOVALS_SCHEMA = pa.schema([pa.field("shard", pa.string()), pa.field("id", pa.string()),
                                  pa.field("key", pa.uint64())])


def _repeated_lines(keys_files: list[str], out: str, min_documents: int, item: dict) -> dict:
    """One key partition: lines held by ``min_documents`` or more documents; every holder but the smallest-id
    one loses the line. Writes (shard, id, key) removals sorted by shard."""
    part = item["part"]
    table = read_part(keys_files, part, ["key", "node"], KEYS_SCHEMA)
    groups = table.group_by("key").aggregate([("node", "min"), ("node", "count_distinct")])
    groups = groups.filter(pc.greater_equal(groups.column("node_count_distinct"), min_documents))
    members = table.join(groups.select(["key", "node_min"]), "key", join_type="inner")
    members = members.filter(pc.not_equal(members.column("node"), members.column("node_min")))
    parsed = [parse_node(n) for n in members.column("node").to_pylist()]
    removals = pa.table({"shard": [s for _, _, s in parsed], "id": [d for _, d, _ in parsed],
                         "key": members.column("key")}, schema=LINE_REMOVALS_SCHEMA)
    removals = removals.sort_by([("shard", "ascending"), ("id", "ascending"), ("key", "ascending")])
    path = Path(out) / f"{item['task']}.parquet"
    return {"task": item["task"], "files": {str(path): write_parquet_hashed(removals, path, row_group_size=65536)},
            "repeated": groups.num_rows, "removals": removals.num_rows}


