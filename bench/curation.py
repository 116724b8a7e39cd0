"""Curation throughput: datatrove's pipeline vs phi3data's equivalent recipe, same WARC shards, same cores.

Runs, one after the other in one process tree:
  1. datatrove: WarcReader -> Trafilatura -> GopherRepetition -> GopherQuality -> C4Quality -> FineWebQuality
     -> JsonlWriter (LocalPipelineExecutor, one task per shard, N workers)
  2. phi3data, the same filter chain with resiliparse extraction (the default)
  3. phi3data, the same chain with trafilatura extraction: the like-for-like agreement check of kept ids

Prints pages/s of each, the speed ratios, and the overlap of kept document ids.

    python bench/curation.py [--input ../shared/data/web/warc] [--workers 2] [--limit-shards N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = ROOT.parent / "shared" / "data" / "web" / "warc"

FILTERS = [{"type": "gopher_repetition"}, {"type": "gopher_quality"}, {"type": "c4_quality"},
           {"type": "fineweb_quality"}]


def run_datatrove(input_dir: Path, out: Path, workers: int, n_tasks: int) -> tuple[float, set[str]]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.readers import WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    executor = LocalPipelineExecutor(
        pipeline=[WarcReader(str(input_dir), glob_pattern="*.warc.gz"), Trafilatura(), GopherRepetitionFilter(),
                  GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter(), JsonlWriter(str(out / "data"))],
        tasks=n_tasks, workers=workers, logging_dir=str(out / "logs"), skip_completed=False)
    started = time.perf_counter()
    executor.run()
    seconds = time.perf_counter() - started
    ids = set()
    for path in (out / "data").glob("*.jsonl.gz"):
        import gzip

        with gzip.open(path, "rt") as handle:
            ids.update(json.loads(line)["id"] for line in handle)
    return seconds, ids


def run_phi3data(input_dir: Path, out: Path, workers: int, extractor: str) -> tuple[float, set[str], int]:
    import pyarrow.parquet as pq

    from phi3data.pipelines.recipe import load_recipe
    from phi3data.pipelines.runner import run_pipeline

    recipe = load_recipe({"pipeline": {"name": f"bench-{extractor}"},
                          "stage": [{"type": "extract", "extractor": extractor}] + FILTERS})
    started = time.perf_counter()
    summary = run_pipeline(recipe, input_dir, out, engine="local", workers=workers, progress=False)
    seconds = time.perf_counter() - started
    ids = set()
    for shard in (out / "data").glob("*.parquet"):
        ids.update(pq.read_table(shard, columns=["id"]).column("id").to_pylist())
    return seconds, ids, summary.stats["documents_read"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit-shards", type=int, default=0, help="use only the first N shards")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="phi3data-bench-"))
    shards = sorted(args.input.glob("*.warc.gz"))
    if args.limit_shards:
        shards = shards[: args.limit_shards]
    input_dir = work / "input"
    input_dir.mkdir()
    for shard in shards:
        (input_dir / shard.name).symlink_to(shard.resolve())
    try:
        dt_seconds, dt_ids = run_datatrove(input_dir, work / "datatrove", args.workers, len(shards))
        p3_seconds, p3_ids, pages = run_phi3data(input_dir, work / "phi3data", args.workers, "resiliparse")
        p3t_seconds, p3t_ids, _ = run_phi3data(input_dir, work / "phi3data-traf", args.workers, "trafilatura")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def overlap(a: set[str], b: set[str]) -> str:
        both = len(a & b)
        return (f"kept {len(a)} vs {len(b)}, both {both}, Jaccard {both / max(len(a | b), 1):.3f}, "
                f"agreement on all {pages} pages {(pages - len(a ^ b)) / pages:.3f}")

    rows = [("datatrove (trafilatura)", dt_seconds), ("phi3data (resiliparse)", p3_seconds),
            ("phi3data (trafilatura)", p3t_seconds)]
    print(f"\n{pages} pages, {len(shards)} shards, {args.workers} workers")
    print(f"{'pipeline':28} {'seconds':>8} {'pages/s':>8} {'vs datatrove':>13}")
    for name, seconds in rows:
        print(f"{name:28} {seconds:8.1f} {pages / seconds:8.1f} {dt_seconds / seconds:12.2f}x")
    print(f"\nkept-id overlap, same extractor (phi3data-trafilatura vs datatrove): {overlap(p3t_ids, dt_ids)}")
    print(f"kept-id overlap, default extractor (phi3data-resiliparse vs datatrove): {overlap(p3_ids, dt_ids)}")


if __name__ == "__main__":
    main()
