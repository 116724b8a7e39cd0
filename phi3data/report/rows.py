"""Reading output rows in bounded batches: Parquet and JSONL shards, a few columns at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pyarrow.parquet as pq

BATCH_ROWS = 2048


def read_json(path: Path, default=None):
    """A JSON file's value; ``default`` when the file is absent."""
    if not path.is_file():
        return default
    return orjson.loads(path.read_bytes())


def columns_of(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        return pq.read_schema(path).names
    with open(path, "rb") as handle:
        first = handle.readline()
    return list(orjson.loads(first)) if first.strip() else []


def iter_rows(paths: list[Path], columns: list[str] | None = None) -> Iterator[dict]:
    """Rows of Parquet or JSONL(.gz not needed: outputs are plain) files, restricted to ``columns`` present."""
    for path in paths:
        if path.suffix == ".parquet":
            file = pq.ParquetFile(path)
            wanted = [c for c in columns if c in file.schema_arrow.names] if columns else None
            for batch in file.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
                yield from batch.to_pylist()
        elif path.suffix == ".jsonl":
            with open(path, "rb") as handle:
                for line in handle:
                    if line.strip():
                        row = orjson.loads(line)
                        yield {k: row.get(k) for k in columns} if columns else row


def domain(url: object) -> str:
    """The host of a URL without ``www.``; ``(no domain)`` for ids such as ``urn:sample:...``."""
    if not url or not isinstance(url, str):
        return "(no url)"
    host = urlsplit(url).hostname if "://" in url else None
    if not host:
        return "(no domain)"
    return host.removeprefix("www.")
