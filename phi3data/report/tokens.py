"""The report of token shards (``phi3data tokenize`` or ``phi3data mix`` output): tokens per source and phase,
document lengths, mixture proportions and repetition."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import xxhash

from phi3data.report import svg
from phi3data.report.rows import read_json
from phi3data.tokenization.shards import open_shards

HASH_DOCS = 200_000
"""Documents hashed per directory to count repeats (identical token sequences); more are left out and said so."""



def token_dirs(directory: Path) -> list[Path]:
    """The directory itself when it holds shards, else each sub-directory that does (mix phases, several sources)."""
    manifest = directory / "manifest.json"
    if manifest.is_file() and read_json(manifest).get("format") == "phi3data-tokens":
        return [directory]
    return [sub for sub in sorted(directory.iterdir())
            if read_json(sub / "manifest.json", {}).get("format") == "phi3data-tokens"]


def _lengths_and_repeats(directory: Path) -> tuple[np.ndarray, int, int, int]:
    """Document lengths in tokens over every shard; documents hashed, repeated documents, repeated tokens."""
    lengths, seen, hashed, repeated_docs, repeated_tokens = [], set(), 0, 0, 0
    for shard in open_shards(directory):
        ends, starts, tokens = np.asarray(shard.ends, dtype=np.int64), shard.starts, shard.tokens
        lengths.append(ends - starts)
        if hashed >= HASH_DOCS or not len(ends):
            continue
        for start, end in zip(starts[:HASH_DOCS - hashed], ends[:HASH_DOCS - hashed]):
            digest = xxhash.xxh3_64_intdigest(tokens[start:end].tobytes())
            if digest in seen:
                repeated_docs += 1
                repeated_tokens += int(end - start)
            seen.add(digest)
            hashed += 1
    return (np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)), hashed, repeated_docs, repeated_tokens


def build(directory: Path) -> dict:
    parts = []
    per_source: Counter = Counter()
    all_lengths = []
    for sub in token_dirs(directory):
        manifest = read_json(sub / "manifest.json")
        lengths, hashed, repeated_docs, repeated_tokens = _lengths_and_repeats(sub)
        all_lengths.append(lengths)
        if "mix" in manifest:  # a mix phase: its report rows
            name = manifest.get("phase", sub.name)
            sources = manifest.get("sources", [])
            for row in sources:
                per_source[row["source"]] += row["tokens"]
            mixture = svg.hbars([(r["source"], round(100 * r.get("share", 0), 2)) for r in sources],
                                title="share of the phase's tokens, %")
        else:
            name = sub.name if sub != directory else manifest.get("config", {}).get("tokenizer", sub.name)
            sources = [{"source": k, "tokens": v["tokens"], "documents": v["documents"], "shards": v.get("shards")}
                       for k, v in sorted(manifest.get("sources", {}).items())]
            for row in sources:
                per_source[row["source"]] += row["tokens"]
            mixture = None
        counts, edges = svg.bins([math.log10(max(int(v), 1)) for v in lengths], 30) if len(lengths) else ([], [0, 1])
        parts.append({
            "name": name, "path": str(sub), "is_mix": "mix" in manifest, "manifest": manifest,
            "tokens": int(manifest.get("tokens", int(lengths.sum()))), "documents": int(manifest.get("documents",
                                                                                               len(lengths))),
            "shard_tokens": int(lengths.sum()), "shard_documents": int(len(lengths)),
            "sources": sources, "mixture": mixture, "rejects": manifest.get("rejects", {}),
            "tokenizer": manifest.get("tokenizer") or {"hash": manifest.get("tokenizer_hash")},
            "lengths": svg.histogram([("documents", counts)], edges, xlabel="log10(tokens per document)")
            if counts else None,
            "median_length": int(np.median(lengths)) if len(lengths) else None,
            "hashed": hashed, "repeated_docs": repeated_docs, "repeated_tokens": repeated_tokens,
        })
    return {"kind": "tokens", "directory": str(directory), "parts": parts,
            "total_tokens": sum(p["tokens"] for p in parts), "total_documents": sum(p["documents"] for p in parts),
            "per_source": svg.hbars(per_source.most_common(), title="tokens by source") if per_source else None,
            "per_phase": svg.hbars([(p["name"], p["tokens"]) for p in parts], title="tokens by phase / directory")}
