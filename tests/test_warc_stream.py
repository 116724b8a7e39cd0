"""The WARC reader streams: whole-file gzip, corrupt members, oversized records, bounded memory (real records)."""

from __future__ import annotations

import gzip
import re
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WARC_DIR, require_shared

from phi3data.io.readers import read_records

BIG = 10_000_000
SAMPLE = WARC_DIR / "web-sample-00008.warc.gz"  # 13 response records, one gzip member each
LARGE = WARC_DIR / "web-sample-00007.warc.gz"  # holds a 5.3 MB record


def read(path: Path, max_document_bytes: int = BIG) -> list[dict]:
    return list(read_records(path, source=path.name, max_document_bytes=max_document_bytes))


def documents(rows: list[dict]) -> list[tuple[str, bytes]]:
    return [(r["id"], r["html"]) for r in rows if not r.get("reject")]


def rejects(rows: list[dict]) -> list[tuple[str, str | None, int | None]]:
    return [(r["reason"], r["id"], r["offset"]) for r in rows if r.get("reject")]


def members(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(start, end, inflated bytes) of every gzip member of a file gzipped per record."""
    data = require_shared(path).read_bytes()
    pos = 0
    while pos < len(data):
        inflater = zlib.decompressobj(31)
        out = inflater.decompress(data[pos:])
        end = len(data) - len(inflater.unused_data)
        yield pos, end, out
        pos = end


def record_id(raw: bytes) -> str:
    return re.search(rb"WARC-Record-ID: (<[^>]+>)", raw).group(1).decode()


def peak_bytes_while_reading(path: Path, max_document_bytes: int = BIG) -> tuple[int, int]:
    """Documents read and the peak traced allocation while reading ``path`` without keeping its documents."""
    tracemalloc.start()
    try:
        count = sum(1 for r in read_records(path, source=path.name, max_document_bytes=max_document_bytes)
                    if not r.get("reject"))
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def whole_stream(tmp_path_factory) -> tuple[Path, int, int]:
    """The sample's records repeated past 40 MB and gzipped as ONE member: (path, copies, inflated size)."""
    raw = gzip.decompress(require_shared(SAMPLE).read_bytes())
    copies = 40 * 2**20 // len(raw) + 1
    path = tmp_path_factory.mktemp("whole") / "whole.warc.gz"
    with gzip.open(path, "wb", compresslevel=1) as out:
        for _ in range(copies):
            out.write(raw)
    return path, copies, copies * len(raw)


def test_whole_file_gzip_stream_reads_every_record(whole_stream):
    path, copies, inflated = whole_stream
    assert inflated > 40 * 2**20
    got = read(path)
    assert rejects(got) == []
    assert documents(got) == documents(read(SAMPLE)) * copies


def test_whole_file_gzip_stream_memory_is_bounded_by_a_record(whole_stream):
    path, copies, inflated = whole_stream
    count, peak = peak_bytes_while_reading(path)
    assert count == 13 * copies
    # the largest record inflates to 0.9 MB; the whole stream to over 40 MB
    assert peak < inflated / 4


def test_truncated_whole_stream_keeps_the_records_before_the_cut(tmp_path):
    data = gzip.compress(gzip.decompress(require_shared(SAMPLE).read_bytes()), compresslevel=6)
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[: len(data) * 6 // 10])
    got = read(cut)
    clean = documents(read(SAMPLE))
    kept = documents(got)
    assert len(kept) >= 5 and kept == clean[: len(kept)]
    assert rejects(got) == [("truncated_gzip", None, 0)]


def test_corrupt_members_lose_only_their_records(tmp_path):
    parts = list(members(SAMPLE))
    data = bytearray(require_shared(SAMPLE).read_bytes())
    bad_deflate, bad_crc = parts[3], parts[9]
    middle = (bad_deflate[0] + bad_deflate[1]) // 2
    data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
    data[bad_crc[1] - 8] ^= 0xFF  # the member's CRC-32: all of its deflate data inflates, the check fails
    path = tmp_path / "damaged.warc.gz"
    path.write_bytes(bytes(data))
    got = read(path)
    lost = {record_id(bad_deflate[2]), record_id(bad_crc[2])}
    assert rejects(got) == [("corrupt_gzip", None, bad_deflate[0]), ("corrupt_gzip", None, bad_crc[0])]
    assert documents(got) == [doc for doc in documents(read(SAMPLE)) if doc[0] not in lost]


@pytest.mark.parametrize("name", ["mixed.warc.gz", "mixed.warc"])
def test_record_over_the_limit_is_skipped_and_reading_goes_on(tmp_path, name):
    giant = max((raw for _, _, raw in members(LARGE)), key=len)
    sample = [raw for _, _, raw in members(SAMPLE) if len(raw) < 500_000]  # 10 records of 60-450 kB
    stream = b"".join(sample[:5]) + giant + b"".join(sample[5:])
    path = tmp_path / name
    path.write_bytes(gzip.compress(stream, compresslevel=1) if name.endswith(".gz") else stream)
    got = read(path, max_document_bytes=2_000_000)
    offset = 0 if name.endswith(".gz") else len(b"".join(sample[:5]))
    assert rejects(got) == [("too_large", record_id(giant), offset)]
    kept = {record_id(raw) for raw in sample}
    assert documents(got) == [doc for doc in documents(read(SAMPLE)) if doc[0] in kept]
    # the oversized record (5.3 MB) is skipped, never held whole
    count, peak = peak_bytes_while_reading(path, max_document_bytes=2_000_000)
    assert count == 10 and peak < len(giant)
