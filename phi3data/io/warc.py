"""A fault-tolerant, streaming WARC / WET record reader.

Why our own framing rather than fastwarc or warcio alone: both stop at the first corrupt gzip member and lose
the rest of the file. Here the file is read in pieces and every gzip member is inflated incrementally (ISA-L's
inflate through ``isal``, about twice as fast as zlib on the same bytes, with the same output); a
corrupt or truncated member is reported with its byte offset and the reader resynchronises on the next gzip
header, and a WARC record whose block is shorter than its Content-Length is reported as truncated. Records are
cut from the inflated stream one at a time, so a WARC gzipped whole (one member for the file) is read like one
gzipped per record, and memory is bounded by the largest record, not by the file or the member. The WARC and
HTTP header formats are simple enough to parse directly; the tests check the result against warcio on real and
edge-case files.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from isal import isal_zlib

GZIP_MAGIC = b"\x1f\x8b\x08"
_CHUNK = 1 << 16  # compressed bytes read at a time
_PIECE = 1 << 18  # most inflated bytes handed on at a time
_MAX_HEADER = 1 << 16
_PADDING = b"\x00\r\n\t "


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
    """A part of the file that could not be read, with why (and the record's headers when they were read)."""

    offset: int
    reason: str
    detail: str
    excerpt: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def iter_warc(stream: BinaryIO, *, max_record_bytes: int) -> Iterator[WarcRecord | WarcFault]:
    """Yield the records of a WARC/WET file (gzipped per record, gzipped whole, or plain) and the faults met.

    ``stream`` is a seekable binary file, read in pieces. A record's offset is the file offset of the gzip member
    it starts in (of the record itself in a plain file). A record whose block is over ``max_record_bytes`` is
    skipped unread and reported as ``too_large``; reading goes on after it.
    """
    raw = _Input(stream)
    if raw.peek(len(GZIP_MAGIC)) != GZIP_MAGIC:
        yield from _iter_records(raw, raw.offset, offset_in_stream=True, max_record_bytes=max_record_bytes)
        return
    resync = False
    while True:
        gap_at = raw.offset
        excerpt, junk = raw.skip_to_gzip()
        if junk and not resync:
            yield WarcFault(gap_at, "corrupt_gzip", "bytes between gzip members", excerpt)
        if not raw.peek(1):
            return
        member = _GzipMember(raw)
        yield from _iter_records(member, member.start, offset_in_stream=False, max_record_bytes=max_record_bytes)
        if member.fault is None:
            resync = False
            continue
        yield member.fault
        if member.fault.reason == "truncated_gzip":
            return
        raw.seek(member.start + 1)  # look for the next member header after the broken one's
        resync = True


class _Input:
    """A binary file read in chunks: ``offset`` is the file offset of the next byte ``read`` hands out."""

    fault: WarcFault | None = None  # a plain file has no gzip faults

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.offset = handle.tell()
        self.pending = b""
        self.eof = False

    def read(self) -> bytes:
        """The next bytes of the file (about a chunk); b"" at its end."""
        data = self.pending
        if len(data) < _CHUNK and not self.eof:
            more = self.handle.read(_CHUNK)
            self.eof = not more
            data += more
        self.pending = b""
        self.offset += len(data)
        return data

    def unread(self, data: bytes) -> None:
        """Put bytes just read back in front of the rest of the file."""
        self.pending = data + self.pending
        self.offset -= len(data)

    def peek(self, size: int) -> bytes:
        data = self.read()
        self.unread(data)
        return data[:size]

    def seek(self, offset: int) -> None:
        self.handle.seek(offset)
        self.offset, self.pending, self.eof = offset, b"", False

    def skip_to_gzip(self) -> tuple[bytes, bool]:
        """Skip to the next gzip member header (or the end of the file). Return the first skipped bytes and
        whether any skipped byte was more than padding (NULs, blanks, line breaks)."""
        excerpt, junk = b"", False
        while data := self.read():
            at = data.find(GZIP_MAGIC)
            # keep a possible header start that a chunk boundary cut in two
            cut = at if at >= 0 else len(data) if self.eof else len(data) - len(GZIP_MAGIC) + 1
            skipped = data[:cut]
            excerpt += skipped[: 256 - len(excerpt)]
            junk = junk or bool(skipped.translate(None, _PADDING))
            self.unread(data[cut:])
            if at >= 0:
                break
        return excerpt, junk


class _GzipMember:
    """The inflated bytes of the gzip member that starts at the input's position, in pieces. A corrupt or
    truncated member ends the pieces early and leaves its fault in ``fault``."""

    def __init__(self, raw: _Input):
        self.raw = raw
        self.start = raw.offset
        self.inflater = isal_zlib.decompressobj(31)
        self.fault: WarcFault | None = None
        self.head = b""  # the first inflated bytes, for fault excerpts

    def read(self) -> bytes:
        inflater = self.inflater
        while not inflater.eof and self.fault is None:
            data = inflater.unconsumed_tail or self.raw.read()
            try:
                out = inflater.decompress(data, _PIECE) if data else inflater.flush()
            except isal_zlib.error as exc:
                self.fault = WarcFault(self.start, "corrupt_gzip", f"gzip member at byte {self.start}: {exc}",
                                       self.head)
                return b""
            if inflater.eof:
                self.raw.unread(inflater.unused_data)
            elif not data:
                self.fault = WarcFault(self.start, "truncated_gzip",
                                       f"gzip member at byte {self.start} ends before its end marker", self.head)
                return b""
            if out:
                if len(self.head) < 256:
                    self.head += out[: 256 - len(self.head)]
                return out
        return b""


class _Broken(Exception):
    """The inflated stream stopped at a gzip fault: what is left of the member is not parsed."""


class _Window:
    """The part of an inflated stream not parsed yet: ``data`` starts at stream offset ``offset``."""

    def __init__(self, source: _Input | _GzipMember):
        self.source = source
        self.data = bytearray()
        self.offset = 0
        self.eof = False

    def fill(self, size: int) -> bool:
        """Read until ``size`` bytes are held or the stream ends; True if they are held."""
        while len(self.data) < size and not self.eof:
            piece = self.source.read()
            if piece:
                self.data += piece
            elif self.source.fault is not None:
                raise _Broken()
            else:
                self.eof = True
        return len(self.data) >= size

    def more(self) -> bool:
        """Read one more piece; False at the end of the stream."""
        return self.fill(len(self.data) + 1)

    def drop(self, size: int) -> None:
        del self.data[:size]
        self.offset += size

    def take(self, start: int, end: int) -> bytes:
        with memoryview(self.data) as view:
            return bytes(view[start:end])

    def find(self, needle: bytes, start: int, limit: int) -> int:
        """The position of ``needle`` at or after ``start``, reading on; -1 if the stream ends (or ``limit``
        bytes are held) first."""
        while True:
            at = self.data.find(needle, start)
            if at >= 0:
                return at
            start = max(start, len(self.data) - len(needle) + 1)
            if len(self.data) > limit or not self.more():
                return -1

    def skip_to(self, needle: bytes, start: int) -> bool:
        """Drop everything before the first ``needle`` at or after ``start``; False (all dropped) if none."""
        while True:
            at = self.data.find(needle, start)
            if at >= 0:
                self.drop(at)
                return True
            keep = min(len(self.data), len(needle) - 1)
            self.drop(len(self.data) - keep)
            start = 0
            if not self.more():
                self.drop(len(self.data))
                return False

    def discard(self, size: int) -> bool:
        """Drop ``size`` bytes without holding them all; False if the stream ends first."""
        while len(self.data) < size:
            size -= len(self.data)
            self.drop(len(self.data))
            if not self.more():
                return False
        self.drop(size)
        return True


def _iter_records(source: _Input | _GzipMember, base: int, *, offset_in_stream: bool,
                  max_record_bytes: int) -> Iterator[WarcRecord | WarcFault]:
    """Cut an inflated WARC stream into records. ``base`` is the file offset of the stream."""
    win = _Window(source)
    try:
        yield from _cut_records(win, base, offset_in_stream, max_record_bytes)
    except _Broken:
        return  # the gzip fault is reported by the caller


def _cut_records(win: _Window, base: int, offset_in_stream: bool,
                 max_record_bytes: int) -> Iterator[WarcRecord | WarcFault]:
    data = win.data
    while True:
        pos = 0
        while True:  # blank lines between records
            while pos < len(data) and data[pos] in b"\r\n":
                pos += 1
            if pos < len(data) or not win.more():
                break
        win.drop(pos)
        if not data:
            return
        at = base + win.offset if offset_in_stream else base
        win.fill(5)
        if not data.startswith(b"WARC/"):
            yield WarcFault(at, "malformed_record", "expected a 'WARC/' version line", bytes(data[:256]))
            if not win.skip_to(b"\nWARC/", 0):
                return
            win.drop(1)
            continue
        head_end, sep = _header_end(win)
        if head_end < 0:
            if win.eof and len(data) < _MAX_HEADER:
                yield WarcFault(at, "truncated_record", "WARC header has no end", bytes(data[:256]))
                return
            yield WarcFault(at, "malformed_record", f"WARC header longer than {_MAX_HEADER} bytes",
                            bytes(data[:256]))
            if not win.skip_to(b"\nWARC/", 1):
                return
            win.drop(1)
            continue
        headers = parse_header_lines(bytes(data[:head_end]).replace(b"\r\n", b"\n").split(b"\n")[1:])
        try:
            length = int(headers.get("content-length", ""))
        except ValueError:
            length = -1
        if length < 0:
            yield WarcFault(at, "malformed_record", "missing or invalid Content-Length", bytes(data[:256]),
                            headers)
            if not win.skip_to(b"\nWARC/", head_end):
                return
            win.drop(1)
            continue
        block_start = head_end + sep
        if length > max_record_bytes:
            yield WarcFault(at, "too_large", f"record {headers.get('warc-record-id', '?')} has a {length} byte "
                            f"block > {max_record_bytes}", bytes(data[:256]), headers)
            if not win.discard(block_start + length):
                return
            continue
        block_end = block_start + length
        if _at_record_boundary(win, block_end):
            yield WarcRecord(at, headers, win.take(block_start, block_end))
            win.drop(block_end)
            continue
        # Content-Length disagrees with the file. Hand-edited and LF-only files do this; trust the next record
        # header when there is one, otherwise the record was cut off.
        nxt = win.find(b"\nWARC/1.", block_start, block_start + max_record_bytes + _MAX_HEADER)
        if nxt < 0 and not win.eof:
            yield WarcFault(at, "too_large", f"record {headers.get('warc-record-id', '?')} runs past "
                            f"{max_record_bytes} bytes without a next record", bytes(data[:256]), headers)
            if not win.skip_to(b"\nWARC/1.", block_start):
                return
            win.drop(1)
            continue
        if nxt < 0 and block_end <= len(data):
            nxt = len(data) - 1  # the stream goes on past the declared length: keep all of it
        if nxt < 0:
            yield WarcFault(at, "truncated_record", f"record {headers.get('warc-record-id', '?')} has "
                            f"{len(data) - block_start} of its {length} block bytes", bytes(data[:256]), headers)
            return
        headers["x-phi3data-length-mismatch"] = "1"
        yield WarcRecord(at, headers, win.take(block_start, nxt + 1).rstrip(b"\r\n"))
        win.drop(nxt + 1)


def _header_end(win: _Window) -> tuple[int, int]:
    """Where the header block at the start of the window ends, and the separator's length (CRLF or LF-only
    files); -1 if it does not end within ``_MAX_HEADER`` bytes or before the stream does."""
    data = win.data
    while True:
        crlf = data.find(b"\r\n\r\n", 0, _MAX_HEADER)
        lf = data.find(b"\n\n", 0, _MAX_HEADER)
        if lf >= 0 and (crlf < 0 or lf < crlf):
            return lf, 2
        if crlf >= 0:
            return crlf, 4
        if len(data) >= _MAX_HEADER or not win.more():
            return -1, 0


def _at_record_boundary(win: _Window, pos: int) -> bool:
    """True if ``pos`` is the end of the stream or, after line breaks, the start of the next record."""
    if not win.fill(pos):
        return False
    data = win.data
    while True:
        while pos < len(data) and data[pos] in b"\r\n":
            pos += 1
        if len(data) >= pos + 5 or not win.more():
            return pos == len(data) or data.startswith(b"WARC/", pos)


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
        # zlib, not isal, for these small bodies: isal's decompressobj returns nothing for a body with a broken
        # gzip header where zlib raises, and that error is what names the reject
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
