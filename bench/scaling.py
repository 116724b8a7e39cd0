"""How curation and tokenization throughput grow from 1 to N workers on this machine.

Curation: ``phi3data run pipelines/web_quality.toml`` (resiliparse extraction, language ID, the Gopher / C4 /
FineWeb filters) over the shared WARC shards, as a fresh CLI process per run (imports and worker start included),
without the HTML report. Tokenization: ``phi3data tokenize --tokenizer phi3-small`` (cl100k) of that run's output,
in one process with 1..N encoder threads. Each configuration runs ``--repeats`` times; the fastest is kept.

    python -m bench.scaling [--workers 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARC = ROOT.parent / "shared" / "data" / "web" / "warc"


def run_cli(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "phi3data.cli", *args], check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    warc_bytes = sum(p.stat().st_size for p in WARC.glob("*.warc.gz"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = []
        for workers in range(1, args.workers + 1):
            best = float("inf")
            for _ in range(args.repeats):
                out = work / f"run{workers}"
                shutil.rmtree(out, ignore_errors=True)
                best = min(best, run_cli(["run", "pipelines/web_quality.toml", "--input", str(WARC), "--output",
                                          str(out), "--workers", str(workers), "--no-progress", "--no-report"]))
            stats = json.loads((out / "stats.json").read_text())
            pages = stats["documents_read"]
            rows.append(("curation", workers, best, pages, warc_bytes))
        from phi3data.tokenization.runner import tokenize_shard
        from phi3data.tokenization.tokenizers import get_tokenizer

        get_tokenizer("phi3-small")
        source = work / f"run{args.workers}" / "data"
        for threads in range(1, args.workers + 1):
            best, tokens = float("inf"), 0
            for _ in range(args.repeats):
                out = work / f"tok{threads}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                started, tokens = time.perf_counter(), 0
                for i, path in enumerate(sorted(source.glob("*.parquet"))):
                    item = {"path": str(path), "relpath": path.name, "key": str(i), "source": "web",
                            "stem": f"s{i:03d}", "config_hash": "bench", "threads": threads}
                    tokens += tokenize_shard(json.dumps({"tokenizer": "phi3-small"}), str(out), item)["tokens"]
                best = min(best, time.perf_counter() - started)
            rows.append(("tokenize", threads, best, tokens, sum(p.stat().st_size for p in source.glob("*"))))
    print("| work | workers | seconds | throughput | per worker | speedup |")
    print("|---|---:|---:|---:|---:|---:|")
    base = {}
    for kind, n, seconds, count, size in rows:
        base.setdefault(kind, seconds)
        unit = "pages" if kind == "curation" else "tokens"
        print(f"| {kind} | {n} | {seconds:.2f} | {count / seconds:,.0f} {unit}/s ({size / seconds / 1e6:.2f} MB/s in) "
              f"| {count / seconds / n:,.0f} {unit}/s | {base[kind] / seconds:.2f}x |")


if __name__ == "__main__":
    main()
