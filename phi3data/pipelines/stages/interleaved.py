"""Interleaved web documents: ``extract_interleaved`` (HTML -> aligned text runs and image URLs) and
``image_url_frequency`` (drop images whose URL is on too many pages: logos, icons, buttons).

Dropped images are findings, not document drops (the run's document funnel stays a funnel of documents):
``kind`` is the reason (see :mod:`phi3data.multimodal.interleaved`), with the image URL; each page also gets one
``page`` finding with its ``img_tags`` and kept ``images``. The stages' reports, in ``reports/<stage>.json``,
sum them: images found, kept and dropped by reason, and the URLs removed most often.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from phi3data.multimodal.interleaved import TRACKER_HOSTS, ExtractOptions, extract_page, url_key
from phi3data.multimodal.records import INTERLEAVED_WEB_LISTS, INTERLEAVED_WEB_SCHEMA
from phi3data.pipelines.base import KeyedStage, Stage, StageOutput, StageParams, register
from phi3data.pipelines.shuffle import (
    KEYS_SCHEMA,
    ShuffleJob,
    document_keys,
    parse_node,
    read_part,
    write_parquet_hashed,
)

TOP_URLS = 25


class ExtractInterleavedParams(StageParams):
    min_side: int = Field(64, ge=0)
    """Images whose declared width or height is below this are dropped as ``too_small`` (undeclared sizes pass)."""
    tracking_max_side: int = Field(1, ge=0)
    """A declared width or height at or below this is a ``tracking_pixel``."""
    excluded_extensions: list[str] = ["svg", "ico"]
    """URL path extensions dropped as ``excluded_extension`` (vector logos and favicons)."""
    boilerplate_classes: bool = True
    """Skip elements whose class or id names a menu, footer, sidebar, share bar, cookie banner ..."""
    tracker_hosts: list[str] = list(TRACKER_HOSTS)
    """Analytics and ad beacon hosts (or host/path prefixes): their images are dropped as ``tracker_host``."""
    no_images: Literal["keep", "drop"] = "keep"
    """A page left without images: keep it as a text-only document, or drop it (reason ``no_images``)."""
    min_text_chars: int = Field(0, ge=0)
    """Pages with less text than this are dropped (reason ``short_text``); 0 keeps image-only pages."""


@register
class ExtractInterleaved(Stage):
    """Turn the ``html`` column into interleaved web rows (``INTERLEAVED_WEB_SCHEMA``); ``text`` is the text runs
    joined by newlines. Rows without HTML (JSONL, Parquet, WET) become one text run and no images."""

    type_name = "extract_interleaved"
    Params = ExtractInterleavedParams
    params: ExtractInterleavedParams
    reports_always = True

    def setup(self) -> None:
        p = self.params
        self.options = ExtractOptions(min_side=p.min_side, tracking_max_side=p.tracking_max_side,
                                      excluded_extensions=tuple(e.lower().lstrip(".") for e in p.excluded_extensions),
                                      boilerplate_classes=p.boilerplate_classes,
                                      tracker_hosts=tuple(h.lower() for h in p.tracker_hosts))

    def process(self, batch: pa.Table) -> StageOutput:
        rows = batch.to_pylist()
        out, rejects, findings = [], [], []
        drops: Counter = Counter()
        for row in rows:
            html = row.pop("html", None)
            if html is None:
                text = row.get("text") or ""
                lists = {name: [] for name in INTERLEAVED_WEB_LISTS}
                if text.strip():
                    lists = {name: [text if name == "texts" else None] for name in INTERLEAVED_WEB_LISTS}
                out_row = dict(row, **lists)
                images = 0
            else:
                try:
                    page = extract_page(html, row.get("url"), self.options)
                except Exception as exc:  # a parser failure is bad input, not a crash
                    rejects.append({"id": row["id"], "source": row.get("source"), "stage": self.name,
                                    "reason": "extract_error", "detail": f"{type(exc).__name__}: {exc}",
                                    "excerpt": html[:256]})
                    continue
                findings.extend({"id": row["id"], "kind": reason, "url": url} for reason, url in page.dropped)
                findings.append({"id": row["id"], "kind": "page", "img_tags": page.img_tags, "images": page.images})
                out_row = dict(row, text=page.text, **page.lists())
                images = page.images
            reason = None
            if not out_row["texts"]:
                reason = "empty"
            elif len(out_row["text"] or "") < self.params.min_text_chars:
                reason = "short_text"
            elif images == 0 and self.params.no_images == "drop":
                reason = "no_images"
            if reason is not None:
                drops[f"{self.name}:{reason}"] += 1
                continue
            out.append(out_row)
        return StageOutput(_interleaved_table(out, batch.schema), drops, rejects, findings)

    def report(self, findings: pa.Table) -> dict:
        kinds = Counter(findings.column("kind").to_pylist())
        pages = findings.filter(pc.equal(findings.column("kind"), "page"))
        tally = [json.loads(d) for d in pages.column("detail").to_pylist()]
        dropped = {k: v for k, v in sorted(kinds.items()) if k != "page"}
        return {"pages": len(tally), "img_tags": sum(t["img_tags"] for t in tally),
                "images_kept": sum(t["images"] for t in tally),
                "pages_with_images": sum(t["images"] > 0 for t in tally),
                "images_dropped": sum(dropped.values()), "dropped_by_reason": dropped}


def _interleaved_table(rows: list[dict], schema_in: pa.Schema) -> pa.Table:
    """Rows as ``INTERLEAVED_WEB_SCHEMA`` plus any column an earlier stage added (``html`` is consumed)."""
    fields = list(INTERLEAVED_WEB_SCHEMA)
    fields += [f for f in schema_in if f.name not in INTERLEAVED_WEB_SCHEMA.names and f.name != "html"]
    schema = pa.schema(fields)
    return pa.table({f.name: [r.get(f.name) for r in rows] for f in schema}, schema=schema)


class ImageUrlFrequencyParams(StageParams):
    max_pages: int = Field(10, ge=1)
    """Images whose URL appears on more than this many pages of the corpus are removed (OBELICS's rule is ten)."""
    no_images: Literal["keep", "drop"] = "keep"
    """A page left without images once they are removed: keep it as text, or drop it (``no_images_left``)."""
    partitions: int = Field(16, gt=0, le=65536)
    """Key partitions (reduce tasks); changes the work layout, not the result."""


@register
class ImageUrlFrequency(KeyedStage):
    """Count, corpus-wide, the distinct pages each image URL is on (a shuffle keyed by the URL's hash, so the
    count is the same on every engine whatever the corpus size), and remove images on more than ``max_pages``."""

    type_name = "image_url_frequency"
    Params = ImageUrlFrequencyParams
    params: ImageUrlFrequencyParams
    reports_always = True

    def keys(self, batch: pa.Table) -> pa.Table:
        if "image_urls" not in batch.schema.names:
            raise ValueError(f"{self.name}: the rows have no image_urls; put an extract_interleaved stage before it")
        return document_keys(batch.column("id").to_pylist(),
                             [(url_key(u) for u in urls or [] if u is not None)
                              for urls in batch.column("image_urls").to_pylist()])

    def resolve(self, job: ShuffleJob) -> dict:
        p = self.params
        items = [{"task": f"p{q:05d}", "part": q} for q in range(p.partitions)]
        results = job.run("frequent", functools.partial(_frequent_urls, [str(f) for f in job.keys_files],
                                                        str(job.work / "frequent"), p.max_pages), items)
        return {"frequent_urls": sum(r["frequent"] for r in results),
                "removals": sum(r["removals"] for r in results),
                "resolved": {job.relative(Path(f)): sha for r in results for f, sha in r["files"].items()}}

    def apply_resolved(self, batch: pa.Table, decision: dict, resolved: pa.Table) -> StageOutput:
        remove: dict[str, dict[int, int]] = {}
        for doc, key, pages in zip(resolved.column("id").to_pylist(), resolved.column("key").to_pylist(),
                                   resolved.column("pages").to_pylist()):
            remove.setdefault(doc, {})[key] = pages
        rows, findings = [], []
        drops: Counter = Counter()
        for row in batch.to_pylist():
            gone = remove.get(row["id"])
            if gone:
                keep = []
                for url in row["image_urls"]:
                    pages = gone.get(url_key(url)) if url is not None else None
                    keep.append(pages is None)
                    if pages is not None:
                        findings.append({"id": row["id"], "kind": "frequent_url", "url": url, "pages": pages})
                for name in INTERLEAVED_WEB_LISTS:
                    row[name] = [v for v, k in zip(row[name], keep) if k]
                if self.params.no_images == "drop" and not any(u is not None for u in row["image_urls"]):
                    drops[f"{self.name}:no_images_left"] += 1
                    continue
            rows.append(row)
        out = pa.Table.from_pylist(rows, schema=batch.schema) if (findings or drops) else batch
        return StageOutput(out, drops, findings=findings)

    def report(self, findings: pa.Table) -> dict:
        removed = findings.filter(pc.equal(findings.column("kind"), "frequent_url"))
        pages: dict[str, int] = {}
        for detail in removed.column("detail").to_pylist():
            item = json.loads(detail)
            pages[item["url"]] = item["pages"]
        top = sorted(pages.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_URLS]
        return {"images_removed": removed.num_rows, "urls_removed": len(pages),
                "top_urls": [{"url": u, "pages": n} for u, n in top]}


FREQUENT_SCHEMA = pa.schema([pa.field("shard", pa.string()), pa.field("id", pa.string()),
                             pa.field("key", pa.uint64()), pa.field("pages", pa.int64())])


def _frequent_urls(keys_files: list[str], out: str, max_pages: int, item: dict) -> dict:
    """One key partition: URLs on more than ``max_pages`` distinct pages; writes every (shard, id, key, pages)
    holding one, sorted by shard."""
    table = read_part(keys_files, item["part"], ["key", "node"], KEYS_SCHEMA)
    counts = table.group_by("key").aggregate([("node", "count_distinct")])
    counts = counts.filter(pc.greater(counts.column("node_count_distinct"), max_pages))
    members = table.join(counts, "key", join_type="inner")
    parsed = [parse_node(n) for n in members.column("node").to_pylist()]
    removals = pa.table({"shard": [s for _, _, s in parsed], "id": [d for _, d, _ in parsed],
                         "key": members.column("key"), "pages": members.column("node_count_distinct")},
                        schema=FREQUENT_SCHEMA)
    removals = removals.sort_by([("shard", "ascending"), ("id", "ascending"), ("key", "ascending")])
    path = Path(out) / f"{item['task']}.parquet"
    return {"task": item["task"], "files": {str(path): write_parquet_hashed(removals, path, row_group_size=65536)},
            "frequent": counts.num_rows, "removals": removals.num_rows}
