"""Input files: which files under a path are data, and a content key for each (the unit of exactly-once work)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import xxhash

from phi3data.io.readers import ARROW_SUFFIXES, JSONL_SUFFIXES, PARQUET_SUFFIXES, WARC_SUFFIXES

INPUT_SUFFIXES = WARC_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
# The image-text formats: which files under a directory are inputs (img2dataset's NAME.parquet / NAME_stats.json
# status files beside NAME.tar are not; the webdataset reader reads them with their tar).
FORMAT_SUFFIXES = {
    "llava": (".json",),
    "cauldron": PARQUET_SUFFIXES,
    "webdataset": (".tar", ".tar.gz", ".tgz"),
    "warc_images": WARC_SUFFIXES,
    "urls": (".txt", ".urls", ".lst") + JSONL_SUFFIXES + PARQUET_SUFFIXES,
    "records": PARQUET_SUFFIXES,
}
# Metadata beside the data (Hugging Face save_to_disk, our own run outputs) is not input.
METADATA_FILES = {"dataset_info.json", "state.json", "dataset_dict.json", "manifest.json", "stats.json"}


def input_suffixes(fmt: str = "auto") -> tuple[str, ...]:
    """The file name endings that are inputs of a recipe format (the text formats share one list)."""
    return FORMAT_SUFFIXES.get(fmt, INPUT_SUFFIXES)


def list_input_files(path: Path, what: str = "input", fmt: str = "auto") -> list[Path]:
    """A file, or every data file of format ``fmt`` under a directory (hidden, ``_``-prefixed and metadata
    skipped), sorted."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.is_file():
        return [path]
    suffixes = input_suffixes(fmt)
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and p.name.lower().endswith(suffixes) and p.name not in METADATA_FILES
                   and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))
    if not files:
        raise FileNotFoundError(f"no {what} files under {path} (looked for {', '.join(suffixes)})")
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


def plan_shards(input_path: Path, fmt: str = "auto", image_root: Path | None = None) -> list[InputShard]:
    """List input shards (a file, or every file of format ``fmt`` under a directory) with content keys, sorted.

    A key is the xxh3-128 of the file's bytes. A LLaVA JSON's images are files of their own (under
    ``image_root``, default the JSON's folder): its key also covers the bytes of every image it names, so a
    changed image makes a new shard rather than a stale reuse of the old output."""
    files = list_input_files(input_path, fmt=fmt)
    root = input_path.parent if input_path.is_file() else input_path
    shards = []
    for path in files:
        digest = xxhash.xxh3_128()
        _hash_file(path, digest)
        if fmt == "llava":
            digest = _with_llava_images(path, Path(image_root) if image_root else path.parent, digest)
        shards.append(InputShard(str(path.resolve()), path.relative_to(root).as_posix(), digest.hexdigest()))
    return shards


def _hash_file(path: Path, digest) -> None:
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)


def _with_llava_images(path: Path, image_root: Path, file_digest):
    """The key of a LLaVA JSON: its bytes' digest, then each distinct image path it names with that image's
    digest (or ``missing``: an image that appears later changes the key too), in sorted order."""
    from phi3data.multimodal.readers import llava_image_paths

    digest = xxhash.xxh3_128(file_digest.digest())
    for rel in sorted(set(llava_image_paths(path))):
        image = image_root / rel
        one = xxhash.xxh3_128()
        try:
            _hash_file(image, one)
            value = one.hexdigest()
        except OSError:
            value = "missing"
        digest.update(f"\n{rel}\t{value}".encode())
    return digest


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
