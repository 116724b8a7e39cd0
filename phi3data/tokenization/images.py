"""Image-text records -> token shards with images, and the dataset that expands them for a vision-language model.

Pairs and conversations (:mod:`phi3data.multimodal.records`) are rendered in phi-3's chat format
(:mod:`phi3data.tokenization.chat`); each image placeholder becomes ONE token, ``IMAGE_TOKEN``. A pair is the
conversation ``user: <image>[\\n caption_prompt]`` / ``assistant: caption``. Two loss masks, for LLaVA's stages:

- ``mask="caption"`` (stage 1, projector pretraining): only the last assistant reply (the caption), its
  ``<|end|>`` and the final end-of-text token;
- ``mask="assistant"`` (stage 2, instruction tuning): every assistant reply and the ``<|end|>`` closing it.

Image tokens are never trained on. A shard ``S`` is an ordinary token shard (``S.bin``, ``S.offsets``, ``S.mask``,
``S.idx``, :mod:`phi3data.tokenization.shards`) plus its image sidecar ``S.images.arrow``, an Arrow IPC file
(memory-mapped by the loader, so a trainer holds no image in memory until it reads it): one row per image in
shard order with ``document`` (index in the shard), ``image`` (order in the document), ``token`` (position of its
placeholder token in the document), ``record_id``, ``image_id``, ``bytes_row`` (the row whose ``bytes`` hold
this image) and ``bytes`` (null when an earlier row holds the same image). The sidecar is written atomically
before ``S.json``, which names it; so a shard is finished only with its images.

Bad records are counted by reason in ``S.json`` and listed in ``S.rejects.jsonl``; the rest of the shard goes
through: ``placeholder_mismatch``, ``missing_image``, ``truncated``, ``undecodable``, ``decompression_bomb``
(image reasons named as the ``image_decode`` stage names them), ``bad_chat_record``, ``empty_caption``,
``no_target`` (nothing to train on), ``too_many_tokens`` (counted with each image expanded to ``image_tokens``),
``unreadable_file``.

:class:`ImageTokenDataset` reads shards back and expands every image token to the vision encoder's token count.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from phi3data.engines import map_shards
from phi3data.engines.progress import drain
from phi3data.io.writers import (
    commit,
    output_lock,
    refuse_other_config,
    remove_stale_tmp,
    tmp_path_for,
    write_json_atomic,
)
from phi3data.multimodal.records import IMAGE_PLACEHOLDER, count_placeholders, image_id
from phi3data.tokenization.chat import ChatFormatError, encode_chat
from phi3data.tokenization.dataset import IGNORE_INDEX
from phi3data.tokenization.runner import TokenizeSummary, plan_inputs, shard_stem, write_directory_manifest
from phi3data.tokenization.shards import SHARD_VERSION, TokenShard, TokenShardWriter, list_shards
from phi3data.tokenization.tokenizers import get_tokenizer, sanitize

# phi-3-mini's vocabulary has six reserved special tokens its chat template never emits (<|placeholder1|> ..
# <|placeholder6|>: ids 32002-32005, 32008, 32009); the first one stands for "an image goes here".
IMAGE_TOKEN = "<|placeholder1|>"
MASKS = ("caption", "assistant")
SIDECAR_SUFFIX = ".images.arrow"
SIDECAR_SCHEMA = pa.schema([
    pa.field("document", pa.int64()), pa.field("image", pa.int32()), pa.field("token", pa.int64()),
    pa.field("record_id", pa.string()), pa.field("image_id", pa.string()), pa.field("bytes_row", pa.int64()),
    pa.field("bytes", pa.large_binary()),
])
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's decompression-bomb limit


@dataclass(frozen=True)
class ImageTokenizeConfig:
    """What decides the tokens of image-text records (and therefore the shard names)."""

    tokenizer: str = "phi3-mini"
    mask: str = "assistant"
    image_token: str = IMAGE_TOKEN
    caption_prompt: str = ""
    """User text after the image in a pair's prompt turn (empty: the image alone)."""
    image_tokens: int | None = None
    """Vision encoder tokens per image: with ``max_tokens``, a record is measured with its images expanded."""
    max_tokens: int | None = None
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def hash(self) -> str:
        tok = get_tokenizer(self.tokenizer)
        blob = json.dumps({**asdict(self), "tokenizer_hash": tok.identity_hash, "format": SHARD_VERSION,
                           "kind": "images"}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


class RecordRejected(ValueError):
    """A record that cannot become a training sequence; ``reason`` names why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def image_token_id(tok, image_token: str = IMAGE_TOKEN) -> int:
    """The id of the image placeholder token in ``tok``'s vocabulary."""
    token_id = tok.special_tokens.get(image_token)
    if token_id is None:
        raise ValueError(f"tokenizer {tok.name} has no special token {image_token!r} to stand for images; pass "
                         f"--image-token with one of its unused special tokens")
    return token_id


def record_messages(row: dict, kind: str, caption_prompt: str = "") -> tuple[list[dict], list]:
    """The messages and image bytes of a pair or conversation record row."""
    if kind == "pair":
        caption = row.get("text")
        if not isinstance(caption, str) or not caption.strip():
            raise RecordRejected("empty_caption", "the pair has no caption")
        prompt = IMAGE_PLACEHOLDER + (f"\n{caption_prompt}" if caption_prompt else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": caption}], [row.get("image")]
    if kind == "conversation":
        return [dict(m) for m in row.get("messages") or []], list(row.get("images") or [])
    raise ValueError(f"image tokenization reads pair or conversation records, not {kind} records")


def check_image(data: bytes | None, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Decode an image fully; raise :class:`RecordRejected` when it is missing or fails as ``image_decode`` would
    drop it: ``truncated``, ``undecodable``, ``decompression_bomb`` (more than ``max_pixels``). Any format Pillow
    reads is accepted."""
    from PIL import Image

    from phi3data.multimodal.images import ImageRejected, decode_image

    if not data:
        raise RecordRejected("missing_image", "no image bytes")
    Image.init()
    try:
        decode_image(data, max_pixels=max_pixels, formats=tuple(Image.OPEN)).close()
    except ImageRejected as exc:
        raise RecordRejected(exc.reason, exc.detail) from exc


def encode_image_chat(messages: list[dict], n_images: int, tok, *, mask: str = "assistant",
                      image_token: str = IMAGE_TOKEN) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids, loss mask (uint8) and image token positions of a conversation with ``n_images`` images."""
    if mask not in MASKS:
        raise ValueError(f"unknown mask {mask!r}: choose one of {', '.join(MASKS)}")
    found = count_placeholders(messages)
    if found != n_images:
        raise RecordRejected("placeholder_mismatch", f"{found} placeholders for {n_images} images")
    token_id = image_token_id(tok, image_token)
    rendered = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            content = sanitize(content)[0].replace(IMAGE_PLACEHOLDER, image_token)
        rendered.append({**m, "content": content})
    try:
        ids, trained = encode_chat(rendered, tok)
    except ChatFormatError as exc:
        raise RecordRejected("bad_chat_record", str(exc)) from exc
    positions = np.flatnonzero(ids == token_id)
    if len(positions) != n_images:  # the text itself held the image token's string
        raise RecordRejected("placeholder_mismatch", f"{len(positions)} image tokens for {n_images} images (the "
                                                     f"text contains {image_token!r})")
    if mask == "caption":
        ones = np.flatnonzero(trained)
        if len(ones):  # keep the last run of trained tokens: the final assistant reply
            gaps = np.flatnonzero(np.diff(ones) > 1)
            trained[: ones[gaps[-1] + 1] if len(gaps) else ones[0]] = 0
    trained[positions] = 0
    if not trained.any():
        raise RecordRejected("no_target", "no assistant reply to train on")
    return ids, trained, positions


# --- shards ---------------------------------------------------------------------------------------------------


def tokenize_image_shard(config_json: str, out_dir: str, item: dict) -> dict:
    """Tokenize one record file into one shard and its image sidecar (the engine task)."""
    config = ImageTokenizeConfig(**json.loads(config_json))
    tok = get_tokenizer(config.tokenizer)
    stem = Path(out_dir) / item["stem"]
    started = time.perf_counter()
    writer = TokenShardWriter(stem, tok.dtype, with_mask=True)
    sidecar = SidecarWriter(stem.with_name(stem.name + SIDECAR_SUFFIX))
    rejects: list[dict] = []
    counts: Counter = Counter()
    try:
        for number, kind, row in _record_rows(Path(item["path"]), rejects):
            counts["read"] += 1
            try:
                messages, images = record_messages(row, kind, config.caption_prompt)
                ids, mask, positions = encode_image_chat(messages, len(images), tok, mask=config.mask,
                                                         image_token=config.image_token)
                for data in images:
                    check_image(data, config.max_image_pixels)
                length = len(ids) + len(images) * ((config.image_tokens or 1) - 1)
                if config.max_tokens is not None and length > config.max_tokens:
                    raise RecordRejected("too_many_tokens", f"{length} tokens > {config.max_tokens}")
            except RecordRejected as exc:
                rejects.append({"id": row.get("id"), "reason": exc.reason, "detail": f"record {number}: {exc.detail}"})
                continue
            for j, (data, pos) in enumerate(zip(images, positions)):
                sidecar.add(writer.documents, j, int(pos), row.get("id"), data)
            writer.write(ids, mask)
        sidecar.close()
        _write_rejects(rejects, stem.with_name(stem.name + ".rejects.jsonl"))
        manifest = writer.close({
            "input": item["relpath"], "input_key": item["key"], "source": item["source"],
            "tokenizer": tok.identity(), "tokenizer_hash": tok.identity_hash, "config": json.loads(config_json),
            "config_hash": item["config_hash"], "rejects": dict(sorted(Counter(r["reason"] for r in rejects).items())),
            "documents_read": counts["read"], "mask_kind": config.mask,
            "images": {"sidecar": sidecar.final.name, "count": sidecar.rows, "unique": sidecar.unique,
                       "image_token": config.image_token, "image_token_id": image_token_id(tok, config.image_token)},
            "seconds": round(time.perf_counter() - started, 3),
        })
    except BaseException:
        writer.abort()
        sidecar.abort()
        raise
    return {"stem": item["stem"], "tokens": manifest["tokens"], "documents": manifest["documents"],
            "images": sidecar.rows, "rejects": manifest["rejects"], "documents_read": manifest["documents_read"]}


def _record_rows(path: Path, rejects: list[dict]) -> Iterator[tuple[int, str, dict]]:
    """(number, kind, row) of every record in a parquet record file; an unreadable file becomes one reject."""
    from phi3data.multimodal.readers import read_records_parquet
    from phi3data.multimodal.records import record_kind

    number = 0
    try:
        for batch in read_records_parquet(path):
            kind = record_kind(batch.records)
            if kind not in ("pair", "conversation"):
                raise ValueError(f"{path} holds {kind} records; image shards are made from pairs or conversations")
            for row in batch.records.to_pylist():
                yield number, kind, row
                number += 1
    except (OSError, pa.ArrowInvalid) as exc:
        rejects.append({"id": None, "reason": "unreadable_file", "detail": f"{path.name}: {str(exc)[:300]}"})


class SidecarWriter:
    """Stream image rows into a shard's sidecar (Arrow IPC, written in batches); it appears on ``close``."""

    BATCH_ROWS = 64

    def __init__(self, final: Path):
        self.final = final
        self.tmp = tmp_path_for(final)
        self._sink = pa.OSFile(str(self.tmp), "wb")
        self._writer = pa.ipc.new_file(self._sink, SIDECAR_SCHEMA)
        self._pending: list[dict] = []
        self._first: dict[str, int] = {}  # image id -> the row holding its bytes
        self.rows = 0

    def add(self, document: int, image: int, token: int, record_id: str | None, data: bytes) -> None:
        img_id = image_id(data)
        first = self._first.setdefault(img_id, self.rows)
        self._pending.append({"document": document, "image": image, "token": token, "record_id": record_id,
                              "image_id": img_id, "bytes_row": first, "bytes": data if first == self.rows else None})
        self.rows += 1
        if len(self._pending) >= self.BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_pylist(self._pending, schema=SIDECAR_SCHEMA))
            self._pending = []

    @property
    def unique(self) -> int:
        return len(self._first)

    def close(self) -> Path:
        self._flush()
        self._writer.close()
        self._sink.close()
        commit(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        self._sink.close()
        self.tmp.unlink(missing_ok=True)


def read_sidecar(path: Path) -> pa.Table:
    """An image sidecar, memory-mapped (image bytes are read from disk only when accessed)."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def _write_rejects(rejects: list[dict], path: Path) -> None:
    if not rejects:
        return
    tmp = tmp_path_for(path)
    with open(tmp, "w", encoding="utf-8") as handle:
        for r in rejects:
            handle.write(json.dumps(r, ensure_ascii=False) + "\n")
    commit(tmp, path)


def tokenize_images(inputs: list[Path], output: Path, config: ImageTokenizeConfig, *, source: str | None = None,
                    engine: str = "local", workers: int | None = None, ray_address: str | None = None,
                    spark_master: str | None = None, progress: bool = False) -> TokenizeSummary:
    """Tokenize every parquet record file under ``inputs`` into image shards in ``output``; resumable."""
    if config.mask not in MASKS:
        raise ValueError(f"unknown mask {config.mask!r}: choose one of {', '.join(MASKS)}")
    image_token_id(get_tokenizer(config.tokenizer), config.image_token)
    started = time.perf_counter()
    config_hash = config.hash()
    items = []
    for input_path in inputs:
        root, shards = plan_inputs(Path(input_path))
        name = source or root.name.removesuffix(".parquet") or "images"
        not_parquet = [s.relpath for s in shards if not s.relpath.endswith(".parquet")]
        if not_parquet:
            raise ValueError(f"{input_path}: {not_parquet[0]} is not a parquet record file; image tokenization "
                             f"reads pair or conversation parquet (phi3data.multimodal.writers.write_parquet)")
        for s in shards:
            items.append({"path": s.path, "relpath": s.relpath, "key": s.key, "source": name,
                          "stem": shard_stem(s.relpath, s.key, config_hash), "config_hash": config_hash})
    if len({i["stem"] for i in items}) != len(items):
        raise ValueError("two inputs have the same relative path and content; tokenize them once")
    with output_lock(output):
        refuse_other_config(output, config_hash, "tokens", "another config or tokenizer")
        remove_stale_tmp(output)
        pending = [i for i in items if not (output / f"{i['stem']}.json").exists()]
        task = functools.partial(tokenize_image_shard, json.dumps(asdict(config), sort_keys=True), str(output))
        results = map_shards(task, pending, engine=engine, workers=workers, ray_address=ray_address,
                             spark_master=spark_master)
        drain(results, total=len(items), skipped=len(items) - len(pending), label=f"tokenize images ({engine})",
              count=lambda r: r["tokens"], unit="tokens", progress=progress)
        manifest = write_directory_manifest(output, config, config_hash)
        images = sum(json.loads((output / f"{e['stem']}.json").read_text())["images"]["count"]
                     for e in manifest["shards"])
        manifest.update(mask_kind=config.mask, image_token=config.image_token, images=images)
        write_json_atomic(output / "manifest.json", manifest)
    return TokenizeSummary(output, manifest, len(items), len(items) - len(pending), time.perf_counter() - started)


# --- loading ----------------------------------------------------------------------------------------------


class ImageTokenDataset:
    """Image shards read back for a vision-language model, each image token expanded to ``image_tokens`` copies.

    ``dataset[i]`` is a dict:

    - ``input_ids``: int64 tensor ``[L]``, each image a run of ``image_tokens`` copies of ``image_token_id``;
    - ``labels``: int64 tensor ``[L]``, the token where the loss mask is on, ``-100`` elsewhere (not shifted, as
      in transformers; :func:`collate_images` also gives the shifted ``targets`` the phi-3 model takes);
    - ``images``: one entry per image, a uint8 ``H x W x 3`` RGB array, or ``transform(PIL RGB image)``;
    - ``image_starts``: int64 tensor ``[n_images]``, where each image's run starts in ``input_ids``;
    - ``image_ids`` and ``id`` (the record id when the document has images).

    ``path`` is a shard directory or one shard stem. Documents longer than ``max_tokens`` after expansion are
    left out and counted in ``dropped``.
    """

    def __init__(self, path: Path | str, image_tokens: int, *, transform: Callable | None = None,
                 max_tokens: int | None = None):
        if image_tokens < 1:
            raise ValueError("image_tokens must be at least 1")
        path = Path(path)
        stems = list_shards(path) if path.is_dir() else [path]
        if not stems:
            raise FileNotFoundError(f"no finished token shards in {path}")
        self.image_tokens, self.transform = image_tokens, transform
        self.shards: list[TokenShard] = []
        self.sidecars: list[pa.Table] = []
        self.rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per shard: document, token, bytes_row
        self.index: list[tuple[int, int]] = []
        self.dropped = 0
        token_ids = set()
        for s, stem in enumerate(stems):
            shard = TokenShard.open(stem)
            info = shard.manifest.get("images")
            if not info or shard.mask is None:
                raise ValueError(f"{shard.stem} is not an image shard (no image sidecar in its manifest)")
            token_ids.add(info["image_token_id"])
            table = read_sidecar(shard.stem.with_name(info["sidecar"]))
            if table.num_rows != info["count"]:
                raise ValueError(f"{shard.stem}: the sidecar has {table.num_rows} images, the manifest {info['count']}")
            documents = table.column("document").to_numpy()
            self.shards.append(shard)
            self.sidecars.append(table)
            self.rows.append((documents, table.column("token").to_numpy(), table.column("bytes_row").to_numpy()))
            images_per_doc = np.bincount(documents, minlength=len(shard)) if len(documents) else np.zeros(len(shard))
            lengths = np.diff(np.concatenate([[0], shard.ends.astype(np.int64)]))
            for d, n in enumerate(lengths):
                if max_tokens is not None and n + int(images_per_doc[d]) * (image_tokens - 1) > max_tokens:
                    self.dropped += 1
                    continue
                self.index.append((s, d))
        if len(token_ids) != 1:
            raise ValueError(f"{path} mixes image token ids {sorted(token_ids)}")
        self.image_token_id = token_ids.pop()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        import torch
        from PIL import Image

        s, d = self.index[i]
        shard, table = self.shards[s], self.sidecars[s]
        documents, tokens, bytes_rows = self.rows[s]
        start = int(shard.ends[d - 1]) if d > 0 else 0
        ids = np.asarray(shard.tokens[start:int(shard.ends[d])], dtype=np.int64)
        mask = np.asarray(shard.mask[start:int(shard.ends[d])])
        rows = range(int(np.searchsorted(documents, d, "left")), int(np.searchsorted(documents, d, "right")))
        positions = tokens[rows.start:rows.stop]
        if (ids[positions] != self.image_token_id).any():
            raise ValueError(f"{shard.stem} document {d}: the sidecar's positions are not image tokens")
        # each image token becomes image_tokens copies: repeat counts 1 everywhere else
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[positions] = self.image_tokens
        input_ids = np.repeat(ids, repeats)
        labels = np.where(np.repeat(mask, repeats) == 1, input_ids, IGNORE_INDEX)
        starts = positions.astype(np.int64) + np.arange(len(positions)) * (self.image_tokens - 1)
        images = []
        for r in rows:
            data = table.column("bytes")[int(bytes_rows[r])].as_buffer()
            with Image.open(pa.BufferReader(data)) as img:
                rgb = img.convert("RGB")
            images.append(self.transform(rgb) if self.transform is not None else np.asarray(rgb, dtype=np.uint8))
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels), "images": images,
                "image_starts": torch.from_numpy(starts),
                "image_ids": [table.column("image_id")[r].as_py() for r in rows],
                "id": table.column("record_id")[rows.start].as_py() if rows else None}


def collate_images(samples: list[dict], pad_id: int = 0) -> dict:
    """Right-pad samples of :class:`ImageTokenDataset` into a batch.

    Returns ``input_ids`` / ``labels`` ``[B, L]`` (padding: ``pad_id`` / -100), ``attention_mask`` ``[B, L]``
    (bool), ``targets`` (``labels`` shifted left by one: what ``Phi3(input_ids, targets)`` takes), ``images``
    (every image of the batch in order; stacked ``[N, ...]`` when they are same-shape tensors, else a list) and
    ``image_positions`` ``[N, 2]`` (batch row, start of the image's run)."""
    import torch

    width = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.int64)
    attention = torch.zeros((len(samples), width), dtype=torch.bool)
    images, positions = [], []
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[row, :n], labels[row, :n], attention[row, :n] = s["input_ids"], s["labels"], True
        images.extend(s["images"])
        positions.extend((row, int(p)) for p in s["image_starts"])
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if images and all(isinstance(x, torch.Tensor) for x in images) and len({x.shape for x in images}) == 1:
        images = torch.stack(images)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "targets": targets,
            "images": images, "image_positions": torch.as_tensor(positions, dtype=torch.int64).reshape(-1, 2)}
