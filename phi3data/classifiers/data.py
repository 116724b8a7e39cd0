"""Labelled documents for classifier training: read them, hash them, split them, sample them.

Sources are JSONL(.gz), Parquet or Arrow files (or directories of them, e.g. a pipeline's ``data/``), and WARC
files, whose HTML is extracted with the pipeline's own ``extract`` stage (and ``language`` when asked), so the
classifier sees the same text the curation pipeline produces.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from phi3data.config import StrictModel
from phi3data.io.inputs import list_input_files
from phi3data.io.readers import WARC_SUFFIXES, read_records


@dataclass(frozen=True)
class Example:
    id: str
    text: str
    label: float | None = None


class SourceConfig(StrictModel):
    """One labelled source: every document gets ``label``, or its own value of the field ``label_key``."""

    path: str
    label: float | None = None
    label_key: str | None = None
    text_key: str = "text"
    id_key: str = "id"
    languages: list[str] = []
    """For WARC sources: keep only these languages (fastText lid.176), e.g. ["en"]."""
    min_chars: int = 0
    limit: int | None = None
    """Keep at most this many documents (a deterministic hash sample, see ``sample``)."""
    report: str | None = None
    """Training sources: also measure on this source's own documents in the held-out split, reported under this
    name (e.g. "dclm": the human labels a recipe that mixes label sources never trained on)."""


def read_documents(path: str | Path, *, text_key: str = "text", id_key: str = "id",
                   languages: list[str] | None = None, skipped: Counter | None = None) -> Iterator[dict]:
    """Yield documents ``{"id", "text", "metadata"}`` from every file under ``path``. Records the reader rejects
    (malformed lines, missing text ...) are not yielded; each is counted in ``skipped`` as ``rejected:<reason>``."""
    root = Path(path)
    skipped = Counter() if skipped is None else skipped
    for file in list_input_files(root, "labelled data"):
        source = file.name if root.is_file() else file.relative_to(root).as_posix()
        records = _counted(read_records(file, source=source, max_document_bytes=10_000_000, text_key=text_key,
                                        id_key=id_key), skipped)
        if file.name.lower().endswith(WARC_SUFFIXES):
            yield from _extracted(records, languages or [], skipped)
        else:
            yield from records


def _counted(records: Iterator[dict], skipped: Counter) -> Iterator[dict]:
    for record in records:
        if record.get("reject"):
            skipped[f"rejected:{record['reason']}"] += 1
        else:
            yield record


def _extracted(records: Iterator[dict], languages: list[str], skipped: Counter) -> Iterator[dict]:
    """Run WARC records through the pipeline's extract (and language) stages, 256 at a time; what they drop is
    counted in ``skipped`` under the stage's reason (``extract:empty_text``, ``language:other_language`` ...)."""
    from phi3data.documents import make_batch
    from phi3data.pipelines.stages.extract import Extract, ExtractParams
    from phi3data.pipelines.stages.language import Language, LanguageParams

    stages = [Extract(ExtractParams())]
    if languages:
        stages.append(Language(LanguageParams(languages=languages)))
    pending: list[dict] = []

    def flush() -> Iterator[dict]:
        batch = make_batch(pending, with_html=True)
        for stage in stages:
            stage.ensure_setup()
            result = stage.process(batch)
            batch = result.batch
            skipped.update(result.drops)
            skipped.update(f"{stage.name}:{r['reason']}" for r in result.rejects)
        pending.clear()
        yield from batch.select(["id", "text", "metadata"]).to_pylist()

    for record in records:
        pending.append(record)
        if len(pending) >= 256:
            yield from flush()
    if pending:
        yield from flush()


def _label_of(doc: dict, source: SourceConfig) -> float | None:
    if source.label_key is None:
        return source.label
    value = doc.get(source.label_key)
    if value is None:
        metadata = doc.get("metadata")
        if isinstance(metadata, str):
            metadata = json.loads(metadata)
        value = (metadata or {}).get(source.label_key)
    return None if value is None else float(value)


def load_source(source: SourceConfig, base: Path | None = None, skipped: Counter | None = None) -> list[Example]:
    """The labelled examples of one source. What is left out is counted in ``skipped`` by reason:
    ``rejected:<reader reason>``, ``missing_label``, ``bad_label``, ``too_short`` (below ``min_chars``)."""
    path = Path(source.path)
    if base is not None and not path.is_absolute():
        path = base / path
    skipped = Counter() if skipped is None else skipped
    examples = []
    for doc in read_documents(path, text_key=source.text_key, id_key=source.id_key, languages=source.languages,
                              skipped=skipped):
        text = doc.get("text") or ""
        try:
            label = _label_of(doc, source)
        except (TypeError, ValueError):
            skipped["bad_label"] += 1
            continue
        if label is None or label != label:  # None or NaN
            skipped["missing_label"] += 1
            continue
        if len(text) < source.min_chars:
            skipped["too_short"] += 1
            continue
        examples.append(Example(str(doc["id"]), text, label))
    if source.limit is not None:
        examples = sample(examples, source.limit, seed=0)
    return examples


def sample_key(doc_id: str, seed: int) -> int:
    return xxhash.xxh3_64_intdigest(f"{seed}:{doc_id}")


def sample(items: Iterable, n: int, seed: int = 0, key=lambda x: x.id) -> list:
    """A deterministic sample of ``n`` items: those whose hashed id is smallest (independent of input order)."""
    return heapq.nsmallest(n, items, key=lambda item: sample_key(key(item), seed))  # already in key order


def split(examples: list[Example], test_fraction: float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """A deterministic train/test split by hashed id."""
    cut = int(test_fraction * 2**64)
    in_test = [sample_key(e.id, seed + 1) < cut for e in examples]
    return ([e for e, t in zip(examples, in_test, strict=True) if not t],
            [e for e, t in zip(examples, in_test, strict=True) if t])


def dedupe(examples: list[Example]) -> list[Example]:
    """Drop repeated texts (the first one wins) so a text cannot sit on both sides of a split."""
    seen: set[int] = set()
    out = []
    for example in examples:
        digest = xxhash.xxh3_64_intdigest(example.text)
        if digest not in seen:
            seen.add(digest)
            out.append(example)
    return out


def data_hash(examples: list[Example]) -> str:
    """SHA-256 over (id, label, text) of every example in id order: names the exact training data."""
    digest = hashlib.sha256()
    for example in sorted(examples, key=lambda e: e.id):
        digest.update(json.dumps([example.id, example.label, example.text], ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
