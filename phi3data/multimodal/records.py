"""Image-text records as Arrow tables, beside the text schema of :mod:`phi3data.documents`.

Images are content-addressed: an image's id is the **sha256 hex digest of its bytes** (64 lower-case hex
characters). Image bytes travel in ``large_binary`` columns (or tar members), never in a text column.

Four record kinds, each a table with ``id``, ``url``, ``source`` and ``metadata`` (a JSON string) like
``CORE_SCHEMA``:

- images (``IMAGE_SCHEMA``): ``image`` bytes; ``id`` is the image id.
- image-text pairs (``PAIR_SCHEMA``): ``image_id``, ``image``, ``text`` (the caption); ``id`` is
  ``sha256(image_id + "\\n" + text)``, so a pair is named by its content too.
- conversations (``CONVERSATION_SCHEMA``): ``messages`` (list of {role, content}, roles ``system`` / ``user`` /
  ``assistant``), ``image_ids`` and ``images`` (aligned lists). Each image is referenced by one
  ``IMAGE_PLACEHOLDER`` in the message contents, in order.
- interleaved documents (``INTERLEAVED_SCHEMA``, OBELICS-style): aligned lists ``texts``, ``images`` and
  ``image_ids``: position i holds either a text (image null) or an image (text null).
- interleaved web documents (``INTERLEAVED_WEB_SCHEMA``): what :mod:`phi3data.multimodal.interleaved` extracts
  from HTML, images still URLs. The core document columns (``id``, ``text``, ``url``, ``source``, ``metadata``;
  ``text`` is the text runs joined by newlines, so text stages run on these rows unchanged) plus aligned lists
  ``texts``, ``image_urls``, ``alts``, ``captions``, ``widths``, ``heights``: position i is a text run (``texts[i]``
  set, ``image_urls[i]`` null) or an image (``image_urls[i]`` absolute http(s), ``texts[i]`` null; its alt text,
  figure caption and declared size may each be null).

Rejects use :data:`phi3data.documents.REJECT_SCHEMA`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import pyarrow as pa

IMAGE_PLACEHOLDER = "<|image|>"
LLAVA_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

_COMMON = [pa.field("url", pa.string()), pa.field("source", pa.string()), pa.field("metadata", pa.string())]
MESSAGE_TYPE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.large_string())])

IMAGE_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("image", pa.large_binary()),
                          *_COMMON])
PAIR_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("image_id", pa.string()),
                         pa.field("image", pa.large_binary()), pa.field("text", pa.large_string()), *_COMMON])
CONVERSATION_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False),
                                 pa.field("messages", pa.list_(MESSAGE_TYPE)),
                                 pa.field("image_ids", pa.list_(pa.string())),
                                 pa.field("images", pa.list_(pa.large_binary())), *_COMMON])
INTERLEAVED_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False),
                                pa.field("texts", pa.list_(pa.large_string())),
                                pa.field("image_ids", pa.list_(pa.string())),
                                pa.field("images", pa.list_(pa.large_binary())), *_COMMON])
INTERLEAVED_WEB_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("text", pa.large_string()),
                                    *_COMMON,
                                    pa.field("texts", pa.list_(pa.large_string())),
                                    pa.field("image_urls", pa.list_(pa.string())),
                                    pa.field("alts", pa.list_(pa.large_string())),
                                    pa.field("captions", pa.list_(pa.large_string())),
                                    pa.field("widths", pa.list_(pa.int32())),
                                    pa.field("heights", pa.list_(pa.int32()))])
URL_SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("url", pa.string()),
                        pa.field("text", pa.large_string()), pa.field("source", pa.string())])

SCHEMAS = {"image": IMAGE_SCHEMA, "pair": PAIR_SCHEMA, "conversation": CONVERSATION_SCHEMA,
           "interleaved": INTERLEAVED_SCHEMA, "interleaved_web": INTERLEAVED_WEB_SCHEMA, "url": URL_SCHEMA}


def image_id(data: bytes) -> str:
    """The content id of an image: the sha256 hex digest of its bytes."""
    return hashlib.sha256(data).hexdigest()


def pair_id(img_id: str, text: str | None) -> str:
    """The content id of an image-text pair."""
    return hashlib.sha256(f"{img_id}\n{text or ''}".encode()).hexdigest()


def kind_of_columns(names: Iterable[str]) -> str | None:
    """The record kind whose columns are all among ``names`` (the one with the most columns: a pair table holds
    an image table's columns too), or None. Other columns (what stages add: ``phash``, ``language`` ...) may
    ride along."""
    names = set(names)
    kinds = [kind for kind, schema in SCHEMAS.items() if set(schema.names) <= names]
    return max(kinds, key=lambda kind: len(SCHEMAS[kind].names)) if kinds else None


def describe_kinds() -> str:
    """Each record kind with its columns, for error messages."""
    return "; ".join(f"{kind}: {', '.join(schema.names)}" for kind, schema in SCHEMAS.items())


def record_kind(table: pa.Table) -> str:
    """Name the record kind of a table by its columns (image, pair, conversation, interleaved, interleaved_web or
    url); columns beyond the kind's are allowed."""
    kind = kind_of_columns(table.schema.names)
    if kind is None:
        raise ValueError(f"not an image-text record table: columns {table.schema.names} hold no record kind's "
                         f"columns ({describe_kinds()})")
    return kind


def sniff_image_type(data: bytes) -> str | None:
    """The file extension an image's magic bytes name (jpg, png, webp, gif, bmp, tiff), without decoding it."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def _meta(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    if "metadata" in columns:
        columns["metadata"] = [_meta(v) for v in columns["metadata"]]
    return pa.table(columns, schema=schema)


def make_images(rows: Iterable[dict]) -> pa.Table:
    """Image records from dicts with ``image`` bytes (``id`` is filled from the bytes)."""
    rows = [dict(row, id=image_id(row["image"])) for row in rows]
    return _table(rows, IMAGE_SCHEMA)


def make_pairs(rows: Iterable[dict]) -> pa.Table:
    """Image-text pair records from dicts with ``image`` bytes and ``text`` (ids are filled in)."""
    out = []
    for row in rows:
        img = image_id(row["image"])
        out.append(dict(row, image_id=img, id=pair_id(img, row.get("text"))))
    return _table(out, PAIR_SCHEMA)


def count_placeholders(messages: Iterable[dict], placeholder: str = IMAGE_PLACEHOLDER) -> int:
    """How many image placeholders the message contents hold."""
    return sum((m.get("content") or "").count(placeholder) for m in messages)


def make_conversations(rows: Iterable[dict]) -> pa.Table:
    """Conversation records from dicts with ``id``, ``messages`` and ``images`` (image ids are filled in).

    Raises ValueError when a conversation's placeholder count differs from its image count."""
    out = []
    for row in rows:
        images = list(row.get("images") or [])
        found = count_placeholders(row["messages"])
        if found != len(images):
            raise ValueError(f"conversation {row['id']}: {found} placeholders for {len(images)} images")
        out.append(dict(row, images=images, image_ids=[image_id(b) for b in images]))
    return _table(out, CONVERSATION_SCHEMA)


def make_interleaved(rows: Iterable[dict]) -> pa.Table:
    """Interleaved documents from dicts with ``id`` and aligned ``texts`` / ``images`` lists (exactly one of the
    two set at each position); image ids are filled in. Raises ValueError on misaligned lists."""
    out = []
    for row in rows:
        texts, images = list(row["texts"]), list(row["images"])
        if len(texts) != len(images) or any((t is None) == (b is None) for t, b in zip(texts, images)):
            raise ValueError(f"document {row['id']}: texts and images must align, one of them at each position")
        out.append(dict(row, texts=texts, images=images,
                        image_ids=[None if b is None else image_id(b) for b in images]))
    return _table(out, INTERLEAVED_SCHEMA)


def make_urls(rows: Iterable[dict]) -> pa.Table:
    """URL-list rows (``key``, ``url``, ``text`` caption, ``source``)."""
    return _table(list(rows), URL_SCHEMA)


INTERLEAVED_WEB_LISTS = ("texts", "image_urls", "alts", "captions", "widths", "heights")


def make_interleaved_web(rows: Iterable[dict]) -> pa.Table:
    """Interleaved web documents from dicts with the core columns and the aligned lists (missing lists of alts,
    captions, widths or heights are filled with nulls). Raises ValueError on misaligned lists."""
    out = []
    for row in rows:
        texts, urls = list(row["texts"]), list(row["image_urls"])
        lists = {name: list(row.get(name) or [None] * len(texts)) for name in INTERLEAVED_WEB_LISTS}
        if any(len(v) != len(texts) for v in lists.values()) or \
                any((t is None) == (u is None) for t, u in zip(texts, urls)):
            raise ValueError(f"document {row['id']}: texts and image_urls must align, one of them at each position")
        out.append(dict(row, **lists))
    return _table(out, INTERLEAVED_WEB_SCHEMA)
