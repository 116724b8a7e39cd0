"""A fault-tolerant WARC / WET record reader.

Why our own framing rather than fastwarc or warcio alone: both stop at the first corrupt gzip member and lose
the rest of the file. Here every gzip member is inflated on its own (zlib), a corrupt or truncated member is
reported with its byte offset and the reader resynchronises on the next gzip header, and a WARC record whose
block is shorter than its Content-Length is reported as truncated. The WARC and HTTP header formats are simple
enough to parse directly; the tests check the result against warcio on real and edge-case files.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

GZIP_MAGIC = b"\x1f\x8b\x08"
_CHUNK = 1 << 16
_MAX_HEADER = 1 << 16


@dataclass
class WarcRecord:
    """One WARC record: its headers (lower-cased names), its block, and where it started in the file."""

    offset: int
    headers: dict[str, str]
    block: bytes

    @property
    def type(self) -> str:
        return self.headers.get("warc-type", "").lower()


@dataclass
class WarcFault:
    """A part of the file that could not be read, with why."""

    offset: int
    reason: str
    detail: str
    excerpt: bytes = b""


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def iter_warc(data: bytes, *, max_member_bytes: int) -> Iterator[WarcRecord | WarcFault]:
    """Yield the records of a WARC/WET file (gzipped per member, gzipped whole, or plain) and the faults met."""
    if data.startswith(GZIP_MAGIC):
        for offset, member in _iter_gzip_members(data, max_member_bytes):
            if isinstance(member, WarcFault):
                yield member
            else:
                yield from _iter_records(member, offset, offset_in_member=False)
    else:
        yield from _iter_records(data, 0, offset_in_member=True)


def _iter_gzip_members(data: bytes, max_member_bytes: int) -> Iterator[tuple[int, bytes | WarcFault]]:
    view = memoryview(data)
    size = len(data)
    pos = 0
    while pos < size:
        if not data.startswith(GZIP_MAGIC, pos):
            if not data[pos:].strip(b"\x00\r\n\t "):
                return  # trailing padding
            nxt = data.find(GZIP_MAGIC, pos + 1)
            yield pos, WarcFault(pos, "corrupt_gzip", "bytes between gzip members", bytes(view[pos : pos + 256]))
            if nxt < 0:
                return
            pos = nxt
            continue
        inflater = zlib.decompressobj(31)
        parts: list[bytes] = []
        inflated = 0
        cursor = pos
        try:
            while not inflater.eof and cursor < size:
                chunk = view[cursor : cursor + _CHUNK]
                cursor += len(chunk)
                out = inflater.decompress(chunk)
                inflated += len(out)
                if inflated > max_member_bytes:
                    raise _TooLarge()
                parts.append(out)
        except zlib.error as exc:
            start = pos
            pos = _resync(data, pos)
            yield start, WarcFault(start, "corrupt_gzip", f"gzip member at byte {start}: {exc}",
                                   bytes(view[start : start + 256]))
            continue
        except _TooLarge:
            start = pos
            pos = _resync(data, pos)
            yield start, WarcFault(start, "too_large",
                                   f"gzip member at byte {start} inflates past {max_member_bytes} bytes")
            continue
        if not inflater.eof:
            yield pos, WarcFault(pos, "truncated_gzip", f"gzip member at byte {pos} ends before its end marker",
                                 b"".join(parts)[:256])
            return
        end = cursor - len(inflater.unused_data)
        yield pos, b"".join(parts)
        pos = end


class _TooLarge(Exception):
    pass


def _resync(data: bytes, pos: int) -> int:
    """The offset of the next gzip member header after a broken one (or the end of the data)."""
    nxt = data.find(GZIP_MAGIC, pos + 1)
    return len(data) if nxt < 0 else nxt


def _iter_records(raw: bytes, base: int, *, offset_in_member: bool) -> Iterator[WarcRecord | WarcFault]:
    """Split uncompressed WARC bytes into records. ``base`` is the file offset of ``raw``."""
    pos = 0
    size = len(raw)
    while pos < size:
        while pos < size and raw[pos] in b"\r\n":
            pos += 1
        if pos >= size:
            return
        at = base + pos if offset_in_member else base
        if not raw.startswith(b"WARC/", pos):
            nxt = raw.find(b"\nWARC/", pos)
            yield WarcFault(at, "malformed_record", "expected a 'WARC/' version line", raw[pos : pos + 256])
            if nxt < 0:
                return
            pos = nxt + 1
            continue
        head_end, sep = _header_end(raw, pos)
        if head_end < 0:
            yield WarcFault(at, "truncated_record", "WARC header has no end", raw[pos : pos + 256])
            return
        headers = parse_header_lines(raw[pos:head_end].replace(b"\r\n", b"\n").split(b"\n")[1:])
        try:
            length = int(headers.get("content-length", ""))
        except ValueError:
            yield WarcFault(at, "malformed_record", "missing or invalid Content-Length", raw[pos : pos + 256])
            nxt = raw.find(b"\nWARC/", head_end)
            if nxt < 0:
                return
            pos = nxt + 1
            continue
        block_start = head_end + sep
        block_end = block_start + length
        if not _at_record_boundary(raw, block_end):
            # Content-Length disagrees with the file. Hand-edited and LF-only files do this; trust the next
            # record header when there is one, otherwise the record was cut off.
            nxt = raw.find(b"\nWARC/1.", block_start)
            if nxt < 0 and block_end <= size:
                nxt = size - 1  # the file goes on past the declared length: keep all of it
            if nxt < 0:
                yield WarcFault(at, "truncated_record",
                                f"record {headers.get('warc-record-id', '?')} has {size - block_start} of its "
                                f"{length} block bytes", raw[pos : pos + 256])
                return
            block_end = nxt + 1
            headers["x-phi3data-length-mismatch"] = "1"
            yield WarcRecord(at, headers, raw[block_start:block_end].rstrip(b"\r\n"))
            pos = block_end
            continue
        yield WarcRecord(at, headers, raw[block_start:block_end])
        pos = block_end


def _header_end(raw: bytes, pos: int) -> tuple[int, int]:
    """Where a header block that starts at ``pos`` ends, and the separator's length (CRLF or LF-only files)."""
    crlf = raw.find(b"\r\n\r\n", pos, pos + _MAX_HEADER)
    lf = raw.find(b"\n\n", pos, pos + _MAX_HEADER)
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf, 2
    return crlf, 4


def _at_record_boundary(raw: bytes, pos: int) -> bool:
    """True if ``pos`` is the end of the data or, after line breaks, the start of the next record."""
    if pos > len(raw):
        return False
    while pos < len(raw) and raw[pos] in b"\r\n":
        pos += 1
    return pos == len(raw) or raw.startswith(b"WARC/", pos)


def parse_header_lines(lines: list[bytes]) -> dict[str, str]:
    """Parse 'Name: value' lines (with folded continuation lines) into a dict with lower-cased names."""
    headers: dict[str, str] = {}
    last = None
    for line in lines:
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and last is not None:
            headers[last] += " " + line.strip().decode("latin-1")
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        last = name.strip().decode("latin-1").lower()
        headers[last] = value.strip().decode("latin-1")
    return headers


def parse_http_response(block: bytes) -> HttpResponse:
    """Parse an HTTP response block: status, headers, and the body with transfer/content encodings undone.

    Raises ValueError with a reason when the block is not a readable HTTP response.
    """
    head_end = block.find(b"\r\n\r\n")
    sep = 4
    if head_end < 0:
        head_end = block.find(b"\n\n")
        sep = 2
    if head_end < 0:
        raise ValueError("http_header_unterminated")
    lines = block[:head_end].replace(b"\r\n", b"\n").split(b"\n")
    status_parts = lines[0].split(None, 2)
    if len(status_parts) < 2 or not status_parts[0].startswith(b"HTTP/"):
        raise ValueError("http_bad_status_line")
    try:
        status = int(status_parts[1])
    except ValueError as exc:
        raise ValueError("http_bad_status_line") from exc
    headers = parse_header_lines(lines[1:])
    body = block[head_end + sep :]
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    encoding = headers.get("content-encoding", "").lower().strip()
    if encoding in ("gzip", "x-gzip"):
        body = _inflate(body, 31)
    elif encoding == "deflate":
        try:
            body = _inflate(body, 15)
        except ValueError:
            body = _inflate(body, -15)
    elif encoding not in ("", "identity", "none", "utf-8", "utf8"):
        raise ValueError("unsupported_content_encoding")
    return HttpResponse(status, headers, body)


def _inflate(body: bytes, wbits: int) -> bytes:
    try:
        return zlib.decompressobj(wbits).decompress(body)
    except zlib.error as exc:
        raise ValueError("corrupt_content_encoding") from exc


def _dechunk(body: bytes) -> bytes:
    """Undo HTTP chunked transfer encoding; bodies that are not really chunked are returned unchanged."""
    out = []
    pos = 0
    while True:
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            return body if not out else b"".join(out)
        size_text = body[pos:line_end].split(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return body if not out else b"".join(out)
        if size == 0:
            return b"".join(out)
        out.append(body[line_end + 2 : line_end + 2 + size])
        pos = line_end + 2 + size + 2
