"""Atomic writers of image-text records: WebDataset tar shards and parquet with image bytes.

A file appears under its final name complete or not at all (a temp file, fsync, then a rename:
:func:`phi3data.io.writers.tmp_path_for` / :func:`phi3data.io.writers.commit`).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa

from phi3data.io.writers import commit, tmp_path_for, write_parquet_atomic
from phi3data.multimodal.records import IMAGE_PLACEHOLDER, record_kind, sniff_image_type

CAULDRON_SCHEMA = pa.schema([
    pa.field("images", pa.list_(pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())]))),
    pa.field("texts", pa.list_(pa.struct([pa.field("user", pa.string()), pa.field("assistant", pa.string()),
                                          pa.field("source", pa.string())]))),
])


def write_parquet(table: pa.Table, path: Path, compression: str = "zstd") -> Path:
    """Write a record table (any kind, image bytes in binary columns) as one parquet file, atomically."""
    record_kind(table)
    return write_parquet_atomic(table, path, compression)


class TarShardWriter:
    """Add WebDataset samples (KEY.ext members) to one tar shard; it appears under its name on ``close``."""

    def __init__(self, final: Path):
        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp_path_for(self.final)
        self._tar = tarfile.open(self.tmp, "w")
        self.samples = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: ``members`` maps an extension (``jpg``, ``txt``, ``json``) to its bytes."""
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> Path:
        self._tar.close()
        commit(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        self._tar.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def write_webdataset(table: pa.Table, path: Path) -> Path:
    """Write pair (or image) records as a WebDataset tar: KEY.<ext> image, KEY.txt caption, KEY.json metadata.

    The key is the record's ``metadata["key"]`` when it has one (as pairs read from a tar do), otherwise its
    position; the extension is the one the image's magic bytes name (``jpg`` when unknown)."""
    kind = record_kind(table)
    if kind not in ("pair", "image"):
        raise ValueError(f"write_webdataset writes pairs or images, not {kind} records")
    with TarShardWriter(Path(path)) as writer:
        for index, row in enumerate(table.to_pylist()):
            meta = json.loads(row["metadata"]) if row.get("metadata") else {}
            key = str(meta.get("key") or f"{index:09d}")
            ext = meta.get("ext") or sniff_image_type(row["image"]) or "jpg"
            meta = dict(meta, key=key, ext=ext)
            if row.get("url") is not None:
                meta.setdefault("url", row["url"])
            members = {ext: row["image"]}
            if kind == "pair" and row.get("text") is not None:
                members["txt"] = row["text"].encode("utf-8")
            members["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
            writer.add(key, members)
    return Path(path)


def write_cauldron(table: pa.Table, path: Path) -> Path:
    """Write conversations in the_cauldron's parquet layout (the inverse of ``read_cauldron``): the leading image
    placeholders of the first user turn become the ``images`` list, user/assistant message pairs the ``texts``."""
    if record_kind(table) != "conversation":
        raise ValueError("write_cauldron writes conversation records")
    images_col, texts_col = [], []
    for row in table.to_pylist():
        meta = json.loads(row["metadata"]) if row.get("metadata") else {}
        paths = meta.get("image_paths") or [None] * len(row["images"])
        origins = meta.get("text_sources") or []
        messages = [m for m in row["messages"] if m["role"] != "system"]
        texts = []
        for i in range(0, len(messages), 2):
            user = messages[i]["content"] or ""
            if i == 0:
                user = user[len(IMAGE_PLACEHOLDER) * len(row["images"]):] if user.startswith(
                    IMAGE_PLACEHOLDER * len(row["images"])) else user.replace(IMAGE_PLACEHOLDER, "")
            assistant = messages[i + 1]["content"] if i + 1 < len(messages) else ""
            texts.append({"user": user, "assistant": assistant,
                          "source": origins[i // 2] if i // 2 < len(origins) else None})
        images_col.append([{"bytes": b, "path": p} for b, p in zip(row["images"], paths)])
        texts_col.append(texts)
    out = pa.table({"images": images_col, "texts": texts_col}, schema=CAULDRON_SCHEMA)
    return write_parquet_atomic(out, path)

