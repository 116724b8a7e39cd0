"""Curation throughput: datatrove's pipeline vs phi3data's equivalent recipe, same WARC shards, same cores.

Runs, one after the other in one process tree:
  1. end to end, datatrove: WarcReader -> Trafilatura -> GopherRepetition -> GopherQuality -> C4Quality ->
     FineWebQuality -> JsonlWriter (LocalPipelineExecutor, one task per shard, N workers)
  2. end to end, phi3data: the same filter chain with resiliparse extraction (the default)
  3. filters only, like for like: every page extracted once with trafilatura (phi3data's reader), then
     datatrove's four filters and phi3data's four stages on the very same texts, in one process each.

Prints pages/s, the speed ratios, and how far the kept documents agree (overall and per filter). The
end-to-end kept sets differ for reasons outside the filters too: datatrove's WarcReader skips pages whose
WARC-Target-URI is not http(s) (warcio leaves their HTTP headers unparsed) and its extractor times out.

    python -m bench.curation [--input ../shared/data/web/warc] [--workers 2] [--limit-shards N]
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


def _read_and_extract_shard(path: str) -> int:
    """The floor's work for one shard: FastWARC's reader and resiliparse's extraction (phi3data's settings)."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    pages = 0
    with open(path, "rb") as handle:
        for record in ArchiveIterator(handle, record_types=WarcRecordType.response, parse_http=True):
            html = record.reader.read()
            extract_plain_text(bytes_to_str(html, detect_encoding(html)), main_content=True, alt_texts=False,
                               links=False, form_fields=False, noscript=False, comments=False, list_bullets=True)
            pages += 1
    return pages


def read_extract_floor(shards: list[Path], workers: int) -> tuple[float, int]:
    """Reading and extracting the same pages on the same number of processes, nothing else: the floor any
    curation pipeline over these shards stands on (process start included, as for the end-to-end runs)."""
    import multiprocessing as mp

    started = time.perf_counter()
    with mp.get_context("spawn").Pool(workers) as pool:
        # largest first, as phi3data's runner orders them, so neither side loses time to a big last shard
        order = sorted(shards, key=lambda s: -s.stat().st_size)
        pages = sum(pool.map(_read_and_extract_shard, [str(s) for s in order], chunksize=1))
    return time.perf_counter() - started, pages


def run_phi3data_cli(input_dir: Path, out: Path, workers: int) -> float:
    """``phi3data run pipelines/web_quality.toml`` as a user runs it: the installed ``phi3data`` command in a fresh
    process, no HTML report."""
    import subprocess
    import sys

    command = Path(sys.executable).with_name("phi3data")
    started = time.perf_counter()
    subprocess.run([str(command), "run", str(ROOT / "pipelines" / "web_quality.toml"),
                    "--input", str(input_dir), "--output", str(out), "--workers", str(workers), "--no-progress",
                    "--no-report"], check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - started


def extract_all(input_dir: Path, out: Path, workers: int) -> list[tuple[str, str]]:
    """Every page's trafilatura text, via phi3data (no filters)."""
    import pyarrow.parquet as pq

    from phi3data.pipelines.recipe import load_recipe
    from phi3data.pipelines.runner import run_pipeline

    recipe = load_recipe({"pipeline": {"name": "extract-only"},
                          "stage": [{"type": "extract", "extractor": "trafilatura"}]})
    run_pipeline(recipe, input_dir, out, engine="local", workers=workers, progress=False)
    rows = []
    for shard in sorted((out / "data").glob("*.parquet")):
        table = pq.read_table(shard, columns=["id", "text"])
        rows.extend(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))
    return rows


def filters_datatrove(rows: list[tuple[str, str]]) -> tuple[float, dict[str, str | None]]:
    """datatrove's filters on the texts: seconds, and per id the first filter that dropped it (None: kept)."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    chain = [("gopher_repetition", GopherRepetitionFilter()), ("gopher_quality", GopherQualityFilter()),
             ("c4_quality", C4QualityFilter()), ("fineweb_quality", FineWebQualityFilter())]
    verdict: dict[str, str | None] = {}
    started = time.perf_counter()
    for doc_id, text in rows:
        doc = Document(text=text, id=doc_id)
        verdict[doc_id] = None
        for name, block in chain:
            result = block.filter(doc)
            if result is not True and (result is False or not result[0]):
                verdict[doc_id] = name
                break
    return time.perf_counter() - started, verdict


def filters_phi3data(rows: list[tuple[str, str]]) -> tuple[float, dict[str, str | None]]:
    from phi3data.documents import make_batch
    from phi3data.pipelines.recipe import load_recipe

    stages = load_recipe({"pipeline": {"name": "filters"}, "stage": FILTERS}).build_stages()
    verdict: dict[str, str | None] = {doc_id: None for doc_id, _ in rows}
    started = time.perf_counter()
    for start in range(0, len(rows), 256):
        batch = make_batch([{"id": i, "text": t, "source": "bench"} for i, t in rows[start:start + 256]])
        for stage in stages:
            stage.ensure_setup()
            before = set(batch.column("id").to_pylist())
            batch = stage.process(batch).batch
            for doc_id in before - set(batch.column("id").to_pylist()):
                verdict[doc_id] = stage.name
    return time.perf_counter() - started, verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit-shards", type=int, default=0, help="use only the first N shards")
    parser.add_argument("--rounds", type=int, default=3, help="alternating floor / CLI rounds (median kept)")
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
        # the floor and the CLI alternate, and the median round counts, so one noisy second decides nothing
        rounds = []
        for r in range(args.rounds):
            floor_seconds, floor_pages = read_extract_floor(shards, args.workers)
            cli_seconds = run_phi3data_cli(input_dir, work / f"cli{r}", args.workers)
            rounds.append((floor_seconds / cli_seconds, floor_seconds, cli_seconds))
        _, floor_seconds, cli_seconds = sorted(rounds)[len(rounds) // 2]
        dt_seconds, dt_ids = run_datatrove(input_dir, work / "datatrove", args.workers, len(shards))
        p3_seconds, p3_ids, pages = run_phi3data(input_dir, work / "phi3data", args.workers, "resiliparse")
        rows = extract_all(input_dir, work / "extracted", args.workers)
        dtf_seconds, dt_verdict = filters_datatrove(rows)
        p3f_seconds, p3_verdict = filters_phi3data(rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def overlap(a: set[str], b: set[str]) -> str:
        both = len(a & b)
        return (f"kept {len(a)} vs {len(b)}, both {both}, Jaccard {both / max(len(a | b), 1):.3f}, "
                f"agreement on all {pages} pages {(pages - len(a ^ b)) / pages:.3f}")

    print(f"\n{pages} pages, {len(shards)} shards, {args.workers} workers")
    print(f"{'end to end':28} {'seconds':>8} {'pages/s':>8} {'vs datatrove':>13}")
    for name, seconds in [("datatrove (trafilatura)", dt_seconds), ("phi3data (resiliparse)", p3_seconds)]:
        print(f"{name:28} {seconds:8.1f} {pages / seconds:8.1f} {dt_seconds / seconds:12.2f}x")
    print(f"kept ids, end to end: {overlap(p3_ids, dt_ids)}")
    print(f"\nfloor: reading + resiliparse extraction alone, {args.workers} processes: {floor_seconds:.1f} s "
          f"({floor_pages} pages); `phi3data run pipelines/web_quality.toml` (+ language ID, fresh process): "
          f"{cli_seconds:.1f} s = {floor_seconds / cli_seconds:.2f}x of the floor (median of {len(rounds)} rounds: "
          f"{', '.join(f'{r[0]:.2f}' for r in sorted(rounds))}); the recipe above (no language ID, in process): "
          f"{floor_seconds / p3_seconds:.2f}x")

    n = len(rows)
    print(f"\n{'filters only, same texts':28} {'seconds':>8} {'docs/s':>8} {'vs datatrove':>13}")
    for name, seconds in [("datatrove filters", dtf_seconds), ("phi3data filters", p3f_seconds)]:
        print(f"{name:28} {seconds:8.1f} {n / seconds:8.1f} {dtf_seconds / seconds:12.2f}x")
    dt_kept = {i for i, v in dt_verdict.items() if v is None}
    p3_kept = {i for i, v in p3_verdict.items() if v is None}
    same = sum(1 for i in dt_verdict if (dt_verdict[i] is None) == (p3_verdict[i] is None))
    print(f"kept ids, same texts: {len(p3_kept)} vs {len(dt_kept)}, both {len(p3_kept & dt_kept)}, "
          f"same keep/drop decision on {same}/{n} = {same / n:.3f}")
    disagree = {}
    for i in dt_verdict:
        if (dt_verdict[i] is None) != (p3_verdict[i] is None):
            key = f"datatrove {dt_verdict[i] or 'keeps'} / phi3data {p3_verdict[i] or 'keeps'}"
            disagree[key] = disagree.get(key, 0) + 1
    for key, count in sorted(disagree.items(), key=lambda kv: -kv[1]):
        print(f"  disagree: {key}: {count}")


if __name__ == "__main__":
    main()
