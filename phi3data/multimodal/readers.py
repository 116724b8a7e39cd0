"""Readers of image-text data, one function per format; each yields :class:`ReadBatch` es of Arrow tables.

A batch holds ``records`` (a table of one record kind, see :mod:`phi3data.multimodal.records`) and ``rejects``
(``REJECT_SCHEMA`` rows with a named reason and their source). Bad input never stops a shard: a missing image
file, unreadable JSON, a placeholder-count mismatch, a failed img2dataset sidecar or a tar member without a pair
becomes a reject row and reading goes on. Images are not decoded here (that is a later stage).
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from phi3data.documents import make_rejects
from phi3data.io.readers import RawRecord, read_objects, reject
from phi3data.io.warc import WarcFault, iter_warc, parse_http_response
from phi3data.multimodal.records import (
    IMAGE_PLACEHOLDER,
    LLAVA_PLACEHOLDER,
    LLAVA_ROLES,
    SCHEMAS,
    count_placeholders,
    describe_kinds,
    image_id,
    kind_of_columns,
    make_conversations,
    make_images,
    make_pairs,
    make_urls,
)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff")
BATCH_ROWS = 256
MAX_IMAGE_BYTES = 64 << 20


@dataclass
class ReadBatch:
    """Records of one kind and the rejects met while reading them."""

    records: pa.Table
    rejects: pa.Table


def read_all(batches: Iterable[ReadBatch]) -> ReadBatch:
    """Concatenate a reader's batches into one."""
    batches = list(batches)
    records = pa.concat_tables([b.records for b in batches]) if batches else None
    rejects = pa.concat_tables([b.rejects for b in batches]) if batches else make_rejects([])
    return ReadBatch(records, rejects)


def reject_counts(rejects: pa.Table) -> dict[str, int]:
    """How many rejects each reason has."""
    return dict(Counter(rejects.column("reason").to_pylist()))


def _batched(items: Iterable[dict], build: Callable[[list[dict]], pa.Table], batch_rows: int) -> Iterator[ReadBatch]:
    """Group record dicts and reject dicts (``"reject": True``) into batches."""
    records, rejects = [], []
    for item in items:
        (rejects if item.get("reject") else records).append(item)
        if len(records) + len(rejects) >= batch_rows:
            yield ReadBatch(build(records), make_rejects(rejects))
            records, rejects = [], []
    if records or rejects:
        yield ReadBatch(build(records), make_rejects(rejects))


# --- LLaVA conversation JSON + image folder ---------------------------------------------------------------


def read_llava(path: Path, image_root: Path, *, source: str | None = None,
               batch_rows: int = BATCH_ROWS) -> Iterator[ReadBatch]:
    """Read LLaVA's conversation JSON (a list of {"id", "image", "conversations"}) with images under
    ``image_root`` into conversations. ``<image>`` becomes ``IMAGE_PLACEHOLDER``; human/gpt become
    user/assistant. ``image`` may be one relative path, a list of them, or absent (a text-only conversation)."""
    path, image_root = Path(path), Path(image_root)
    source = source or path.name
    yield from _batched(_llava_items(path, image_root, source), make_conversations, batch_rows)


class JsonArrayError(ValueError):
    """A JSON file that is not a list of values, or breaks after ``index`` values were read."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


JSON_CHUNK_CHARS = 1 << 20
MAX_JSON_ITEM_CHARS = 64 << 20


def iter_json_array(path: Path) -> Iterator:
    """The values of a file holding one JSON list, one at a time (the list is never held whole: LLaVA's 665k
    conversations are 1 GB of JSON and several GB as Python objects). Raises :class:`JsonArrayError` on a file
    that is not a list, or at the first value that does not parse (after yielding the ones before it)."""
    decoder = json.JSONDecoder()
    index = 0
    with open(path, encoding="utf-8") as handle:
        buf, pos, eof = "", 0, False

        def fill() -> None:  # drop what was parsed, append the next chunk
            nonlocal buf, pos, eof
            more = handle.read(JSON_CHUNK_CHARS)
            eof = not more
            buf, pos = buf[pos:] + more, 0

        def skip(chars: str) -> str:  # the next character that is not in ``chars`` ("" at the end of the file)
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in chars:
                    pos += 1
                if pos < len(buf) or eof:
                    return buf[pos:pos + 1]
                fill()

        if skip(" \t\r\n\ufeff") != "[":
            raise JsonArrayError("expected a JSON list", 0)
        pos += 1
        while True:
            head = skip(" \t\r\n,")
            if head == "]":
                return
            if head == "":
                raise JsonArrayError(f"the list ends without ']' after {index} values", index)
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                if eof or len(buf) - pos > MAX_JSON_ITEM_CHARS:
                    raise JsonArrayError(f"value {index}: {exc.msg}", index) from None
                fill()  # the value may run past the chunk: read more and parse it again
                continue
            yield value
            index += 1
            pos = end


def _llava_objects(path: Path, source: str) -> Iterator[tuple[int, object] | dict]:
    """(index, object) of a LLaVA JSON list, then one reject if the file is not a list or breaks."""
    try:
        yield from enumerate(iter_json_array(path))
    except JsonArrayError as exc:
        yield reject(source, "unreadable_json", str(exc)[:500], offset=exc.index or None)
    except (OSError, UnicodeDecodeError) as exc:
        yield reject(source, "unreadable_json", str(exc)[:500])


def _safe_image_path(rel_path) -> bool:
    return isinstance(rel_path, str) and not Path(rel_path).is_absolute() and ".." not in Path(rel_path).parts


def llava_image_paths(path: Path) -> list[str]:
    """Every image path a LLaVA JSON names (relative to its image folder), in order; unsafe paths left out."""
    out = []
    for item in _llava_objects(Path(path), Path(path).name):
        if isinstance(item, dict):  # the file's reject: the reader reports it
            break
        obj = item[1]
        rel = obj.get("image") if isinstance(obj, dict) else None
        out.extend(r for r in ([rel] if isinstance(rel, str) else rel if isinstance(rel, list) else [])
                   if _safe_image_path(r))
    return out


def _llava_items(path: Path, image_root: Path, source: str) -> Iterator[dict]:
    for item in _llava_objects(path, source):
        if isinstance(item, dict):
            yield item
            return
        index, obj = item
        fallback = f"{source}:{index}"
        if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
            yield reject(source, "malformed_record", "no 'conversations' list", offset=index, doc_id=fallback,
                         excerpt=json.dumps(obj, default=str)[:256])
            continue
        rec_id = str(obj["id"]) if obj.get("id") is not None else fallback
        messages, bad = [], None
        for turn in obj["conversations"]:
            role = LLAVA_ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
            if role is None or not isinstance(turn.get("value"), str):
                bad = f"turn {turn!r:.100} has no known 'from' or no string 'value'"
                break
            messages.append({"role": role, "content": turn["value"].replace(LLAVA_PLACEHOLDER, IMAGE_PLACEHOLDER)})
        if bad:
            yield reject(source, "malformed_record", bad, offset=index, doc_id=rec_id)
            continue
        rel = obj.get("image")
        rels = [] if rel is None else [rel] if isinstance(rel, str) else list(rel)
        found = count_placeholders(messages)
        if found != len(rels):
            yield reject(source, "placeholder_mismatch", f"{found} <image> placeholders for {len(rels)} images",
                         offset=index, doc_id=rec_id)
            continue
        images, missing = [], None
        for rel_path in rels:
            if not _safe_image_path(rel_path):
                missing = f"{rel_path!r}: not a relative path inside the image folder"
                break
            try:
                images.append((image_root / rel_path).read_bytes())
            except OSError as exc:
                missing = f"{rel_path}: {exc.strerror or exc}"
                break
        if missing:
            yield reject(source, "missing_image", missing, offset=index, doc_id=rec_id)
            continue
        meta = {k: v for k, v in obj.items() if k not in ("id", "image", "conversations")}
        meta["image_paths"] = rels
        yield {"id": rec_id, "messages": messages, "images": images, "url": None, "source": source,
               "metadata": meta}


# --- HF / the_cauldron parquet ----------------------------------------------------------------------------


def read_cauldron(path: Path, *, source: str | None = None, batch_rows: int = BATCH_ROWS) -> Iterator[ReadBatch]:
    """Read the_cauldron's parquet layout (``images``: list of {bytes, path}; ``texts``: list of {user, assistant,
    source}) into conversations: one placeholder per image opens the first user turn, then each text becomes a
    user and an assistant message. Row ids are ``<source>:<row>``."""
    path = Path(path)
    source = source or path.name
    yield from _batched(_cauldron_items(path, source), make_conversations, batch_rows)


def _cauldron_items(path: Path, source: str) -> Iterator[dict]:
    for item in read_objects(path, fmt="parquet", source=source, max_record_bytes=MAX_IMAGE_BYTES):
        if isinstance(item, dict):
            yield item
            continue
        row = int(item.fallback_id.rsplit(":", 1)[1]) - 1
        rec_id = f"{source}:{row}"
        obj = item.obj
        images = [(img or {}).get("bytes") for img in (obj.get("images") or [])]
        texts = obj.get("texts") or []
        if any(b is None for b in images):
            yield reject(source, "missing_image", "an image entry has no bytes", offset=row, doc_id=rec_id)
            continue
        if not texts:
            yield reject(source, "malformed_record", "no texts", offset=row, doc_id=rec_id)
            continue
        messages, origins = [], []
        for i, turn in enumerate(texts):
            user = (turn or {}).get("user") or ""
            if i == 0:
                user = IMAGE_PLACEHOLDER * len(images) + user
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": (turn or {}).get("assistant") or ""})
            origins.append((turn or {}).get("source"))
        if count_placeholders(messages) != len(images):
            yield reject(source, "placeholder_mismatch", "the texts hold image placeholders of their own",
                         offset=row, doc_id=rec_id)
            continue
        meta = {"image_paths": [(img or {}).get("path") for img in obj.get("images") or []], "text_sources": origins}
        yield {"id": rec_id, "messages": messages, "images": images, "url": None, "source": source,
               "metadata": meta}


# --- WebDataset tars --------------------------------------------------------------------------------------


def read_webdataset(path: Path, *, source: str | None = None, batch_rows: int = BATCH_ROWS) -> Iterator[ReadBatch]:
    """Read a WebDataset tar (members grouped by key: KEY.jpg/.png/.webp + KEY.txt and/or KEY.json) into pairs.

    img2dataset's status is honoured: a KEY.json whose ``status`` is not ``success`` is a ``failed_sidecar``
    reject, and beside ``NAME.tar`` a ``NAME.parquet`` status table's failed rows (which have no members) are
    ``download_failed`` rejects. A group without an image or without a caption/json is an ``orphan_member``."""
    path = Path(path)
    source = source or path.name
    yield from _batched(_wds_items(path, source), make_pairs, batch_rows)


def _wds_items(path: Path, source: str) -> Iterator[dict]:
    group_key, group = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                if base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = member.name[: len(member.name) - len(base)] + stem
                if key != group_key and group:
                    yield from _wds_sample(group_key, group, source)
                    group = {}
                group_key = key
                handle = tar.extractfile(member)
                group[ext.lower()] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        if group:
            yield from _wds_sample(group_key, group, source)
            group = {}
        yield reject(source, "corrupt_tar", str(exc)[:500])
    if group:
        yield from _wds_sample(group_key, group, source)
    yield from _img2dataset_failures(path, source)


def _wds_sample(key: str, group: dict[str, bytes], source: str) -> Iterator[dict]:
    ext = next((e for e in IMAGE_EXTS if e in group), None)
    meta: dict = {}
    if "json" in group:
        try:
            meta = json.loads(group["json"])
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            yield reject(source, "unreadable_json", f"{key}.json: {exc}", doc_id=key, excerpt=group["json"])
            return
        status = meta.get("status")
        if status is not None and status != "success":
            yield reject(source, "failed_sidecar", f"{key}: status {status!r}: {meta.get('error_message') or ''}",
                         doc_id=key, excerpt=group["json"])
            return
    if ext is None or ("txt" not in group and "json" not in group):
        yield reject(source, "orphan_member", f"{key}: members {sorted(group)} have no "
                     f"{'image' if ext is None else 'caption or json'}", doc_id=key)
        return
    text = group["txt"].decode("utf-8", "replace") if "txt" in group else meta.get("caption")
    meta = dict(meta, key=key, ext=ext)
    yield {"image": group[ext], "text": text, "url": meta.get("url"), "source": source, "metadata": meta}


def _img2dataset_failures(tar_path: Path, source: str) -> Iterator[dict]:
    """The failed rows of the tar's status table: img2dataset's ``NAME.parquet`` or ``phi3data fetch``'s
    ``NAME.status.parquet`` (an opted-out URL counts as ``opt_out``)."""
    status_path = tar_path.with_suffix(".parquet")
    if not status_path.exists():
        status_path = tar_path.with_name(tar_path.stem + ".status.parquet")
    if not status_path.exists():
        return
    try:
        table = pq.read_table(status_path)
    except (pa.ArrowInvalid, OSError) as exc:
        yield reject(source, "unreadable_status", f"{status_path.name}: {exc}")
        return
    if "status" not in table.column_names:
        return
    for row in table.to_pylist():
        if row.get("status") != "success":
            reason = "opt_out" if row.get("status") == "opt_out" else "download_failed"
            detail = row.get("error_message") or row.get("error") or ""
            yield reject(source, reason, f"{row.get('url')}: {detail}", doc_id=row.get("key"))


def read_img2dataset_stats(tar_path: Path) -> dict:
    """img2dataset's per-shard ``NAME_stats.json`` (counts of successes and failures), or {} when absent."""
    path = Path(tar_path).with_name(Path(tar_path).stem + "_stats.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --- images inside WARC files -----------------------------------------------------------------------------


def read_warc_images(path: Path, *, source: str | None = None, batch_rows: int = BATCH_ROWS,
                     max_image_bytes: int = MAX_IMAGE_BYTES) -> Iterator[ReadBatch]:
    """Read the image responses (and resource records) with an ``image/*`` Content-Type of a WARC file into image
    records (``url`` is the WARC-Target-URI). Other records are skipped; WARC faults become rejects."""
    path = Path(path)
    source = source or path.name
    yield from _batched(_warc_items(path, source, max_image_bytes), make_images, batch_rows)


def _warc_items(path: Path, source: str, max_image_bytes: int) -> Iterator[dict]:
    with open(path, "rb") as handle:
        for item in iter_warc(handle, max_record_bytes=max_image_bytes + (1 << 20)):
            if isinstance(item, WarcFault):
                yield reject(source, item.reason, item.detail, offset=item.offset,
                             doc_id=item.headers.get("warc-record-id"), excerpt=item.excerpt)
                continue
            headers = item.headers
            if item.type == "resource":
                content_type, body, status = headers.get("content-type", ""), item.block, None
            elif item.type == "response":
                try:
                    response = parse_http_response(item.block)
                except ValueError as exc:
                    if b"content-type: image/" not in item.block[:4096].lower():
                        continue
                    yield reject(source, str(exc), "HTTP response could not be parsed", offset=item.offset,
                                 doc_id=headers.get("warc-record-id"), excerpt=item.block[:256])
                    continue
                content_type, body, status = response.headers.get("content-type", ""), response.body, response.status
            else:
                continue
            if not content_type.lower().startswith("image/"):
                continue
            rec = headers.get("warc-record-id")
            if status is not None and status != 200:
                yield reject(source, "http_error", f"HTTP {status}", offset=item.offset, doc_id=rec)
                continue
            if not body:
                yield reject(source, "empty_image", "empty body", offset=item.offset, doc_id=rec)
                continue
            meta = {"content_type": content_type.split(";")[0].strip().lower(), "warc_record_id": rec,
                    "warc_date": headers.get("warc-date"), "offset": item.offset}
            yield {"image": body, "url": headers.get("warc-target-uri"), "source": source, "metadata": meta}


# --- URL lists --------------------------------------------------------------------------------------------


def read_url_list(path: Path, *, source: str | None = None, url_key: str = "url", caption_key: str = "caption",
                  batch_rows: int = 4096) -> Iterator[ReadBatch]:
    """Read a URL list: a text file with one URL per line (blank lines and ``#`` comments skipped), or a parquet /
    JSONL file with ``url_key`` and ``caption_key`` columns. Each row's ``key`` is its 0-based position, zero
    padded (img2dataset's naming), so it is stable across reruns. Non-http(s) URLs are ``invalid_url`` rejects."""
    path = Path(path)
    source = source or path.name
    yield from _batched(_url_items(path, source, url_key, caption_key), make_urls, batch_rows)


def _url_items(path: Path, source: str, url_key: str, caption_key: str) -> Iterator[dict]:
    if path.suffix.lower() in (".txt", ".urls", ".lst"):
        with open(path, encoding="utf-8", errors="replace") as handle:
            objs: Iterable = ({url_key: line.strip()} for line in handle
                              if line.strip() and not line.lstrip().startswith("#"))
            yield from _url_rows(objs, source, url_key, caption_key)
        return
    yield from _url_rows(read_objects(path, source=source, max_record_bytes=1 << 20), source, url_key, caption_key)


def _url_rows(objs: Iterable, source: str, url_key: str, caption_key: str) -> Iterator[dict]:
    index = 0
    for obj in objs:
        if isinstance(obj, dict) and obj.get("reject"):
            yield obj
            continue
        if isinstance(obj, RawRecord):
            obj = obj.obj
        key = f"{index:09d}"
        index += 1
        url = obj.get(url_key) if isinstance(obj, dict) else None
        if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
            yield reject(source, "invalid_url", f"{url!r:.200}", offset=index - 1, doc_id=key)
            continue
        caption = obj.get(caption_key)
        yield {"key": key, "url": url, "text": None if caption is None else str(caption), "source": source}


# --- our own record parquet -------------------------------------------------------------------------------


def record_schema(path: Path, schema: pa.Schema | None = None) -> tuple[str, pa.Schema]:
    """The record kind of a parquet file and the schema it is read with: the kind's columns with the kind's types,
    then any other columns (what stages added) as they are. Raises ValueError naming the file and the column
    when a kind's column is missing or of a type that does not convert."""
    schema = schema if schema is not None else pq.read_schema(path)
    kind = kind_of_columns(schema.names)
    if kind is None:
        have = set(schema.names)
        closest = min(SCHEMAS, key=lambda k: (len(set(SCHEMAS[k].names) - have), -len(set(SCHEMAS[k].names) & have)))
        missing = [n for n in SCHEMAS[closest].names if n not in schema.names]
        raise ValueError(f"{path} is not an image-text record file: columns {schema.names}; closest kind "
                         f"{closest!r} lacks column(s) {', '.join(missing)} (record kinds: {describe_kinds()})")
    fields = list(SCHEMAS[kind])
    for field in fields:
        have = schema.field(field.name).type
        if have != field.type and not _castable(have, field.type):
            raise ValueError(f"{path}: column {field.name!r} is {have}; {kind} records need {field.type}")
    return kind, pa.schema(fields + [f for f in schema if f.name not in SCHEMAS[kind].names])


def _castable(have: pa.DataType, want: pa.DataType) -> bool:
    try:
        pa.array([], have).cast(want)
        return True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False


def read_records_parquet(path: Path, *, batch_rows: int = BATCH_ROWS) -> Iterator[ReadBatch]:
    """Read a parquet file of image-text records (any kind; what :func:`phi3data.multimodal.writers.write_parquet`
    or a pipeline run wrote). Columns beyond the kind's, such as those image stages add, are kept."""
    pfile = pq.ParquetFile(path)
    _, schema = record_schema(path, pfile.schema_arrow)
    for batch in pfile.iter_batches(batch_size=batch_rows):
        table = pa.Table.from_batches([batch])
        yield ReadBatch(pa.table([table.column(f.name).cast(f.type) for f in schema], schema=schema),
                        make_rejects([]))


def read_record_sources(sources: Iterable[str | Path], what: str = "image-text records"
                        ) -> Iterator[tuple[Path, Iterator[pa.Table]]]:
    """Every record parquet file under ``sources`` (files or directories, in order), with its record tables."""
    from phi3data.io.inputs import list_input_files

    for source in sources:
        for path in list_input_files(Path(source), what, fmt="records"):
            yield path, (batch.records for batch in read_records_parquet(path))


def image_ids_of(table: pa.Table) -> list[str]:
    """Every image id a record table references, in order."""
    if "image_ids" in table.column_names:
        return [i for ids in table.column("image_ids").to_pylist() for i in ids if i is not None]
    if "image_id" in table.column_names:
        return table.column("image_id").to_pylist()
    return table.column("id").to_pylist()


__all__ = ["JsonArrayError", "ReadBatch", "image_id", "image_ids_of", "iter_json_array", "llava_image_paths",
           "read_all", "read_cauldron", "read_img2dataset_stats", "read_llava", "read_record_sources",
           "read_records_parquet",
           "read_url_list", "read_warc_images", "read_webdataset", "record_schema", "reject_counts"]
