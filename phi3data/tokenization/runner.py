"""Tokenize input files into token shards with any engine, exactly once.

The unit of work is one input file (a ``phi3data run`` output shard, or any JSONL/Parquet/Arrow file with a text
column). Its shard stem derives from the input's content key and the tokenization config hash (which includes
the tokenizer's identity hash), its files are written atomically, and its ``.json`` manifest is written last; a
rerun skips inputs whose shard manifest exists, so local, Ray and Spark runs, interrupted or not, give the same
bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phi3data.engines import default_workers, map_shards
from phi3data.engines.progress import drain
from phi3data.io.inputs import plan_shards
from phi3data.io.readers import detect_format, read_objects, read_records
from phi3data.io.writers import (
    commit,
    output_lock,
    refuse_other_config,
    remove_stale_tmp,
    tmp_path_for,
    write_json_atomic,
)
from phi3data.tokenization.chat import ChatFormatError, encode_chat
from phi3data.tokenization.shards import SHARD_FORMAT, SHARD_VERSION, TokenShardWriter, list_shards
from phi3data.tokenization.tokenizers import get_tokenizer, sanitize

CHUNK_CHARS = 256_000  # characters per encoding task: fewer hand-overs between threads; files share the stream
WRITE_TOKENS = 1 << 20  # tokens buffered before a write to the shard files


@dataclass(frozen=True)
class TokenizeConfig:
    """What decides the tokens (and therefore the shard names); threads and engine do not."""

    tokenizer: str = "phi3-mini"
    text_key: str = "text"
    id_key: str = "id"
    add_bos: bool = False
    add_eos: bool = True
    max_document_chars: int = 5_000_000
    max_document_tokens: int | None = None
    chat: bool = False
    messages_key: str = "messages"
    pair_side: str | None = None
    """Preference pairs (``prompt``, ``chosen``, ``rejected``): tokenize this side (``chosen`` or ``rejected``) as a
    user/assistant conversation with the assistant-only mask. A pair that fails on either side is rejected on
    both, so the chosen and rejected shards hold the same pairs in the same order."""
    extra: dict = field(default_factory=dict)

    def hash(self) -> str:
        """Config hash: the options above plus the tokenizer's identity hash."""
        tok = get_tokenizer(self.tokenizer)
        blob = json.dumps({**asdict(self), "tokenizer_hash": tok.identity_hash, "format": SHARD_VERSION},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def shard_stem(relpath: str, input_key: str, config_hash: str) -> str:
    """Output stem: the input's relative path made safe, its content key and the config hash."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", relpath)[-80:]
    return f"{slug}-{input_key[:12]}-{config_hash[:10]}"


def tokenize_shard(config_json: str, out_dir: str, item: dict) -> dict:
    """Tokenize one input file into one shard (the engine task); returns the shard's counts."""
    config = TokenizeConfig(**json.loads(config_json))
    if config.chat or config.pair_side is not None:
        shard = _Shard(config, config_json, out_dir, item)
        try:
            _tokenize_chat(config, shard.tok, Path(item["path"]), item["source"], shard.writer, shard.rejects,
                           shard.counts)
        except BaseException:
            shard.writer.abort()
            raise
        return shard.commit()
    shard = _TextShard(config, config_json, out_dir, item)
    try:
        for (_, number, doc_id), chars, doc in encode_stream(shard.tok, shard.documents(), shard.threads):
            shard.add(number, doc_id, chars, doc)
    except BaseException:
        shard.writer.abort()
        raise
    return shard.commit()


def tokenize_text_shards(config_json: str, out_dir: str, items: list[dict]) -> Iterator[dict]:
    """Tokenize text inputs one after another in this process through one stream of encoder threads: the next
    file is read and encoded while the last one's final chunks finish, and each finished shard's fsyncs and
    renames run on a background thread (:func:`wait_for_commits`). The shards are those of
    :func:`tokenize_shard`, byte for byte; yields each one's counts as it is handed over for commit."""
    config = TokenizeConfig(**json.loads(config_json))
    opened: deque[_TextShard] = deque()

    def documents() -> Iterator[tuple[tuple, str]]:
        for item in items:
            opened.append(_TextShard(config, config_json, out_dir, item))
            yield from opened[-1].documents()

    def finished(before: _TextShard | None) -> Iterator[dict]:
        while opened and opened[0] is not before:
            yield opened.popleft().commit(defer=True)

    threads = max(int(i.get("threads", 1)) for i in items) if items else 1
    try:
        for (shard, number, doc_id), chars, doc in encode_stream(get_tokenizer(config.tokenizer), documents(),
                                                                 threads):
            yield from finished(shard)  # results come in input order: every earlier shard is complete
            shard.add(number, doc_id, chars, doc)
        yield from finished(None)
    except BaseException:
        for shard in opened:
            shard.writer.abort()
        raise


class _Shard:
    """One input file becoming one token shard: its writer, rejects and counts, and the commit at the end."""

    def __init__(self, config: TokenizeConfig, config_json: str, out_dir: str, item: dict) -> None:
        self.config, self.config_json, self.item = config, config_json, item
        self.tok = get_tokenizer(config.tokenizer)
        self.stem = Path(out_dir) / item["stem"]
        self.threads = int(item.get("threads", 1))
        self.started = time.perf_counter()
        self.writer = TokenShardWriter(self.stem, self.tok.dtype,
                                       with_mask=config.chat or config.pair_side is not None)
        self.rejects: list[dict] = []
        self.counts: Counter = Counter()

    def commit(self, defer: bool = False) -> dict:
        """Write the shard's manifest and commit its files (on the background thread when ``defer``)."""
        reasons = Counter(r["reason"] for r in self.rejects)
        item, counts = self.item, self.counts
        manifest = {
            "input": item["relpath"], "input_key": item["key"], "source": item["source"],
            "tokenizer": self.tok.identity(), "tokenizer_hash": self.tok.identity_hash,
            "config": json.loads(self.config_json), "config_hash": item["config_hash"],
            "rejects": dict(sorted(reasons.items())), "documents_read": counts["read"], "characters": counts["chars"],
            "repaired_documents": counts["repaired_docs"], "repaired_characters": counts["repaired_chars"],
            "seconds": round(time.perf_counter() - self.started, 3),
        }
        finish = functools.partial(_commit_shard, self.writer, self.rejects, self.stem, manifest)
        if defer:
            _PENDING_COMMITS.append(_committer().submit(finish))
        else:
            finish()
        return {"stem": item["stem"], "tokens": self.writer.tokens, "documents": self.writer.documents,
                "rejects": manifest["rejects"], "documents_read": counts["read"]}


class _TextShard(_Shard):
    """A text input: documents out to the encoder, token ids back in input order."""

    def __init__(self, config: TokenizeConfig, config_json: str, out_dir: str, item: dict) -> None:
        super().__init__(config, config_json, out_dir, item)
        tok = self.tok
        self.head = np.array([tok.bos_id] if config.add_bos and tok.bos_id is not None else [], dtype=np.uint32)
        self.tail = np.array([tok.eos_id] if config.add_eos else [], dtype=np.uint32)
        # rejects carry their record's number: reader rejects are found while reading ahead and encoding rejects
        # when results come back, so they are sorted into input order at the end (the same file on any machine)
        self.numbered: list[tuple[int, dict]] = []
        self.pieces: list[np.ndarray] = []
        self.lengths: list[int] = []
        self.buffered = 0

    def documents(self) -> Iterator[tuple[tuple, str]]:
        """``((shard, record number, id), text)`` for every readable record; the others become rejects."""
        config, counts = self.config, self.counts
        for number, record in enumerate(read_records(Path(self.item["path"]), source=self.item["source"],
                                                     max_document_bytes=config.max_document_chars,
                                                     text_key=config.text_key, id_key=config.id_key)):
            counts["read"] += 1
            if record.get("reject"):
                self.numbered.append((number, {"id": record.get("id"), "reason": record["reason"],
                                               "detail": record.get("detail")}))
                continue
            text, repaired = sanitize(record["text"])
            if repaired:
                counts["repaired_docs"] += 1
                counts["repaired_chars"] += repaired
            yield (self, number, record["id"]), text

    def add(self, number: int, doc_id: str, chars: int, doc: np.ndarray) -> None:
        """One encoded document, in input order."""
        limit = self.config.max_document_tokens
        if not len(doc):
            self.numbered.append((number, {"id": doc_id, "reason": "empty_document", "detail": "no tokens"}))
            return
        if limit is not None and len(doc) > limit:
            self.numbered.append((number, {"id": doc_id, "reason": "too_many_tokens",
                                           "detail": f"{len(doc)} tokens > {limit}"}))
            return
        self.counts["chars"] += chars
        self.pieces.extend((self.head, doc, self.tail))
        self.lengths.append(len(doc) + len(self.head) + len(self.tail))
        self.buffered += self.lengths[-1]
        if self.buffered >= WRITE_TOKENS:
            _write(self.writer, self.pieces, self.lengths)
            self.pieces, self.lengths, self.buffered = [], [], 0

    def commit(self, defer: bool = False) -> dict:
        _write(self.writer, self.pieces, self.lengths)
        self.pieces, self.lengths, self.buffered = [], [], 0
        self.rejects.extend(r for _, r in sorted(self.numbered, key=lambda pair: pair[0]))
        self.numbered = []
        return super().commit(defer)


def _commit_shard(writer: TokenShardWriter, rejects: list[dict], stem: Path, manifest: dict) -> None:
    """Write the shard's rejects and index, make its files durable and rename them into place, manifest last."""
    try:
        if rejects:
            reject_path = stem.with_name(stem.name + ".rejects.jsonl")
            tmp = tmp_path_for(reject_path)
            with open(tmp, "w", encoding="utf-8") as handle:
                for r in rejects:
                    handle.write(json.dumps(r, ensure_ascii=False) + "\n")
            commit(tmp, reject_path)
        writer.close(manifest)
    except BaseException:
        writer.abort()
        raise


_PENDING_COMMITS: list = []


@functools.lru_cache(maxsize=1)
def _committer() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="phi3data-commit")


def wait_for_commits() -> None:
    """Wait until every deferred shard commit of this process is done; raise the first one's error."""
    pending, _PENDING_COMMITS[:] = list(_PENDING_COMMITS), []
    errors = [f.exception() for f in pending]
    for error in errors:
        if error is not None:
            raise error


def _write(writer: TokenShardWriter, pieces: list[np.ndarray], lengths: list[int]) -> None:
    if lengths:
        writer.write_flat(np.concatenate(pieces).astype(writer.dtype, copy=False),
                          np.array(lengths, dtype=np.uint64))


def encode_stream(tok, documents: Iterator[tuple[Any, str]], threads: int,
                  chunk_chars: int = CHUNK_CHARS) -> Iterator[tuple[Any, int, np.ndarray]]:
    """Encode ``(key, text)`` pairs into ``(key, characters, uint32 ids)``, in input order.

    Documents are grouped into chunks of about ``chunk_chars`` characters and encoded on ``threads`` threads
    while this generator's caller keeps reading: reading and JSON parsing overlap with encoding, and no batch
    boundary leaves a thread idle waiting for the slowest document. At most ``4 * threads`` chunks are in flight,
    so memory stays bounded whatever the input size.
    """
    if threads <= 1:
        for chunk in _chunks(documents, chunk_chars):
            yield from _encoded(tok, chunk)
        return
    with ThreadPoolExecutor(threads) as pool:
        in_flight: deque = deque()
        for chunk in _chunks(documents, chunk_chars):
            in_flight.append(pool.submit(_encoded, tok, chunk))
            if len(in_flight) >= 4 * threads:
                yield from in_flight.popleft().result()
        while in_flight:
            yield from in_flight.popleft().result()


def _chunks(documents: Iterator[tuple[Any, str]], chunk_chars: int) -> Iterator[list[tuple[Any, str]]]:
    chunk: list[tuple[Any, str]] = []
    size = 0
    for doc in documents:
        chunk.append(doc)
        size += len(doc[1])
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encoded(tok, chunk: list[tuple[Any, str]]) -> list[tuple[Any, int, np.ndarray]]:
    arrays = tok.encode_batch_arrays([text for _, text in chunk])
    return [(doc_id, len(text), ids) for (doc_id, text), ids in zip(chunk, arrays, strict=True)]


def _unusable_pair(obj: dict) -> tuple[str, str] | None:
    """Why a preference record cannot train (reason, detail), or None: an empty side, or two identical answers."""
    for key in ("prompt", "chosen", "rejected"):
        value = obj.get(key)
        if isinstance(value, str) and not value.strip():
            return "empty_side", f"{key} is empty"
    chosen, rejected = obj.get("chosen"), obj.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str) and chosen.strip() == rejected.strip():
        return "identical_sides", "chosen and rejected are the same text"
    return None


def _tokenize_chat(config: TokenizeConfig, tok, path: Path, source: str, writer: TokenShardWriter,
                   rejects: list[dict], counts: Counter) -> None:
    for record in read_objects(path, source=source, max_record_bytes=config.max_document_chars):
        counts["read"] += 1
        if isinstance(record, dict):  # unreadable line or file tail
            rejects.append({"id": record.get("id"), "reason": record["reason"], "detail": record.get("detail")})
            continue
        obj, doc_id = record.obj, record.fallback_id
        try:
            doc_id = str(obj.get(config.id_key) or doc_id)
            if config.pair_side is not None:
                reason = _unusable_pair(obj)
                if reason is not None:
                    rejects.append({"id": doc_id, "reason": reason[0], "detail": f"{record.fallback_id}: {reason[1]}"})
                    continue
                sides = {side: [{"role": "user", "content": obj["prompt"]},
                                {"role": "assistant", "content": obj[side]}] for side in ("chosen", "rejected")}
                other = "rejected" if config.pair_side == "chosen" else "chosen"
                for m in sides[other]:
                    m["content"], _ = sanitize(m["content"]) if isinstance(m["content"], str) else (m["content"], 0)
                other_ids, _ = encode_chat(sides[other], tok)
                if config.max_document_tokens is not None and len(other_ids) > config.max_document_tokens:
                    rejects.append({"id": doc_id, "reason": "too_many_tokens",
                                    "detail": f"the {other} side has {len(other_ids)} tokens"})
                    continue
                messages = sides[config.pair_side]
            else:
                messages = obj[config.messages_key]
            for m in messages:
                if isinstance(m.get("content"), str):
                    m["content"], repaired = sanitize(m["content"])
                    counts["repaired_chars"] += repaired
            ids, mask = encode_chat(messages, tok)
        except (KeyError, TypeError, AttributeError, ChatFormatError) as exc:
            rejects.append({"id": doc_id, "reason": "bad_chat_record", "detail": f"{record.fallback_id}: {exc}"})
            continue
        if config.max_document_tokens is not None and len(ids) > config.max_document_tokens:
            rejects.append({"id": doc_id, "reason": "too_many_tokens", "detail": f"{len(ids)} tokens"})
            continue
        writer.write(ids, mask)


# --- planning and running ----------------------------------------------------------------------------------

@dataclass
class TokenizeSummary:
    output: Path
    manifest: dict
    shards_total: int
    shards_skipped: int
    seconds: float


def plan_inputs(input_path: Path) -> tuple[Path, list]:
    """Input files under a path; a ``phi3data run`` output directory means its ``data/`` folder."""
    if input_path.is_dir() and (input_path / "manifest.json").exists() and (input_path / "data").is_dir():
        input_path = input_path / "data"
    shards = plan_shards(input_path)
    warc = [s.relpath for s in shards if detect_format(Path(s.path)) == "warc"]
    if warc:
        raise ValueError(f"{input_path} holds raw WARC/WET files ({warc[0]} ...): run `phi3data run` first and "
                         f"tokenize its output")
    return input_path, shards


def tokenize(inputs: list[Path], output: Path, config: TokenizeConfig, *, source: str | None = None,
             engine: str = "local", workers: int | None = None, ray_address: str | None = None,
             spark_master: str | None = None, progress: bool = False) -> TokenizeSummary:
    """Tokenize every file under ``inputs`` into shards in ``output``; resumable and idempotent. The output
    directory is locked for the run, so a second run on it fails at once."""
    with output_lock(output):
        return _tokenize_locked(inputs, output, config, source=source, engine=engine, workers=workers,
                                ray_address=ray_address, spark_master=spark_master, progress=progress)


def _tokenize_locked(inputs: list[Path], output: Path, config: TokenizeConfig, *, source: str | None, engine: str,
                     workers: int | None, ray_address: str | None, spark_master: str | None,
                     progress: bool) -> TokenizeSummary:
    started = time.perf_counter()
    config_hash = config.hash()
    output.mkdir(parents=True, exist_ok=True)
    refuse_other_config(output, config_hash, "tokens", "another config or tokenizer")
    remove_stale_tmp(output)
    items = []
    for input_path in inputs:
        root, shards = plan_inputs(Path(input_path))
        name = source or _source_name(root)
        for s in shards:
            stem = shard_stem(s.relpath, s.key, config_hash)
            items.append({"path": s.path, "relpath": s.relpath, "key": s.key, "source": name, "stem": stem,
                          "config_hash": config_hash})
    stems = {i["stem"] for i in items}
    if len(stems) != len(items):
        raise ValueError("two inputs have the same relative path and content; tokenize them once")
    pending = [i for i in items if not (output / f"{i['stem']}.json").exists()]
    # Largest inputs first; the cores are shared out between the shards that run at once (encoder threads
    # release the GIL), so one process on one big file still uses every core.
    pending.sort(key=lambda i: -Path(i["path"]).stat().st_size)
    at_once = max(1, min(default_workers(workers), len(pending)))
    threads = max(1, (os.cpu_count() or 1) // at_once)
    for item in pending:
        item["threads"] = threads
    config_json = json.dumps(asdict(config), sort_keys=True)
    if engine == "local" and at_once == 1 and not (config.chat or config.pair_side is not None):
        # one file after another in this process: one encoder stream across the files, commits in the background;
        # smallest first, so the many small commits overlap the big files' encoding instead of trailing it
        results = tokenize_text_shards(config_json, str(output), pending[::-1])
    else:
        results = map_shards(functools.partial(tokenize_shard, config_json, str(output)), pending, engine=engine,
                             workers=workers, ray_address=ray_address, spark_master=spark_master)
    try:
        drain(results, total=len(items), skipped=len(items) - len(pending), label=f"tokenize ({engine})",
              count=lambda r: r["tokens"], unit="tokens", progress=progress)
    finally:
        wait_for_commits()  # shards already encoded are kept, whatever stopped the run
    manifest = write_directory_manifest(output, config, config_hash)
    return TokenizeSummary(output, manifest, len(items), len(items) - len(pending), time.perf_counter() - started)


def _source_name(root: Path) -> str:
    if root.name == "data" and (root.parent / "manifest.json").exists():
        root = root.parent
    name = root.name
    for suffix in (".gz", ".zst", ".jsonl", ".json", ".parquet", ".arrow"):
        name = name.removesuffix(suffix)
    return name or "input"


TOTAL_KEYS = ("tokens", "documents", "documents_read", "characters", "repaired_documents", "repaired_characters")


def write_directory_manifest(output: Path, config: TokenizeConfig, config_hash: str) -> dict:
    """Sum every finished shard in ``output`` into its ``manifest.json`` (totals, sources, rejects, ``dtype``)."""
    tok = get_tokenizer(config.tokenizer)
    entries, sources, rejects = [], {}, Counter()
    totals = Counter()
    for stem in list_shards(output):
        shard = json.loads(stem.with_name(stem.name + ".json").read_text())
        if shard.get("config_hash") != config_hash:
            continue
        entries.append({"stem": stem.name, "input": shard["input"], "input_key": shard["input_key"],
                        "source": shard["source"], "tokens": shard["tokens"], "documents": shard["documents"],
                        "rejects": sum(shard["rejects"].values())})
        src = sources.setdefault(shard["source"], {"tokens": 0, "documents": 0, "shards": 0})
        src["tokens"] += shard["tokens"]
        src["documents"] += shard["documents"]
        src["shards"] += 1
        rejects.update(shard["rejects"])
        for key in TOTAL_KEYS:
            totals[key] += shard.get(key, 0)
    manifest = {"format": SHARD_FORMAT, "version": SHARD_VERSION, "dtype": tok.dtype.name,
                "tokenizer": tok.identity(), "tokenizer_hash": tok.identity_hash, "config": asdict(config),
                "config_hash": config_hash, **{k: totals[k] for k in TOTAL_KEYS},
                "rejects": dict(sorted(rejects.items())), "sources": sources, "shards": entries}
    write_json_atomic(output / "manifest.json", manifest)
    return manifest
