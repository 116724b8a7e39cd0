"""Fetch the images of a URL list (img2dataset-like) into WebDataset tar shards plus a per-URL status table.

HTTP is httpx (a thread-safe, pooled ``httpx.Client`` shared by a thread pool). Politeness is per host: at most
``per_host`` requests in flight to one host and at least ``min_delay`` seconds between request starts to it.
Redirects are followed by the fetcher up to ``max_redirects`` (each hop waits for its own host's turn);
connection errors, timeouts, truncated bodies, 429 and 5xx are retried with exponential backoff (a
``Retry-After`` header, seconds or an HTTP date, replaces the backoff, capped at ``max_backoff``).

Opt-out headers are respected by default, following img2dataset's documented default: a response whose
``X-Robots-Tag`` holds ``noai``, ``noimageai``, ``noindex`` or ``noimageindex`` (unscoped, or scoped to our
user-agent token ``phi3data``) is not stored and gets status ``opt_out``; pass ``disallowed_directives=()`` to
turn this off.

Exactly once: each run writes ``fetch-NNNNN.tar`` and then, as its commit marker, ``fetch-NNNNN.status.parquet``
(url, key, status, http_code, error, bytes, sha256, final_url, attempts, content_type). A rerun reads every
committed status table, never fetches a URL that succeeded (or opted out) again, fetches URLs never attempted,
and with ``retry_failed`` also the failed ones. A tar without its status table (a crashed run) is deleted.
``status.parquet`` is the merged view (the latest row per URL), rewritten at the end of each run.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from phi3data.io.writers import output_lock, write_parquet_atomic
from phi3data.multimodal.records import sniff_image_type
from phi3data.multimodal.writers import TarShardWriter

USER_AGENT_TOKEN = "phi3data"
USER_AGENT = f"Mozilla/5.0 (compatible; {USER_AGENT_TOKEN}/0.1; image-text dataset builder)"
DEFAULT_DISALLOWED = ("noai", "noimageai", "noindex", "noimageindex")

STATUS_SCHEMA = pa.schema([
    pa.field("url", pa.string()), pa.field("key", pa.string()), pa.field("caption", pa.large_string()),
    pa.field("status", pa.string()), pa.field("http_code", pa.int32()), pa.field("error", pa.string()),
    pa.field("bytes", pa.int64()), pa.field("sha256", pa.string()), pa.field("final_url", pa.string()),
    pa.field("attempts", pa.int32()), pa.field("content_type", pa.string()), pa.field("shard", pa.string()),
])
MERGED_STATUS = "status.parquet"


@dataclass
class FetchConfig:
    workers: int = 16
    per_host: int = 4
    min_delay: float = 0.0
    timeout: float = 10.0
    retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_redirects: int = 5
    max_bytes: int = 32 << 20
    disallowed_directives: tuple[str, ...] = DEFAULT_DISALLOWED
    user_agent: str = USER_AGENT


@dataclass
class FetchResult:
    """What one run did: the status rows it wrote, the shard and status files it committed."""

    rows: list[dict] = field(default_factory=list)
    shard: Path | None = None
    status_path: Path | None = None
    skipped: int = 0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            out[row["status"]] = out.get(row["status"], 0) + 1
        return out


class HostGate:
    """Per-host politeness: a concurrency cap and a minimum delay between request starts."""

    def __init__(self, per_host: int, min_delay: float):
        self.per_host, self.min_delay = per_host, min_delay
        self._lock = threading.Lock()
        self._sems: dict[str, threading.Semaphore] = {}
        self._next: dict[str, float] = {}

    def acquire(self, host: str) -> None:
        with self._lock:
            sem = self._sems.setdefault(host, threading.Semaphore(self.per_host))
        sem.acquire()
        if self.min_delay > 0:
            with self._lock:
                now = time.monotonic()
                start = max(now, self._next.get(host, now))
                self._next[host] = start + self.min_delay
            if start > now:
                time.sleep(start - now)

    def release(self, host: str) -> None:
        self._sems[host].release()


def opt_out_directive(header_values: Iterable[str], disallowed: Iterable[str]) -> str | None:
    """The first disallowed ``X-Robots-Tag`` directive that applies to us (unscoped or scoped to
    ``phi3data``), or None."""
    disallowed = {d.lower() for d in disallowed}
    if not disallowed:
        return None
    for value in header_values:
        for part in value.split(","):
            part = part.strip().lower()
            if ":" in part:
                bot, _, part = part.partition(":")
                if bot.strip() not in (USER_AGENT_TOKEN, "*"):
                    continue
            if part.strip() in disallowed:
                return part.strip()
    return None


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header value (seconds or an HTTP date) in seconds from now; None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def fetch_one(client, gate: HostGate, url: str, cfg: FetchConfig) -> dict:
    """Fetch one URL with retries; return its status row (without key/caption/shard) and ``data`` bytes.

    Redirects are followed here (the client does not), so every hop waits for its own host's gate."""
    import httpx

    row = {"url": url, "status": "failed", "http_code": None, "error": None, "bytes": None, "sha256": None,
           "final_url": None, "attempts": 0, "content_type": None, "data": None}
    for attempt in range(1, cfg.retries + 2):
        row["attempts"] = attempt
        try:
            retry, wait = _attempt(client, gate, url, cfg, row)
        except httpx.TransportError as exc:  # connection errors, timeouts, truncated bodies
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            retry, wait = True, None
        except httpx.HTTPError as exc:  # an invalid URL or redirect target
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            retry, wait = False, None
        if not retry or attempt > cfg.retries:
            return row
        delay = cfg.backoff * 2 ** (attempt - 1) if wait is None else wait
        time.sleep(min(delay, cfg.max_backoff))
    return row


def _attempt(client, gate: HostGate, url: str, cfg: FetchConfig, row: dict) -> tuple[bool, float | None]:
    """One try, redirects included: fill ``row``; return whether to retry and the server's Retry-After."""
    current = url
    for _hop in range(cfg.max_redirects + 1):
        host = urlsplit(current).netloc.lower()
        gate.acquire(host)
        try:
            with client.stream("GET", current) as response:
                code = response.status_code
                row.update(http_code=code, final_url=str(response.url), error=None,
                           content_type=response.headers.get("content-type"))
                if response.is_redirect:
                    target = urljoin(str(response.url), response.headers["location"])
                    if not target.lower().startswith(("http://", "https://")):
                        row["error"] = f"bad_redirect: {target[:200]}"
                        return False, None
                    current = target
                    continue
                if code == 429 or code >= 500:
                    row["error"] = f"HTTP {code}"
                    return True, retry_after_seconds(response.headers.get("retry-after"))
                if code != 200:
                    row["error"] = f"HTTP {code}"
                    return False, None
                directive = opt_out_directive(response.headers.get_list("x-robots-tag"), cfg.disallowed_directives)
                if directive:
                    row.update(status="opt_out", error=f"X-Robots-Tag: {directive}")
                    return False, None
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > cfg.max_bytes:
                        row["error"] = f"too_large: over {cfg.max_bytes} bytes"
                        return False, None
                    chunks.append(chunk)
        finally:
            gate.release(host)
        data = b"".join(chunks)
        mime = (row["content_type"] or "").split(";")[0].strip().lower()
        if not data:
            row["error"] = "empty_body"
        elif not mime.startswith("image/") and sniff_image_type(data) is None:
            row["error"] = f"not_an_image: content type {mime!r}"
        else:
            row.update(status="success", bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), data=data)
        return False, None
    row.update(error=f"too_many_redirects: more than {cfg.max_redirects}", http_code=None)
    return False, None


def read_status(output: Path) -> pa.Table:
    """Every committed status row of an output directory (all runs, oldest first)."""
    output = Path(output)
    tables = [pq.read_table(p).cast(STATUS_SCHEMA) for p in sorted(output.glob("fetch-*.status.parquet"))]
    return pa.concat_tables(tables) if tables else STATUS_SCHEMA.empty_table()


def latest_status(output: Path) -> dict[str, dict]:
    """The latest status row per URL."""
    return {row["url"]: row for row in read_status(output).to_pylist()}


def fetch_urls(urls: pa.Table, output: Path, *, retry_failed: bool = False,
               config: FetchConfig | None = None) -> FetchResult:
    """Fetch a URL table (``key``, ``url``, ``text`` caption: :func:`read_url_list`'s records) into ``output``.

    Successes go to this run's ``fetch-NNNNN.tar`` (KEY.<ext> image, KEY.txt caption, KEY.json status); every
    URL attempted gets a status row. URLs that succeeded or opted out in an earlier run are never fetched again;
    failed ones are fetched again only with ``retry_failed``."""
    output = Path(output)
    with output_lock(output):  # a second run on the same directory fails at once
        return _fetch_locked(urls, output, retry_failed, config or FetchConfig())


def _fetch_locked(urls: pa.Table, output: Path, retry_failed: bool, cfg: FetchConfig) -> FetchResult:
    import httpx

    for tar in output.glob("fetch-*.tar"):  # a crashed run's shard has no status table: it never happened
        if not tar.with_name(tar.stem + ".status.parquet").exists():
            tar.unlink()
    done = latest_status(output)
    todo, skipped = [], 0
    for row in urls.to_pylist():
        prev = done.get(row["url"])
        if prev is not None and (prev["status"] != "failed" or not retry_failed):
            skipped += 1
            continue
        todo.append(row)
    result = FetchResult(skipped=skipped)
    if not todo:
        return result
    run = len(list(output.glob("fetch-*.status.parquet")))
    shard = output / f"fetch-{run:05d}.tar"
    status_path = output / f"fetch-{run:05d}.status.parquet"
    gate = HostGate(cfg.per_host, cfg.min_delay)
    limits = httpx.Limits(max_connections=cfg.workers * 2, max_keepalive_connections=cfg.workers)
    with httpx.Client(follow_redirects=False, timeout=cfg.timeout,
                      headers={"User-Agent": cfg.user_agent}, limits=limits) as client, \
            ThreadPoolExecutor(max_workers=cfg.workers) as pool, TarShardWriter(shard) as writer:
        futures = {pool.submit(fetch_one, client, gate, row["url"], cfg): row for row in todo}
        for future in as_completed(futures):
            src = futures[future]
            row = future.result()
            data = row.pop("data")
            row.update(key=src["key"], caption=src.get("text"), shard=None)
            if data is not None:
                row["shard"] = shard.name
                ext = sniff_image_type(data) or "jpg"
                meta = {k: row[k] for k in ("url", "key", "caption", "status", "http_code", "sha256",
                                             "final_url", "content_type")}
                members = {ext: data}
                if src.get("text") is not None:
                    members["txt"] = src["text"].encode("utf-8")
                members["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
                writer.add(src["key"], members)
            result.rows.append(row)
    result.rows.sort(key=lambda r: r["key"])
    table = pa.Table.from_pylist(result.rows, schema=STATUS_SCHEMA)
    write_parquet_atomic(table, status_path)  # the run's commit marker, after its shard
    write_parquet_atomic(pa.Table.from_pylist(sorted(latest_status(output).values(), key=lambda r: r["key"]),
                                       schema=STATUS_SCHEMA), output / MERGED_STATUS)
    result.shard, result.status_path = shard, status_path
    return result


