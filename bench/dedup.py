"""MinHash near-dedup: datatrove's 4-stage MinHash vs phi3data's ``minhash_dedup``, same documents, same cores.

One run, in this order:
  0. the documents: real pages (the shared WARC sample extracted by our pipeline) plus planted near-duplicate
     copies (``phi3data.evaluation.dedup_quality.planted_set``), written as JSONL shards both tools read; the
     exact-Jaccard truth over every pair (not timed);
  1. datatrove 0.10.1: JsonlReader -> MinhashDedupSignature | MinhashDedupBuckets | MinhashDedupCluster |
     JsonlReader -> MinhashDedupFilter -> JsonlWriter, each on ``LocalPipelineExecutor`` (one task per shard,
     14 bucket tasks, 1 cluster task), 14 bands x 8 hashes over word 5-grams, 64-bit hashes (its default);
  2. phi3data: a recipe with one ``minhash_dedup`` stage (14 x 8, 5-grams, defaults otherwise, audit included),
     local engine; steps 1 and 2 alternate for ``--repeats`` rounds and the median time is reported;
  3. signatures alone, one process, one thread, on the same texts: phi3data ``minhash_signatures`` (256-document
     batches, as a pipeline batch), rensa ``RMinHash`` (batch digest matrix; from shingle strings, and from our
     own shingle hashes), datasketch ``MinHash.update_batch`` (+ ``LeanMinHash``), datatrove's own
     ``get_shingles`` + ``get_signature``.

Prints docs/s and the ratios, the agreement of the removed sets and of the clusters, precision and recall of
both against exact Jaccard (``pair_quality``), and the per-document sizes of phi3data's shuffle files (for the
sizing note in docs/benchmarks.md).

    python -m bench.dedup [--input ../shared/data/web/warc] [--originals 1000] [--copies 4] [--workers 2]
                          [--shards 8] [--repeats 2] [--sig-docs 2000] [--components-links N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # rensa: one thread, as each other signature reference

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = ROOT.parent / "shared" / "data" / "web" / "warc"
NGRAM, BANDS, ROWS, THRESHOLD = 5, 14, 8, 0.7


# --- the two dedup runs ------------------------------------------------------------------------------------------


def run_datatrove(shards: Path, out: Path, workers: int) -> tuple[float, dict[str, int], set[str]]:
    """datatrove's four MinHash stages; (seconds, {id: cluster id} of clustered documents, removed ids)."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    files = len(list(shards.glob("*.jsonl")))
    config = MinhashConfig(n_grams=NGRAM, num_buckets=BANDS, hashes_per_bucket=ROWS)
    logs = out / "logs"
    stages = [
        ([JsonlReader(str(shards), glob_pattern="*.jsonl"),
          MinhashDedupSignature(output_folder=str(out / "signatures"), config=config)], files, workers),
        ([MinhashDedupBuckets(input_folder=str(out / "signatures"), output_folder=str(out / "buckets"),
                              config=config)], BANDS, workers),
        ([MinhashDedupCluster(input_folder=str(out / "buckets"), output_folder=str(out / "remove_ids"),
                              config=config, save_cluster_id=True)], 1, 1),
        ([JsonlReader(str(shards), glob_pattern="*.jsonl"),
          MinhashDedupFilter(input_folder=str(out / "remove_ids"), load_cluster_ids=True,
                             exclusion_writer=JsonlWriter(str(out / "removed"))),
          JsonlWriter(str(out / "kept"))], files, workers),
    ]
    started = time.perf_counter()
    for number, (pipeline, tasks, n_workers) in enumerate(stages, 1):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=n_workers, skip_completed=False,
                              logging_dir=str(logs / f"stage{number}")).run()
    seconds = time.perf_counter() - started
    clusters: dict[str, int] = {}
    removed: set[str] = set()
    for side in ("kept", "removed"):
        for path in sorted((out / side).glob("*.jsonl.gz")):
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                for line in handle:
                    row = json.loads(line)
                    cluster = row.get("metadata", {}).get("minhash_cluster_id", -1)
                    if cluster != -1:
                        clusters[row["id"]] = cluster
                    if side == "removed":
                        removed.add(row["id"])
    return seconds, clusters, removed


def run_phi3data(shards: Path, out: Path, workers: int) -> tuple[float, dict]:
    """phi3data's ``minhash_dedup`` as a recipe on the local engine; (seconds, run stats)."""
    from phi3data.pipelines.recipe import load_recipe
    from phi3data.pipelines.runner import run_pipeline

    recipe = load_recipe({"pipeline": {"name": "bench-minhash"},
                          "stage": [{"type": "minhash_dedup", "ngram": NGRAM, "bands": BANDS, "rows": ROWS,
                                     "threshold": THRESHOLD}]})
    started = time.perf_counter()
    summary = run_pipeline(recipe, shards, out, engine="local", workers=workers, progress=False)
    return time.perf_counter() - started, summary.stats


def shuffle_sizes(out: Path, documents: int) -> dict[str, float]:
    """Bytes per document of phi3data's shuffle files: key rows, edges, resolved clusters, saved index."""
    def total(pattern: str) -> int:
        return sum(p.stat().st_size for p in out.glob(pattern) if p.is_file())

    keys = pq_rows(out.glob("_segments/0/keys/*.parquet"))
    return {"keys_bytes_per_doc": total("_segments/0/keys/*.parquet") / documents,
            "key_rows_per_doc": keys / documents,
            "edges_bytes_per_doc": total("_segments/0/shuffle/*/edges/*/*.parquet") / documents,
            "resolved_bytes_per_doc": total("_segments/0/shuffle/*/resolved.parquet") / documents,
            "index_bytes_per_doc": total("index/*/*.parquet") / documents}


def smallest_id_removed(clusters: dict[str, int]) -> set[str]:
    """Every clustered document but the smallest id of its cluster."""
    members: dict[int, list[str]] = {}
    for doc, cluster in clusters.items():
        members.setdefault(cluster, []).append(doc)
    return {doc for group in members.values() for doc in sorted(group)[1:]}


def components_memory(links: int) -> dict:
    """Peak memory and time of ``components_on_driver`` over ``links`` synthetic links (a random recursive tree:
    each new node linked to a random earlier one; node names as long as the planted set's). One process writes
    the edges, a fresh one finds the components and reports its peak RSS above what it had before."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "edges.parquet")
        subprocess.run([sys.executable, "-c", WRITE_EDGES, path, str(links)], cwd=ROOT, check=True)
        out = subprocess.run([sys.executable, "-c", RUN_COMPONENTS, path], capture_output=True, text=True,
                             cwd=ROOT, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["bytes_per_link"] = result["peak_mb_above_start"] * 2**20 / links
    return result


WRITE_EDGES = """
import sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from phi3data.pipelines.shuffle import EDGE_SCHEMA
path, links = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
names = np.array([f"1d{x:016x}\x1fplanted-00000.jsonl-a746854673-df725c1b9a"
                  for x in rng.integers(0, 2**63, links + 1).tolist()], dtype=object)
src, dst = rng.integers(0, np.arange(1, links + 1)), np.arange(1, links + 1)
a, b = pa.array(names[src].tolist(), pa.string()), pa.array(names[dst].tolist(), pa.string())
pq.write_table(pa.table({"src": pa.concat_arrays([a, b]), "dst": pa.concat_arrays([b, a])}, schema=EDGE_SCHEMA), path)
"""

RUN_COMPONENTS = """
import json, resource, sys, time
from phi3data.pipelines.shuffle import components_on_driver
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
clusters = components_on_driver([sys.argv[1]])
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"links": (clusters.num_rows - 1), "nodes": clusters.num_rows, "seconds": seconds,
                  "peak_mb_above_start": (peak - base) / 1024}))
"""


def pq_rows(paths) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)


# --- signatures alone --------------------------------------------------------------------------------------------

_PUNCT = re.compile(r"[^\w\s]+")


def python_shingles(text: str) -> list[str]:
    """Word 5-gram strings of the text, normalised as phi3data does (lower case, punctuation out): what the
    Python references hash."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return [" ".join(words[i:i + NGRAM]) for i in range(len(words) - NGRAM + 1)]


def signature_bench(texts: list[str]) -> list[tuple[str, float, str]]:
    """(name, seconds, what it includes) for each signature implementation on ``texts``, one thread."""
    import numpy as np
    import pyarrow as pa

    from phi3data.pipelines.stages.dedup import minhash_signatures, shingle_hashes

    perms = BANDS * ROWS
    rows: list[tuple[str, float, str]] = []
    batches = [pa.array(texts[i:i + 256], pa.large_string()) for i in range(0, len(texts), 256)]

    started = time.perf_counter()
    for batch in batches:
        minhash_signatures(batch, NGRAM, perms)
    rows.append(("phi3data minhash_signatures", time.perf_counter() - started, "text -> signature"))
    started = time.perf_counter()
    hashed = [shingle_hashes(batch, NGRAM) for batch in batches]
    shingling = time.perf_counter() - started
    rows.append(("  of it: phi3data shingle_hashes", shingling, "text -> shingle hashes"))
    rows.append(("  so: phi3data hashing", rows[0][1] - shingling, "shingle hashes -> signature (difference)"))

    started = time.perf_counter()
    shingles = [python_shingles(t) for t in texts]
    py_shingling = time.perf_counter() - started
    rows.append(("Python shingling (for the references)", py_shingling, "text -> shingle strings"))

    import rensa

    started = time.perf_counter()
    for start in range(0, len(shingles), 256):
        rensa.RMinHash.digest_matrix_from_token_sets(shingles[start:start + 256], num_perm=perms, seed=1)
    rensa_strings = time.perf_counter() - started
    rows.append(("rensa RMinHash (batch matrix)", py_shingling + rensa_strings, "text -> signature"))
    rows.append(("  rensa hashing, from strings", rensa_strings, "shingle strings -> signature"))
    started = time.perf_counter()
    for hashes, offsets in hashed:
        rensa.RMinHash.digest_matrix_from_flat_token_hashes(hashes, offsets.astype(np.uint64), num_perm=perms,
                                                            seed=1)
    rows.append(("  rensa hashing, from our hashes", time.perf_counter() - started, "shingle hashes -> signature"))

    from datasketch import LeanMinHash, MinHash

    encoded = [[s.encode("utf-8") for s in doc] for doc in shingles]
    started = time.perf_counter()
    for doc in encoded:
        sketch = MinHash(num_perm=perms, seed=1)
        sketch.update_batch(doc)
        LeanMinHash(sketch)
    ds = time.perf_counter() - started
    rows.append(("datasketch MinHash.update_batch + Lean", py_shingling + ds, "text -> signature"))
    rows.append(("  datasketch hashing", ds, "shingle bytes -> signature"))

    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature

    step = MinhashDedupSignature(output_folder=tempfile.mkdtemp(prefix="dt-sig-"),
                                 config=MinhashConfig(n_grams=NGRAM, num_buckets=BANDS, hashes_per_bucket=ROWS))
    started = time.perf_counter()
    dt_shingles = [step.get_shingles(t) for t in texts]
    dt_shingling = time.perf_counter() - started
    started = time.perf_counter()
    for sh in dt_shingles:
        if sh.size:
            step.get_signature(sh)
    dt_hashing = time.perf_counter() - started
    rows.append(("datatrove get_shingles + get_signature", dt_shingling + dt_hashing, "text -> signature"))
    rows.append(("  datatrove shingling (spaCy words)", dt_shingling, "text -> shingle hashes"))
    rows.append(("  datatrove hashing", dt_hashing, "shingle hashes -> signature"))
    return rows


# --- main --------------------------------------------------------------------------------------------------------


def main() -> None:
    from phi3data.evaluation import dedup_quality as dq

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--originals", type=int, default=1000, help="pages that get planted copies")
    parser.add_argument("--copies", type=int, default=4, help="planted copies per original")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=8, help="JSONL shards of the planted set")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds of the two dedup runs")
    parser.add_argument("--sig-docs", type=int, default=2000, help="documents for the signature bench (0: all)")
    parser.add_argument("--components-links", type=int, default=0,
                        help="also measure the driver's connected components on this many synthetic links")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp dir)")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="phi3data-bench-dedup-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        pages = dq.real_pages(args.input, work / "pages", workers=args.workers)
        planted = dq.planted_set(pages, work / "planted", originals=args.originals, copies=args.copies,
                                 seed=args.seed, shards=args.shards)
        docs = len(planted.texts)
        words = sum(len(t.split()) for t in planted.texts.values())
        print(f"documents: {docs:,} ({planted.params['pages']:,} real pages, {planted.params['originals']:,} of "
              f"them with {args.copies} planted copies each), {words / 1e6:.1f} M words, {args.shards} JSONL "
              f"shards; built in {time.perf_counter() - started:.1f} s", flush=True)
        started = time.perf_counter()
        truth = dq.exact_truth(planted.texts, THRESHOLD, NGRAM)
        print(f"exact Jaccard >= {THRESHOLD} over all {docs * (docs - 1) // 2:,} pairs: {len(truth.pairs):,} "
              f"pairs ({time.perf_counter() - started:.1f} s)", flush=True)

        dt_times, p3_times = [], []
        for round_no in range(args.repeats):
            order = ["datatrove", "phi3data"] if round_no % 2 == 0 else ["phi3data", "datatrove"]
            for side in order:
                target = work / f"{side}-{round_no}"
                shutil.rmtree(target, ignore_errors=True)
                if side == "datatrove":
                    seconds, dt_clusters, dt_removed = run_datatrove(planted.shards, target, args.workers)
                    dt_times.append(seconds)
                else:
                    seconds, p3_stats = run_phi3data(planted.shards, target, args.workers)
                    p3_times.append(seconds)
                    p3_out = target
                print(f"round {round_no + 1}: {side} {seconds:.1f} s", flush=True)
        p3_clusters, p3_removed = dq.run_clusters(p3_out), dq.run_removed(p3_out)
        dt_s, p3_s = statistics.median(dt_times), statistics.median(p3_times)

        print(f"\n{'dedup run (median of ' + str(args.repeats) + ')':34} {'seconds':>8} {'docs/s':>8} "
              f"{'vs datatrove':>13}   rounds")
        for name, seconds, times in [("datatrove MinHash (4 stages)", dt_s, dt_times),
                                     ("phi3data minhash_dedup", p3_s, p3_times)]:
            print(f"{name:34} {seconds:8.1f} {docs / seconds:8.1f} {dt_s / seconds:12.2f}x   "
                  f"{', '.join(f'{t:.1f}' for t in times)}")

        agreement = dq.removed_agreement(p3_removed, dt_removed)
        pairs_p3, pairs_dt = dq.cluster_pairs(p3_clusters), dq.cluster_pairs(dt_clusters)
        both = len(pairs_p3 & pairs_dt)
        print(f"\nremoved: phi3data {agreement['a']:,}, datatrove {agreement['b']:,}, both {agreement['both']:,}, "
              f"only phi3data {agreement['only_a']:,}, only datatrove {agreement['only_b']:,}, "
              f"Jaccard {agreement['jaccard']:.3f}")
        print(f"same-cluster pairs: phi3data {len(pairs_p3):,}, datatrove {len(pairs_dt):,}, both {both:,}, "
              f"Jaccard {both / max(len(pairs_p3 | pairs_dt), 1):.3f}")
        smallest = dq.removed_agreement(p3_removed, smallest_id_removed(dt_clusters))
        print(f"removed, had datatrove kept each cluster's smallest id as phi3data does (its own choice is its "
              f"union-find root): both {smallest['both']:,}, only phi3data {smallest['only_a']:,}, only datatrove "
              f"{smallest['only_b']:,}, Jaccard {smallest['jaccard']:.3f}")

        print(f"\nquality against exact Jaccard >= {THRESHOLD} (word {NGRAM}-grams)")
        print(f"{'':24} {'pairs P':>8} {'pairs R':>8} {'planted P':>10} {'planted R':>10} {'docs P':>7} "
              f"{'docs R':>7}")
        quality = {}
        for name, clusters in [("datatrove", dt_clusters), ("phi3data", p3_clusters)]:
            q = dq.pair_quality(planted, clusters, THRESHOLD, NGRAM, truth=truth)
            quality[name] = q
            print(f"{name:24} {q['all']['precision']:8.3f} {q['all']['recall']:8.3f} "
                  f"{q['planted']['precision']:10.3f} {q['planted']['recall']:10.3f} "
                  f"{q['documents']['precision']:7.3f} {q['documents']['recall']:7.3f}")
        print(f"truth: {quality['phi3data']['all']['truth']:,} pairs "
              f"({quality['phi3data']['planted']['truth']:,} inside planted families), "
              f"{quality['phi3data']['documents']['truth']:,} documents in a true pair")
        print("\nplanted copies clustered with their original, by edit (above: J >= threshold)")
        print(f"{'edit':18} {'copies':>6} {'mean J':>7} {'above':>6} {'phi3data':>9} {'datatrove':>10}")
        for key in sorted(quality["phi3data"]["by_edit"]):
            p3, dt = quality["phi3data"]["by_edit"][key], quality["datatrove"]["by_edit"][key]
            print(f"{key:18} {p3['copies']:6} {p3['mean_jaccard']:7.3f} {p3['above']:6} "
                  f"{p3['clustered']:4} ({p3['clustered_above']:3}) {dt['clustered']:5} ({dt['clustered_above']:3})")
        decision = p3_stats["decisions"]["minhash_dedup"]
        print(f"\nphi3data's own audit in stats: {json.dumps(decision.get('audit', {}))}")

        sizes = shuffle_sizes(p3_out, decision["documents_keyed"])
        print("phi3data shuffle files per keyed document: " +
              ", ".join(f"{k} {v:.1f}" for k, v in sizes.items()) +
              f"; links {decision['links']:,}, in clusters {decision['in_clusters']:,}")

        texts = list(planted.texts.values())
        if args.sig_docs:
            texts = texts[: args.sig_docs]
        rows = signature_bench(texts)
        base = next(s for n, s, _ in rows if n.startswith("phi3data minhash"))
        print(f"\nsignatures alone, {len(texts):,} documents, one process, one thread, {BANDS * ROWS} hashes")
        print(f"{'implementation':42} {'seconds':>8} {'docs/s':>9} {'phi3data x':>12}  measures")
        for name, seconds, what in rows:
            ratio = f"{seconds / base:11.2f}x" if what == "text -> signature" else ""
            print(f"{name:42} {seconds:8.2f} {len(texts) / seconds:9.0f} {ratio:>12}  {what}")
        print("phi3data x: that implementation's seconds / phi3data's, text to signature (above 1: phi3data faster)")
        if args.components_links:
            cc = components_memory(args.components_links)
            print(f"\ncomponents on the driver, {cc['links']:,} synthetic links (random recursive tree): "
                  f"{cc['seconds']:.1f} s, peak {cc['peak_mb_above_start']:.0f} MB above the start, "
                  f"{cc['bytes_per_link']:.0f} bytes per link")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
