"""Readers on real files: WARC/WET framing checked against warcio, JSONL/Parquet/Arrow, and bad input."""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import EDGE_DIR, JSONL_DIR, WARC_DIR, require_shared

from phi3data.io.readers import read_records

BIG = 10_000_000


def records(path: Path, **kw) -> list[dict]:
    return list(read_records(path, source=path.name, max_document_bytes=kw.pop("max_document_bytes", BIG), **kw))


def test_warc_records_match_warcio_on_real_shards():
    from warcio.archiveiterator import ArchiveIterator

    for path in [WARC_DIR / "web-sample-00008.warc.gz", WARC_DIR / "web-sample-00000.warc.gz",
                 EDGE_DIR / "dolma_sample-0000.warc.gz", EDGE_DIR / "warcio_example-iana.org-chunked.warc"]:
        got = records(require_shared(path))
        ours = {r["id"]: r["html"] for r in got if not r.get("reject")}
        rejected = {r["id"] for r in got if r.get("reject")}
        theirs = {}
        with open(path, "rb") as handle:
            for rec in ArchiveIterator(handle):
                if rec.rec_type in ("response", "resource"):
                    payload = rec.content_stream().read()
                    if payload.startswith(b"HTTP/"):  # warcio leaves HTTP unparsed for non-http URIs (urn:...)
                        payload = payload.split(b"\r\n\r\n", 1)[1]
                    theirs[rec.rec_headers.get_header("WARC-Record-ID")] = payload
        assert ours.keys() | rejected == theirs.keys() and not ours.keys() & rejected, path.name
        assert ours, path.name
        for key, html in ours.items():
            assert html == theirs[key], f"{path.name} {key}"


def test_warc_reader_keeps_target_uri_and_counts_all_pages():
    docs = [r for p in sorted(WARC_DIR.glob("*.warc.gz")) for r in records(p)]
    assert len(docs) == 2013 and not any(d.get("reject") for d in docs)
    assert len({d["id"] for d in docs}) == 2013
    assert sum(1 for d in docs if d["url"] and d["url"].startswith("http")) > 1000


def test_wet_conversion_records_with_lf_endings_and_wrong_lengths():
    docs = records(require_shared(EDGE_DIR / "ccnet_sample.warc.wet.txt"))
    assert [d.get("reject") for d in docs] == [None, None, None]
    assert docs[0]["text"].startswith("Famous Mark Twain Quotes")
    assert docs[2]["text"].rstrip().endswith("Правда нет.")


def test_resource_record_and_non_html_payloads():
    resource = records(EDGE_DIR / "warcio_example-resource.warc.gz")
    assert len(resource) == 1 and b"<html" in resource[0]["html"].lower()
    dolma = records(EDGE_DIR / "dolma_sample-0000.warc.gz")
    non_html = [r for r in dolma if r.get("reject")]
    assert non_html and all(r["reason"] == "non_html_payload" for r in non_html)


def test_corrupt_gzip_member_loses_only_that_record(tmp_path):
    path = WARC_DIR / "web-sample-00008.warc.gz"
    clean = records(path)
    data = bytearray(path.read_bytes())
    # find the 6th gzip member and damage its deflate stream
    starts = [i for i in range(len(data) - 3) if data[i:i + 3] == b"\x1f\x8b\x08"]
    target = starts[5]
    data[target + 40: target + 140] = bytes(100)
    bad = tmp_path / "damaged.warc.gz"
    bad.write_bytes(bytes(data))
    got = records(bad)
    rejects = [r for r in got if r.get("reject")]
    docs = [r for r in got if not r.get("reject")]
    assert [r["reason"] for r in rejects] == ["corrupt_gzip"]
    assert rejects[0]["offset"] == target
    assert len(docs) == len(clean) - 1
    clean_by_id = {d["id"]: d["html"] for d in clean}
    assert all(clean_by_id[d["id"]] == d["html"] for d in docs)


def test_truncated_warc_keeps_complete_records(tmp_path):
    path = WARC_DIR / "web-sample-00008.warc.gz"
    data = path.read_bytes()
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[: len(data) // 2])
    got = records(cut)
    assert got[-1].get("reject") and got[-1]["reason"] == "truncated_gzip"
    assert sum(1 for r in got if not r.get("reject")) >= 3
    # the same file uncompressed and cut mid-record
    raw = gzip.decompress(data)
    plain = tmp_path / "cut.warc"
    plain.write_bytes(raw[: len(raw) // 2])
    got = records(plain)
    assert got[-1]["reason"] == "truncated_record"


def _warc_bytes(payload: bytes, content_type: str, record_id: str) -> bytes:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True)
    http = StatusAndHeaders("200 OK", [("Content-Type", content_type)], protocol="HTTP/1.1")
    record = writer.create_warc_record("http://example.org/x", "response", payload=io.BytesIO(payload),
                                       http_headers=http, warc_headers_dict={"WARC-Record-ID": record_id})
    writer.write_record(record)
    return buf.getvalue()


def test_bad_payloads_are_rejected_with_reasons(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
    giant = b"<html><body>" + b"<p>" + b"word " * 4_200_000 + b"</p></body></html>"
    binary_html = b"\x00\x01\x02\x03" * 2000
    good = (WARC_DIR / "web-sample-00008.warc.gz").read_bytes()
    path = tmp_path / "mixed.warc.gz"
    path.write_bytes(_warc_bytes(png, "image/png", "<urn:png>") + good +
                     _warc_bytes(giant, "text/html", "<urn:giant>") +
                     _warc_bytes(binary_html, "text/html", "<urn:binary>") +
                     _warc_bytes(b"   ", "text/html", "<urn:empty>"))
    got = records(path)
    reasons = {r["id"]: r["reason"] for r in got if r.get("reject")}
    assert reasons == {"<urn:png>": "non_html_payload", "<urn:giant>": "too_large",
                       "<urn:binary>": "undecodable_bytes", "<urn:empty>": "empty_document"}
    assert sum(1 for r in got if not r.get("reject")) == 13


def test_jsonl_plain_gzip_zstd_and_bad_lines(tmp_path):
    lines = [json.dumps({"id": "a", "text": "first document", "url": "http://a"}).encode(),
             b'{"id": "b", "text": "unterminated',
             b'{"id": "c", "text": "bad bytes \xff\xfe here"}',
             json.dumps({"id": "d", "text": ""}).encode(),
             json.dumps({"id": "e"}).encode(),
             json.dumps(["not", "an", "object"]).encode(),
             json.dumps({"id": "g", "text": "x" * 2_000_000}).encode(),
             json.dumps({"text": "no id here", "source_meta": 3}).encode(),
             # a lone surrogate escape and NaN: valid for Python's json, refused by orjson's fast path
             b'{"id": "i", "text": "lone \\ud800 surrogate", "score": NaN}']
    blob = b"\n".join(lines) + b"\n"
    for name, data in [("d.jsonl", blob), ("d.jsonl.gz", gzip.compress(blob)),
                       ("d.jsonl.zst", zstandard.ZstdCompressor().compress(blob))]:
        path = tmp_path / name
        path.write_bytes(data)
        got = records(path, max_document_bytes=1_000_000)
        kinds = [(r["id"], r.get("reason", "ok")) for r in got]
        assert kinds == [("a", "ok"), (f"{name}:2", "malformed_json"), (f"{name}:3", "undecodable_bytes"),
                         ("d", "empty_document"), ("e", "missing_text"), (f"{name}:6", "malformed_record"),
                         (f"{name}:7", "too_large"), (f"{name}:8", "ok"), ("i", "ok")], name
        assert json.loads(got[-2]["metadata"] if isinstance(got[-2]["metadata"], str)
                          else json.dumps(got[-2]["metadata"])) == {"source_meta": 3}
        assert got[-1]["text"] == "lone \ud800 surrogate"


def test_corrupt_gzip_jsonl_keeps_the_readable_part(tmp_path):
    import random

    rng = random.Random(0)
    words = [f"w{n}" for n in range(5000)]
    blob = "".join(json.dumps({"id": str(i), "text": " ".join(rng.choices(words, k=200))}) + "\n"
                   for i in range(400))
    data = bytearray(gzip.compress(blob.encode()))
    data[len(data) // 2: len(data) // 2 + 50] = bytes(50)
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(bytes(data))
    got = records(path)
    docs = [r for r in got if not r.get("reject")]
    assert got[-1]["reason"] == "corrupt_gzip"
    assert 0 < len(docs) < 400
    assert [d["id"] for d in docs] == [str(i) for i in range(len(docs))]


def test_real_jsonl_samples_read():
    total = Counter()
    for path in sorted(require_shared(JSONL_DIR).iterdir()):
        for r in records(path):
            total["reject" if r.get("reject") else "doc"] += 1
    assert total == Counter({"doc": 70})


def test_parquet_and_hf_arrow(tmp_path):
    import datasets

    rows = [r for r in records(JSONL_DIR / "cc_en_head-0091.jsonl")]
    table = pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]})
    pq.write_table(table, tmp_path / "docs.parquet")
    got = records(tmp_path / "docs.parquet")
    assert [g["text"] for g in got] == [r["text"] for r in rows]
    ds = datasets.Dataset.from_dict({"text": [r["text"] for r in rows], "url": ["http://x"] * len(rows)})
    ds.save_to_disk(str(tmp_path / "hf"))
    arrow_files = sorted((tmp_path / "hf").glob("*.arrow"))
    got = [r for f in arrow_files for r in records(f)]
    assert [g["text"] for g in got] == [r["text"] for r in rows]
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not a parquet file")
    assert records(corrupt)[0]["reason"] == "corrupt_parquet"


def test_a_run_output_directory_lists_only_its_data(tmp_path):
    """Labelled-data sources and pipeline inputs share one listing: run metadata and hidden files are not input."""
    from phi3data.classifiers.data import read_documents
    from phi3data.io.inputs import list_input_files

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"id": f"d{i}", "text": f"document number {i}"} for i in range(3)]
    (data / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": ["part-0"]}))
    (tmp_path / "stats.json").write_text(json.dumps({"documents": 3}))
    (data / ".part-1.jsonl.tmp").write_text('{"id": "partial", "text": "unfinished"}\n')
    assert list_input_files(tmp_path) == [data / "part-0.jsonl"]
    assert [d["id"] for d in read_documents(tmp_path)] == ["d0", "d1", "d2"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no labelled data files"):
        list(read_documents(empty))


def test_jsonl_streams_gzip_members_padding_and_long_lines(tmp_path):
    """JSONL is read as a stream: several gzip members with NUL padding read whole, offsets point at each line
    in the decompressed bytes, and an oversized line spanning many read pieces is rejected with its length."""
    import random

    rng = random.Random(1)
    rows = [json.dumps({"id": f"r{i}", "text": " ".join(f"w{rng.randrange(10**6)}" for _ in range(1 + i * 37 % 900))}
                       ).encode() for i in range(300)]
    rows[150] = b'{"id": "bad", "text": '
    rows[200] = json.dumps({"id": "huge", "text": "z" * 3_500_000}).encode()
    blob = b"\n".join(rows) + b"\n"
    members = gzip.compress(blob[:400_000]) + bytes(64) + gzip.compress(blob[400_000:]) + bytes(512)
    path = tmp_path / "multi.jsonl.gz"
    path.write_bytes(members)
    got = records(path, max_document_bytes=1_000_000)
    assert [r["id"] for r in got if not r.get("reject")] == [f"r{i}" for i in range(300) if i not in (150, 200)]
    bad = {r["reason"]: r for r in got if r.get("reject")}
    assert set(bad) == {"malformed_json", "too_large"}
    assert bad["malformed_json"]["offset"] == blob.index(rows[150])
    assert bad["too_large"]["offset"] == blob.index(rows[200])
    assert bad["too_large"]["detail"] == f"line 201 has {len(rows[200])} bytes"
    # a member cut short: what was inflated is kept, the cut line is not, and the fault says where the member began
    first, second = gzip.compress(blob[:400_000]), gzip.compress(blob[400_000:])
    path.write_bytes(first + second[: len(second) // 2])
    got = records(path, max_document_bytes=1_000_000)
    assert got[-1]["reason"] == "truncated_gzip" and got[-1]["offset"] == len(first)
    kept = [r["id"] for r in got if not r.get("reject")]
    assert kept == [f"r{i}" for i in range(300) if i not in (150, 200)][:len(kept)] and 150 < len(kept) < 298


def test_warc_records_without_an_id_get_distinct_ids(tmp_path):
    """A record without WARC-Record-ID is named by its offset; in a file gzipped whole every record shares the
    member's offset, so the ids must still differ (and carry the shard, via id_prefix, when a source is fixed)."""
    def raw_record(n: int) -> bytes:
        http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<html><body><p>page %d</p></body></html>" % n
        head = (b"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: http://example.org/%d\r\n"
                b"Content-Length: %d\r\n\r\n")
        return head % (n, len(http)) + http + b"\r\n\r\n"

    body = b"".join(raw_record(n) for n in range(3))
    whole = tmp_path / "whole.warc.gz"
    whole.write_bytes(gzip.compress(body))
    plain = tmp_path / "plain.warc"
    plain.write_bytes(body)
    for path in (whole, plain):
        docs = [r for r in records(path, id_prefix=f"web:{path.name}") if not r.get("reject")]
        ids = [d["id"] for d in docs]
        assert len(docs) == 3 and len(set(ids)) == 3, ids
        assert all(i.startswith(f"web:{path.name}@") for i in ids)
