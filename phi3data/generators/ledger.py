"""The ledger of a generation run: one JSON line per answered or failed request, appended as replies arrive.

The ledger is the source of truth of ``phi3data generate``. Each writer (a process, or a Ray actor per endpoint)
appends to its own file under ``OUTPUT/ledger/``, flushing every line, so a run killed at any moment loses at most
the line being written; that line is unreadable, the reader counts it and the request is sent again. Reading takes,
per request key, an ``ok`` row if there is one (the reply), else the last ``failed`` row (its error class).
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from phi3data.io.readers import read_objects

LEDGER_DIR = "ledger"
MAX_ROW_BYTES = 1 << 26


@dataclass
class LedgerState:
    """What the ledger holds: the row kept for each request key, and the lines it could not read."""

    rows: dict[str, dict] = field(default_factory=dict)
    unreadable: Counter = field(default_factory=Counter)

    def answered(self) -> set[str]:
        return {key for key, row in self.rows.items() if row["status"] == "ok"}


def read_ledger(output: Path) -> LedgerState:
    """Every ledger file under ``output``: per key the ``ok`` row (first one wins), else the last failure."""
    state = LedgerState()
    for path in sorted((output / LEDGER_DIR).glob("*.jsonl")):
        for item in read_objects(path, fmt="jsonl", source=path.name, max_record_bytes=MAX_ROW_BYTES):
            if isinstance(item, dict):  # a line cut short by a kill: that request is sent again
                state.unreadable[item["reason"]] += 1
                continue
            if not isinstance(item.obj, dict) or "key" not in item.obj or "status" not in item.obj:
                state.unreadable["malformed_row"] += 1
                continue
            row = item.obj
            kept = state.rows.get(row["key"])
            if kept is None or kept["status"] != "ok":  # a reply is final; a failure gives way to a later row
                state.rows[row["key"]] = row
    return state


class LedgerWriter:
    """Appends rows to this writer's own ledger file; every row is flushed, and fsynced every ``sync_every``."""

    def __init__(self, output: Path, sync_every: int = 64, folder: str = LEDGER_DIR):
        directory = output / folder
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._handle = open(self.path, "a", encoding="utf-8")
        self._sync_every = sync_every
        self._unsynced = 0
        self.rows = 0

    def append(self, row: dict) -> None:
        self._handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        self._handle.flush()
        self.rows += 1
        self._unsynced += 1
        if self._unsynced >= self._sync_every:
            os.fsync(self._handle.fileno())
            self._unsynced = 0

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
        if self.rows == 0:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ledger_lines(output: Path) -> Iterator[str]:
    """Every raw line of the ledger (for tests and audits)."""
    for path in sorted((output / LEDGER_DIR).glob("*.jsonl")):
        yield from path.read_text(encoding="utf-8").splitlines()
