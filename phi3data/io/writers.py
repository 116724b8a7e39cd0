"""Atomic shard writers: a shard appears under its final name complete, or not at all."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"


def tmp_path_for(final: Path) -> Path:
    return final.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{final.name}")


def commit(tmp: Path, final: Path) -> None:
    """Make a finished temp file visible under its final name (fsync, then an atomic rename)."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)


class ShardWriter:
    """Write document batches into one Parquet or JSONL shard, atomically on ``close``."""

    def __init__(self, final: Path, fmt: str = "parquet", compression: str = "zstd"):
        if fmt not in ("parquet", "jsonl"):
            raise ValueError(f"unknown output format {fmt!r}: use parquet or jsonl")
        self.final = final
        self.fmt = fmt
        self.compression = compression
        self.tmp = tmp_path_for(final)
        self.rows = 0
        self._parquet: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self._jsonl = open(self.tmp, "w", encoding="utf-8") if fmt == "jsonl" else None

    def write(self, batch: pa.Table) -> None:
        if self.fmt == "jsonl":
            for row in batch.to_pylist():
                self._jsonl.write(json.dumps(_jsonable(row), ensure_ascii=False) + "\n")
        else:
            if self._parquet is None:
                self._schema = batch.schema
                self._parquet = pq.ParquetWriter(self.tmp, batch.schema, compression=self.compression)
            self._parquet.write_table(batch.cast(self._schema))
        self.rows += batch.num_rows

    def close(self, empty_schema: pa.Schema | None = None) -> Path:
        """Finish the shard; an empty shard still gets a file (with ``empty_schema``) so reruns see it done."""
        if self.fmt == "jsonl":
            self._jsonl.close()
        else:
            if self._parquet is None:
                schema = empty_schema if empty_schema is not None else pa.schema([])
                self._parquet = pq.ParquetWriter(self.tmp, schema, compression=self.compression)
            self._parquet.close()
        commit(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._parquet is not None:
            self._parquet.close()
        self.tmp.unlink(missing_ok=True)


def write_parquet_atomic(table: pa.Table, path: Path, compression: str = "zstd",
                         row_group_size: int | None = None) -> Path:
    """Write ``table`` as one parquet file at ``path`` atomically (no partial file is ever visible)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        pq.write_table(table, tmp, compression=compression, row_group_size=row_group_size)
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write text to ``path`` atomically (readers see all of it or the previous version)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    tmp.write_text(text, encoding="utf-8")
    commit(tmp, path)
    return path


def write_json_atomic(path: Path, obj, default=str) -> None:
    """Write JSON to ``path`` atomically; ``default`` converts values json cannot (numpy floats: pass float)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=default))


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Write rows as one JSONL file atomically (readers see all of it or the previous version)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    commit(tmp, path)


LOCK_FILE = ".phi3data.lock"


class OutputLocked(RuntimeError):
    """Another run is writing to the same output directory."""


@contextmanager
def output_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on an output directory for the duration of a run.

    A second run on the same directory fails at once instead of deleting the first run's temp files. The lock
    is an ``flock`` on a file inside the directory, so the kernel releases it when its process dies (even by
    ``kill -9``) and a rerun after a crash is never blocked by a stale lock.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise OutputLocked(f"{directory} is in use by another run ({holder}); wait for it to finish or choose "
                           f"another output directory") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def refuse_other_config(output: Path, config_hash: str, what: str, made_with: str = "another config") -> None:
    """Refuse to add to ``output`` when its ``manifest.json`` was made with another config: a rerun may only
    finish what the same config started."""
    manifest = output / "manifest.json"
    if not manifest.exists():
        return
    previous = str(json.loads(manifest.read_text()).get("config_hash"))
    if previous != config_hash:
        raise ValueError(f"{output} holds {what} made with {made_with} (hash {previous[:10]}, this one is "
                         f"{config_hash[:10]}); choose a new output directory")


def remove_stale_tmp(directory: Path) -> int:
    """Delete temp files a killed run left behind; returns how many."""
    removed = 0
    if directory.exists():
        for tmp in directory.rglob(f"{TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _jsonable(row: dict) -> dict:
    out = {}
    for key, value in row.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        out[key] = value
    return out
