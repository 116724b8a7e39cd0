"""An on-disk cache of LLM requests and replies, so a rerun sends nothing twice.

A request's key is the SHA-256 of the server's base URL, the endpoint, and the full JSON payload (model, prompt or
messages, every sampling parameter), canonically serialised: the same prompt sent to another server (another
model behind the same name, another quantisation) is another request. Replies live in one SQLite file; SQLite
makes concurrent writers from several processes safe and a killed run loses at most the reply in flight.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path


def request_key(base_url: str, endpoint: str, payload: dict) -> str:
    """A stable key for one request: server base URL + endpoint + canonical JSON payload (model, prompt,
    parameters). The URL is normalised (scheme and host lower case, no trailing slash)."""
    blob = json.dumps({"server": normalise_base_url(base_url), "endpoint": endpoint.strip("/"), "payload": payload},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def normalise_base_url(base_url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(base_url.strip())
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), parts.query, ""))


class RequestCache:
    """Maps request keys to the JSON reply the server gave."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL)")
        self._db.commit()

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, reply: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO replies (key, reply) VALUES (?, ?)",
                             (key, json.dumps(reply, ensure_ascii=False)))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
