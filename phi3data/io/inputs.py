"""Input files: which files under a path are data, and a content key for each (the unit of exactly-once work)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import xxhash

from phi3data.io.readers import ARROW_SUFFIXES, JSONL_SUFFIXES, PARQUET_SUFFIXES, WARC_SUFFIXES

INPUT_SUFFIXES = WARC_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
# Metadata beside the data (Hugging Face save_to_disk, our own run outputs) is not input.
METADATA_FILES = {"dataset_info.json", "state.json", "dataset_dict.json", "manifest.json", "stats.json"}


def list_input_files(path: Path, what: str = "input") -> list[Path]:
    """A file, or every readable data file under a directory (hidden, ``_``-prefixed and metadata skipped), sorted."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and p.name.lower().endswith(INPUT_SUFFIXES) and p.name not in METADATA_FILES
                   and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))
    if not files:
        raise FileNotFoundError(f"no {what} files under {path} (looked for {', '.join(INPUT_SUFFIXES)})")
    return files


@dataclass(frozen=True)
class InputShard:
    """One unit of work: an input file, its path relative to the input root, and a content key."""

    path: str
    relpath: str
    key: str

    def output_stem(self, recipe_hash: str) -> str:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", self.relpath)
        return f"{stem}-{self.key[:10]}-{recipe_hash[:10]}"


def plan_shards(input_path: Path) -> list[InputShard]:
    """List input shards (a file, or every readable file under a directory) with content keys, sorted."""
    files = list_input_files(input_path)
    root = input_path.parent if input_path.is_file() else input_path
    shards = []
    for path in files:
        digest = xxhash.xxh3_128()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        shards.append(InputShard(str(path.resolve()), path.relative_to(root).as_posix(), digest.hexdigest()))
    return shards


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
