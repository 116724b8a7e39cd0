"""The document batch: a pyarrow Table with a fixed core schema.

Core columns: ``id`` (stable across runs and engines), ``text``, ``url``, ``source`` and ``metadata`` (a JSON
string for whatever is not a column). Stages add their own columns (``language``, ``language_score`` ...).
Readers of raw web data also carry ``html`` (bytes) until the extraction stage turns it into ``text``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import pyarrow as pa

CORE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.large_string()),
        pa.field("url", pa.string()),
        pa.field("source", pa.string()),
        pa.field("metadata", pa.string()),
    ]
)
HTML_FIELD = pa.field("html", pa.large_binary())

REJECT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("offset", pa.int64()),
        pa.field("excerpt", pa.large_binary()),
    ]
)
REJECT_EXCERPT_BYTES = 1024

FINDING_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("detail", pa.large_string()),
    ]
)


def make_batch(records: Iterable[dict], with_html: bool = False) -> pa.Table:
    """Build a document batch from dicts with keys of the core schema (and ``html`` when ``with_html``)."""
    schema = CORE_SCHEMA.append(HTML_FIELD) if with_html else CORE_SCHEMA
    columns: dict[str, list] = {name: [] for name in schema.names}
    for record in records:
        for name in schema.names:
            value = record.get(name)
            if name == "metadata" and value is not None and not isinstance(value, str):
                value = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
            columns[name].append(value)
    return pa.table(columns, schema=schema)


def make_rejects(records: Iterable[dict]) -> pa.Table:
    """Build a rejects table (bad input, with its reason and a short raw excerpt)."""
    columns: dict[str, list] = {name: [] for name in REJECT_SCHEMA.names}
    for record in records:
        for name in REJECT_SCHEMA.names:
            value = record.get(name)
            if name == "excerpt" and value is not None:
                if isinstance(value, str):
                    value = value.encode("utf-8", "replace")
                value = bytes(value[:REJECT_EXCERPT_BYTES])
            columns[name].append(value)
    return pa.table(columns, schema=REJECT_SCHEMA)


def make_findings(stage: str, findings: Iterable[dict]) -> pa.Table:
    """Build a findings table: ``id`` and ``kind`` of each finding, everything else as JSON in ``detail``."""
    ids, kinds, details = [], [], []
    for finding in findings:
        finding = dict(finding)
        ids.append(finding.pop("id", None))
        kinds.append(finding.pop("kind", None))
        details.append(json.dumps(finding, ensure_ascii=False, sort_keys=True, default=str))
    return pa.table({"id": ids, "stage": [stage] * len(ids), "kind": kinds, "detail": details},
                    schema=FINDING_SCHEMA)
