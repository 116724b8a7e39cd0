"""Readers: turn one input shard (a WARC/WET, JSONL, Parquet or Arrow file) into documents and rejects.

Every reader yields plain dicts. A document dict has the core columns (``id``, ``text``, ``url``, ``source``,
``metadata``; WARC responses carry ``html`` bytes instead of ``text``). A reject dict has ``reason``,
``detail``, ``offset`` and a raw ``excerpt``, and is marked with ``"reject": True``. Bad input never raises:
it becomes a reject and reading goes on with the next record.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from phi3data.io.warc import WarcFault, iter_warc, parse_http_response

WARC_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz", ".warc.wet.gz", ".warc.wet.txt", ".arc.gz")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
HTML_TYPES = ("text/html", "application/xhtml+xml", "application/xhtml", "text/xhtml")


def detect_format(path: Path) -> str:
    """Name the reader for a file from its suffix: warc, jsonl, parquet or arrow."""
    name = path.name.lower()
    for fmt, suffixes in (("warc", WARC_SUFFIXES), ("jsonl", JSONL_SUFFIXES),
                          ("parquet", PARQUET_SUFFIXES), ("arrow", ARROW_SUFFIXES)):
        if name.endswith(suffixes):
            return fmt
    raise ValueError(f"cannot tell the format of {path}: expected one of "
                     f"{', '.join(WARC_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES)}")


def read_records(path: Path, *, fmt: str = "auto", source: str, max_document_bytes: int,
                 text_key: str = "text", id_key: str = "id", url_key: str = "url",
                 id_prefix: str | None = None) -> Iterator[dict]:
    """Yield document and reject dicts from one input shard. A record without an id of its own gets
    ``<id_prefix>:<line or row>`` (``id_prefix`` defaults to ``source``)."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "warc":
        yield from _read_warc(path, source, max_document_bytes, id_prefix or source)
        return
    for item in read_objects(path, fmt=fmt, source=source, max_record_bytes=max_document_bytes + 4096,
                             id_prefix=id_prefix):
        if isinstance(item, dict):
            yield item
            continue
        doc = _doc_from_mapping(item.obj, source, item.fallback_id, max_document_bytes, text_key, id_key, url_key)
        if doc.get("reject") and item.offset is not None:
            doc["offset"], doc["excerpt"] = item.offset, item.excerpt
        yield doc


@dataclass
class RawRecord:
    """One parsed record of a JSONL / Parquet / Arrow file, before any field is looked at."""

    fallback_id: str  # ``<source>:<line or row>``, for records without an id of their own
    obj: Any
    offset: int | None = None  # byte offset of a JSONL line in the decompressed file
    excerpt: bytes = b""


def read_objects(path: Path, *, fmt: str = "auto", source: str, max_record_bytes: int,
                 id_prefix: str | None = None) -> Iterator[RawRecord | dict]:
    """Every record of a JSONL, Parquet or Arrow file as a :class:`RawRecord`, for readers that need fields other
    than text (chat messages, labels); an unreadable line or file tail comes back as a reject dict instead."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "jsonl":
        yield from _jsonl_objects(path, source, max_record_bytes, id_prefix or source)
    elif fmt in ("parquet", "arrow"):
        yield from _table_objects(path, fmt, source, id_prefix or source)
    else:
        raise ValueError(f"unknown input format {fmt!r}: use auto, warc, jsonl, parquet or arrow")


def reject(source: str, reason: str, detail: str = "", *, offset: int | None = None, doc_id: str | None = None,
           excerpt: bytes | str = b"", stage: str = "read") -> dict:
    return {"reject": True, "id": doc_id, "source": source, "stage": stage, "reason": reason, "detail": detail,
            "offset": offset, "excerpt": excerpt}


# --- WARC / WET -------------------------------------------------------------------------------------------

WARC_HEAD_ROOM = 1 << 20  # HTTP headers and chunk framing a record block may hold besides its document


def _read_warc(path: Path, source: str, max_document_bytes: int, id_prefix: str | None = None) -> Iterator[dict]:
    """Stream the records of a WARC/WET file: memory is bounded by the largest record, not the file."""
    with open(path, "rb") as handle:
        yield from _warc_documents(handle, source, max_document_bytes, id_prefix or source)


def _warc_documents(handle, source: str, max_document_bytes: int, id_prefix: str) -> Iterator[dict]:
    # A record without a WARC-Record-ID is named by its offset; records inside one gzip member (a file gzipped
    # whole) share the member's offset, so the n-th of them gets a ":n" suffix.
    last_offset, same_offset = None, 0
    for item in iter_warc(handle, max_record_bytes=max_document_bytes + WARC_HEAD_ROOM):
        same_offset = same_offset + 1 if item.offset == last_offset else 0
        last_offset = item.offset
        fallback_id = f"{id_prefix}@{item.offset}" + (f":{same_offset}" if same_offset else "")
        if isinstance(item, WarcFault):
            kind = item.headers.get("warc-type", "").lower()
            if item.reason == "too_large" and kind and kind not in ("response", "conversion", "resource"):
                continue  # an oversized warcinfo, request, metadata ... record is not a document either
            yield reject(source, item.reason, item.detail, offset=item.offset,
                         doc_id=item.headers.get("warc-record-id"), excerpt=item.excerpt)
            continue
        kind = item.type
        if kind not in ("response", "conversion", "resource"):
            continue  # warcinfo, request, metadata ... are not documents
        headers = item.headers
        doc_id = headers.get("warc-record-id") or fallback_id
        url = headers.get("warc-target-uri")
        meta = {"warc_date": headers.get("warc-date"), "warc_type": kind}
        if kind == "conversion":
            if len(item.block) > max_document_bytes:
                yield reject(source, "too_large", f"{len(item.block)} bytes > {max_document_bytes}",
                             offset=item.offset, doc_id=doc_id, excerpt=item.block[:256])
                continue
            text = item.block.decode("utf-8", "replace")
            if _mostly_replacement(text):
                yield reject(source, "undecodable_bytes", "text block is not UTF-8", offset=item.offset,
                             doc_id=doc_id, excerpt=item.block[:256])
                continue
            yield {"id": doc_id, "text": text, "url": url, "source": source, "metadata": meta}
            continue
        if kind == "resource":
            content_type = headers.get("content-type", "")
            body = item.block
        else:
            try:
                response = parse_http_response(item.block)
            except ValueError as exc:
                yield reject(source, str(exc), "HTTP response could not be parsed", offset=item.offset,
                             doc_id=doc_id, excerpt=item.block[:256])
                continue
            content_type = response.headers.get("content-type", "")
            body = response.body
            meta["http_status"] = response.status
        mime = content_type.split(";")[0].strip().lower()
        if mime and mime not in HTML_TYPES:
            yield reject(source, "non_html_payload", f"content type {mime!r}", offset=item.offset, doc_id=doc_id,
                         excerpt=body[:256])
            continue
        if not mime and not _looks_like_html(body):
            yield reject(source, "non_html_payload", "no content type and no HTML markup", offset=item.offset,
                         doc_id=doc_id, excerpt=body[:256])
            continue
        if not body.strip():
            yield reject(source, "empty_document", "empty HTTP body", offset=item.offset, doc_id=doc_id)
            continue
        if len(body) > max_document_bytes:
            yield reject(source, "too_large", f"{len(body)} bytes > {max_document_bytes}", offset=item.offset,
                         doc_id=doc_id, excerpt=body[:256])
            continue
        if _is_binary(body):
            yield reject(source, "undecodable_bytes", "payload is binary, not HTML text", offset=item.offset,
                         doc_id=doc_id, excerpt=body[:256])
            continue
        meta["content_type"] = content_type or None
        yield {"id": doc_id, "html": body, "url": url, "source": source, "metadata": meta}


def _looks_like_html(body: bytes) -> bool:
    head = body[:2048].lower()
    return b"<html" in head or b"<!doctype html" in head or b"<body" in head or b"<p" in head


def _is_binary(body: bytes) -> bool:
    """True for payloads that are not text in any encoding: many NUL / control bytes near the start."""
    head = body[:4096]
    if not head:
        return False
    controls = len(head) - len(head.translate(None, _CONTROL_BYTES))
    return controls / len(head) > 0.1


_CONTROL_BYTES = bytes(b for b in range(32) if b < 9 or 13 < b)  # NUL..BS and SO..US; not tab or line ends


def _mostly_replacement(text: str) -> bool:
    return bool(text) and text.count("\ufffd") / len(text) > 0.1


# --- JSONL ------------------------------------------------------------------------------------------------

READ_BYTES = 1 << 20  # decompressed bytes handed on at a time: JSONL is read as a stream, never whole


def _jsonl_byte_stream(path: Path) -> Iterator[bytes | dict]:
    """The file's decompressed bytes in pieces; an unreadable tail ends the stream with a fault dict."""
    name = path.name.lower()
    with open(path, "rb") as handle:
        gzipped = name.endswith(".gz") or handle.read(2) == b"\x1f\x8b"
        handle.seek(0)
        if gzipped:
            yield from _gunzip_stream(handle)
        elif name.endswith(".zst"):
            import zstandard

            try:
                with zstandard.ZstdDecompressor().stream_reader(handle) as reader:
                    while chunk := reader.read(READ_BYTES):
                        yield chunk
            except zstandard.ZstdError as exc:
                yield {"reason": "corrupt_zstd", "detail": str(exc), "offset": 0}
        else:
            while chunk := handle.read(READ_BYTES):
                yield chunk


def _gunzip_stream(handle) -> Iterator[bytes | dict]:
    """Inflate every gzip member in turn (NUL padding around members is skipped); a fault dict ends a bad tail."""
    inflater, started, member_start, consumed = zlib.decompressobj(31), False, 0, 0
    while chunk := handle.read(1 << 16):
        consumed += len(chunk)
        data = chunk
        while data:
            if not started:
                data = data.lstrip(b"\x00")
                if not data:
                    break
                started, member_start = True, consumed - len(data)
            try:
                out = inflater.decompress(data, READ_BYTES)
                while out:
                    yield out
                    out = inflater.decompress(inflater.unconsumed_tail, READ_BYTES) if inflater.unconsumed_tail \
                        else b""
            except zlib.error as exc:
                yield {"reason": "corrupt_gzip", "detail": f"near byte {consumed}: {exc}", "offset": consumed}
                return
            if inflater.eof:
                data = inflater.unused_data
                inflater, started = zlib.decompressobj(31), False
            else:
                data = b""
    if started:
        yield {"reason": "truncated_gzip", "detail": "gzip stream ends early", "offset": member_start}


def _jsonl_lines(path: Path, limit: int) -> Iterator[tuple[int, int, bytes, int] | dict]:
    """``(line number, byte offset, line, length)`` per line, streaming; a fault dict last for a bad tail.

    A line longer than ``limit`` bytes is not kept in memory: it comes back as its first 256 bytes with its
    full length, for the caller to reject. The partly inflated last line before a fault belongs to the fault.
    """
    parts: list[bytes] = []
    held = length = offset = number = 0
    for piece in _jsonl_byte_stream(path):
        if isinstance(piece, dict):
            yield piece
            return
        start = 0
        while (newline := piece.find(b"\n", start)) >= 0:
            segment = piece[start:newline]
            length += len(segment)
            line = b"".join(parts) + segment if held <= limit else b"".join(parts)
            number += 1
            yield number, offset, line if length <= limit else line[:256], length
            offset += length + 1
            parts, held, length, start = [], 0, 0, newline + 1
        rest = piece[start:]
        length += len(rest)
        if held <= limit:  # past the limit, keep only the head (for the reject's excerpt)
            parts.append(rest)
            held += len(rest)
    if length:
        line = b"".join(parts)
        yield number + 1, offset, line if length <= limit else line[:256], length


def _jsonl_objects(path: Path, source: str, max_record_bytes: int, id_prefix: str) -> Iterator[RawRecord | dict]:
    for item in _jsonl_lines(path, max_record_bytes):
        if isinstance(item, dict):
            yield reject(source, item["reason"], item["detail"], offset=item["offset"])
            return
        number, line_offset, line, length = item
        fallback_id = f"{id_prefix}:{number}"
        if length > max_record_bytes:
            yield reject(source, "too_large", f"line {number} has {length} bytes", offset=line_offset,
                         doc_id=fallback_id, excerpt=line[:256])
            continue
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            # orjson is strict (lone surrogate escapes, NaN, 1e400); the standard library decides what such a
            # line is, so the result and the reject reasons do not depend on the fast path
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield reject(source, "undecodable_bytes", f"line {number}: {exc}", offset=line_offset,
                             doc_id=fallback_id, excerpt=line[:256])
                continue
            except json.JSONDecodeError as exc:
                yield reject(source, "malformed_json", f"line {number}: {exc}", offset=line_offset,
                             doc_id=fallback_id, excerpt=line[:256])
                continue
        yield RawRecord(fallback_id, obj, line_offset, line[:256])


def _doc_from_mapping(obj, source: str, fallback_id: str, max_document_bytes: int, text_key: str, id_key: str,
                      url_key: str) -> dict:
    if not isinstance(obj, dict):
        return reject(source, "malformed_record", f"expected a JSON object, got {type(obj).__name__}",
                      doc_id=fallback_id)
    text = obj.get(text_key)
    raw_id = obj.get(id_key)
    doc_id = str(raw_id) if raw_id not in (None, "") else fallback_id
    if text is None:
        return reject(source, "missing_text", f"no {text_key!r} field", doc_id=doc_id)
    if not isinstance(text, str):
        return reject(source, "malformed_record", f"{text_key!r} is {type(text).__name__}, not a string",
                      doc_id=doc_id)
    if not text.strip():
        return reject(source, "empty_document", "text is empty", doc_id=doc_id)
    if len(text) > max_document_bytes:
        return reject(source, "too_large", f"{len(text)} characters > {max_document_bytes}", doc_id=doc_id)
    url = obj.get(url_key)
    metadata = {k: v for k, v in obj.items() if k not in (text_key, id_key, url_key)}
    if url is None and isinstance(metadata.get("metadata"), dict):
        url = metadata["metadata"].get("url")
    return {"id": doc_id, "text": text, "url": None if url is None else str(url), "source": source,
            "metadata": metadata or None}


# --- Parquet / Arrow (Hugging Face datasets save Arrow files) ----------------------------------------------

def _table_objects(path: Path, fmt: str, source: str, id_prefix: str) -> Iterator[RawRecord | dict]:
    row = 0
    try:
        for batch in _iter_arrow_batches(path, fmt):
            for obj in batch.to_pylist():
                row += 1
                yield RawRecord(f"{id_prefix}:{row}", obj)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        yield reject(source, f"corrupt_{fmt}", str(exc))


def _iter_arrow_batches(path: Path, fmt: str):
    if fmt == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=1024)
        return
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
            return
        yield from reader


def load_hf_dataset(name: str, split: str = "train"):
    """Load a Hugging Face dataset by hub name (needs network) or from a directory saved with save_to_disk."""
    import datasets

    if Path(name).is_dir():
        ds = datasets.load_from_disk(name)
    else:
        ds = datasets.load_dataset(name, split=split)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split]
    return ds

