"""The token shard format: flat token file, document index, optional loss mask, Megatron .idx, JSON manifest.

One shard is a group of files sharing a stem ``S``:

- ``S.bin``      token ids, flat little-endian ``uint16`` (vocabulary <= 65,536) or ``uint32``;
- ``S.offsets``  document end offsets in tokens, little-endian ``uint64`` (document i is
                 ``tokens[offsets[i-1]:offsets[i]]``, with offsets[-1] = 0);
- ``S.mask``     optional loss mask, one ``uint8`` per token (1 = train on this token), for chat/SFT data;
- ``S.idx``      a Megatron-LM ``MMapIndexedDataset`` index over the same ``S.bin`` (one sequence per document),
                 so Megatron's ``IndexedDataset("S")`` reads our shards unchanged; ``uint32`` tokens are declared
                 as Megatron's int32 (identical bytes, every id < 2**31);
- ``S.json``     the shard's manifest (tokenizer identity and hash, dtype, counts, sources), written last: its
                 presence marks the shard finished.

A directory of shards has a ``manifest.json`` with the totals; readers (``tokenization.dataset``) open each shard
through its own ``S.json``.
``export_llmc`` writes llm.c's ``.bin`` (a 256 x int32 header, then the tokens).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phi3data.io.writers import commit, tmp_path_for, write_json_atomic

SHARD_FORMAT = "phi3data-tokens"
SHARD_VERSION = 1
SUFFIXES = (".bin", ".offsets", ".mask", ".idx")

MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_VERSION = 1
# Megatron-LM's DType codes; uint32 has none, its int32 code reads the same bytes for ids below 2**31.
MEGATRON_CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7,
                  "uint16": 8, "uint32": 4}

LLMC_MAGIC = {"uint16": 20240520, "uint32": 20240801}  # llm.c: GPT-2 style (uint16) and Llama-3 style (uint32)
LLMC_VERSION = {"uint16": 1, "uint32": 7}
LLMC_HEADER_INTS = 256


class TokenShardWriter:
    """Append documents to one shard; files appear under their final names on ``close``, atomically."""

    def __init__(self, stem: Path, dtype: np.dtype, *, with_mask: bool = False):
        self.stem = Path(stem)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.with_mask = with_mask
        self.finals = {s: self.stem.with_name(self.stem.name + s) for s in (".bin", ".offsets", ".mask")}
        if not with_mask:
            del self.finals[".mask"]
        self.tmps = {s: tmp_path_for(p) for s, p in self.finals.items()}
        self.handles = {s: open(p, "wb") for s, p in self.tmps.items()}
        self.tokens = 0
        self.ends: list[np.ndarray] = []
        self.documents = 0

    def write_flat(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append several documents at once: their tokens back to back and each one's length."""
        if len(tokens) != int(lengths.sum()):
            raise ValueError("tokens and document lengths disagree")
        self.handles[".bin"].write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        if self.with_mask:
            if mask is None or len(mask) != len(tokens):
                raise ValueError("this shard has a loss mask: pass one value per token")
            self.handles[".mask"].write(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
        self.ends.append(self.tokens + np.cumsum(lengths, dtype=np.uint64))
        self.tokens += int(len(tokens))
        self.documents += int(len(lengths))

    def write(self, tokens, mask=None) -> None:
        """Append one document."""
        tokens = np.asarray(tokens)
        self.write_flat(tokens, np.asarray([len(tokens)], dtype=np.uint64),
                        None if mask is None else np.asarray(mask))

    def close(self, manifest: dict) -> dict:
        """Write offsets, the Megatron index and the shard manifest; rename everything into place."""
        ends = np.concatenate(self.ends) if self.ends else np.zeros(0, np.uint64)
        self.handles[".offsets"].write(ends.astype("<u8").tobytes())
        for handle in self.handles.values():
            handle.close()
        idx_final = self.stem.with_name(self.stem.name + ".idx")
        idx_tmp = tmp_path_for(idx_final)
        write_megatron_index(idx_tmp, ends, self.dtype)
        for suffix, tmp in self.tmps.items():
            commit(tmp, self.finals[suffix])
        commit(idx_tmp, idx_final)
        manifest = {"format": SHARD_FORMAT, "version": SHARD_VERSION, "dtype": self.dtype.name,
                    "tokens": self.tokens, "documents": self.documents, "has_mask": self.with_mask, **manifest}
        write_json_atomic(self.stem.with_name(self.stem.name + ".json"), manifest)
        return manifest

    def abort(self) -> None:
        for handle in self.handles.values():
            handle.close()
        for tmp in self.tmps.values():
            tmp.unlink(missing_ok=True)


def write_megatron_index(path: Path, ends: np.ndarray, dtype: np.dtype) -> None:
    """Megatron ``MMapIndexedDataset`` index for documents with these token end offsets (one sequence each)."""
    dtype = np.dtype(dtype)
    lengths = np.diff(np.concatenate([[0], ends.astype(np.int64)]))
    if len(lengths) and lengths.max() > np.iinfo(np.int32).max:
        raise ValueError("a document longer than 2**31 tokens cannot be indexed for Megatron")
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) * dtype.itemsize
    doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)
    with open(path, "wb") as handle:
        handle.write(MEGATRON_MAGIC)
        handle.write(struct.pack("<Q", MEGATRON_VERSION))
        handle.write(struct.pack("<B", MEGATRON_CODES[dtype.name]))
        handle.write(struct.pack("<Q", len(lengths)))
        handle.write(struct.pack("<Q", len(doc_idx)))
        handle.write(lengths.astype("<i4").tobytes())
        handle.write(pointers.astype("<i8").tobytes() if len(lengths) else b"")
        handle.write(doc_idx.astype("<i8").tobytes())


@dataclass
class TokenShard:
    """One finished shard, memory-mapped."""

    stem: Path
    manifest: dict
    tokens: np.ndarray
    ends: np.ndarray
    mask: np.ndarray | None

    @classmethod
    def open(cls, stem: Path | str) -> TokenShard:
        stem = Path(stem)
        if stem.suffix in SUFFIXES + (".json",):
            stem = stem.with_suffix("")
        manifest_path = stem.with_name(stem.name + ".json")
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path} is missing: the shard {stem} is unfinished or not a shard")
        manifest = json.loads(manifest_path.read_text())
        dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        tokens = memmap_tokens(stem.with_name(stem.name + ".bin"), dtype)
        ends = memmap_tokens(stem.with_name(stem.name + ".offsets"), np.dtype("<u8"))
        mask = memmap_tokens(stem.with_name(stem.name + ".mask"), np.dtype("u1")) if manifest.get("has_mask") else None
        if len(tokens) != manifest["tokens"] or len(ends) != manifest["documents"]:
            raise ValueError(f"shard {stem} does not match its manifest (truncated or overwritten files)")
        return cls(stem, manifest, tokens, ends, mask)

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], self.ends[:-1]]).astype(np.int64)

    def document(self, i: int) -> np.ndarray:
        start = int(self.ends[i - 1]) if i > 0 else 0
        return np.asarray(self.tokens[start:int(self.ends[i])])

    def documents(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.document(i)


def memmap_tokens(path: Path, dtype) -> np.ndarray:
    """A read-only little-endian memory map of a flat token (or mask) file; an empty file gives an empty array."""
    dtype = np.dtype(dtype).newbyteorder("<")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def list_shards(directory: Path) -> list[Path]:
    """Stems of the finished shards in a directory (those with a ``.json`` manifest), sorted by name."""
    return sorted(p.with_suffix("") for p in Path(directory).glob("*.json")
                  if p.name != "manifest.json" and not p.name.startswith("."))


def open_shards(directory: Path) -> list[TokenShard]:
    return [TokenShard.open(stem) for stem in list_shards(directory)]


def export_llmc(source: Path, out: Path) -> dict:
    """Write every token of a shard directory (or one shard) into llm.c's ``.bin``: 256 x int32 header + ids.

    uint16 vocabularies use llm.c's GPT-2 header (magic 20240520, version 1); uint32 ones its Llama-3 header
    (magic 20240801, version 7). Header word 2 holds the token count.
    """
    source = Path(source)
    shards = open_shards(source) if source.is_dir() else [TokenShard.open(source)]
    if not shards:
        raise FileNotFoundError(f"no finished token shards in {source}")
    dtypes = {s.tokens.dtype.name for s in shards}
    if len(dtypes) != 1:
        raise ValueError(f"{source} mixes token dtypes {sorted(dtypes)}")
    dtype = dtypes.pop()
    total = sum(len(s.tokens) for s in shards)
    if total > np.iinfo(np.int32).max:
        raise ValueError(f"{total} tokens do not fit llm.c's int32 token count; export fewer shards per file")
    header = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = LLMC_MAGIC[dtype], LLMC_VERSION[dtype], total
    tmp = tmp_path_for(out)
    with open(tmp, "wb") as handle:
        handle.write(header.tobytes())
        for shard in shards:
            handle.write(np.asarray(shard.tokens).tobytes())
    commit(tmp, out)
    return {"path": str(out), "tokens": total, "dtype": dtype, "magic": int(header[0]), "version": int(header[1])}
