"""WARC reading: warcio's ArchiveIterator vs phi3data's streaming reader, same files, one process each.

Two inputs built from the shared sample (``../shared/data/web/warc``):
  1. the shards as they are (one gzip member per record);
  2. all their records gzipped as ONE stream and repeated until the inflated file passes 40 MB (what some tools
     write; phi3data used to reject such a file as one oversized member).

Each reader runs in a fresh subprocess over each input and reads every response record's HTTP body (warcio:
``content_stream().read()``; phi3data: ``read_records``, which also parses the HTTP response, checks the payload
and decodes it to text). Prints records read, wall seconds, peak resident memory (ru_maxrss) and how much of it
reading added after the imports, and the time ratio.

    python -m bench.warc [--input ../shared/data/web/warc] [--min-mb 40]
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = ROOT.parent / "shared" / "data" / "web" / "warc"

READERS = {
    "warcio": """
from warcio.archiveiterator import ArchiveIterator
imported_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
n = 0
for path in paths:
    with open(path, "rb") as handle:
        for record in ArchiveIterator(handle):
            if record.rec_type == "response":
                record.content_stream().read()
                n += 1
""",
    "phi3data": """
from phi3data.io.readers import read_records
imported_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
n = 0
for path in paths:
    for doc in read_records(Path(path), source=Path(path).name, max_document_bytes=10_000_000):
        n += 1
""",
}

HARNESS = """
import json, resource, sys, time
from pathlib import Path
paths = json.loads(sys.argv[1])
started = time.perf_counter()
{body}
seconds = time.perf_counter() - started
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"records": n, "seconds": seconds, "max_rss_mb": peak_mb, "reading_mb": peak_mb - imported_mb}}))
"""


def single_stream(shards: list[Path], target: Path, min_mb: float) -> tuple[Path, int]:
    """Every record of ``shards``, gzipped as one stream, repeated until it passes ``min_mb`` inflated. Written a
    shard at a time: the readers run in children of this process, whose peak RSS would include a big buffer."""
    written = 0
    with gzip.open(target, "wb", compresslevel=6) as out:
        while written < min_mb * 1e6:
            for shard in shards:
                with gzip.open(shard, "rb") as handle:
                    while chunk := handle.read(1 << 20):
                        written += out.write(chunk)
    return target, written


def measure(reader: str, paths: list[Path]) -> dict:
    code = HARNESS.format(body=READERS[reader])
    out = subprocess.run([sys.executable, "-c", code, json.dumps([str(p) for p in paths])], capture_output=True,
                         text=True, cwd=ROOT)
    if out.returncode != 0:  # a reader that cannot read the input at all is a result too
        return {"error": out.stderr.strip().splitlines()[-1][:100]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--min-mb", type=float, default=40.0)
    args = parser.parse_args()
    shards = sorted(args.input.glob("*.warc.gz"))
    if not shards:
        raise SystemExit(f"no *.warc.gz under {args.input}")
    with tempfile.TemporaryDirectory() as tmp:
        whole, inflated = single_stream(shards, Path(tmp) / "whole.warc.gz", args.min_mb)
        inputs = {f"{len(shards)} shards, a member per record": shards,
                  f"one gzip stream ({inflated / 1e6:.0f} MB inflated)": [whole]}
        print("| input | reader | records | seconds | peak RSS MB | of it, reading MB | time vs warcio |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for label, paths in inputs.items():
            results = {reader: measure(reader, paths) for reader in READERS}
            base = results["warcio"]
            for reader, r in results.items():
                if "error" in r:
                    print(f"| {label} | {reader} | failed: {r['error']} | | | | |")
                    continue
                ratio = "" if "error" in base else f"{base['seconds'] / r['seconds']:.2f}x"
                print(f"| {label} | {reader} | {r['records']:,} | {r['seconds']:.2f} | {r['max_rss_mb']:.0f} | "
                      f"{r['reading_mb']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
