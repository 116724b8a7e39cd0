"""HTML to text extraction: resiliparse by default, trafilatura as an option."""

from __future__ import annotations

from collections import Counter
from typing import Literal

import pyarrow as pa

from phi3data.pipelines.base import Stage, StageOutput, StageParams, register


class ExtractParams(StageParams):
    extractor: Literal["resiliparse", "trafilatura"] = "resiliparse"
    main_content: bool = True
    """Keep only the main content (drop navigation, footers, ...)."""
    keep_alt_texts: bool = False
    min_chars: int = 1
    """Documents whose extracted text is shorter are dropped as ``empty``."""


@register
class Extract(Stage):
    """Turn the ``html`` column into ``text``. Batches without ``html`` (JSONL, Parquet) pass through."""

    type_name = "extract"
    Params = ExtractParams
    params: ExtractParams

    def setup(self) -> None:
        if self.params.extractor == "trafilatura":
            try:
                import trafilatura  # noqa: F401
            except ImportError as exc:
                raise RuntimeError("the trafilatura extractor needs `pip install 'phi3data[trafilatura]'`") from exc

    def process(self, batch: pa.Table) -> StageOutput:
        if "html" not in batch.schema.names:
            return StageOutput(batch)
        texts, keep, drops, rejects = self._extract(batch.column("id").to_pylist(),
                                                    batch.column("source").to_pylist(),
                                                    batch.column("html").to_pylist())
        old = batch.column("text").to_pylist()
        merged = [t if t is not None else o for t, o in zip(texts, old)]
        batch = batch.set_column(batch.schema.get_field_index("text"), "text", pa.array(merged, pa.large_string()))
        batch = batch.drop_columns(["html"]).filter(pa.array(keep, pa.bool_()))
        return StageOutput(batch, drops, rejects)

    def process_records(self, records: list[dict]) -> tuple[list[dict], Counter, list[dict]]:
        """The same work on records as read, before they become a batch: the pipeline calls this for WARC input
        so page HTML never has to be copied into Arrow and back. Returns the kept records (``html`` replaced by
        ``text``), the drops and the rejects, exactly as :meth:`process` would."""
        texts, keep, drops, rejects = self._extract([r["id"] for r in records], [r.get("source") for r in records],
                                                    [r.get("html") for r in records])
        kept = []
        for record, text, ok in zip(records, texts, keep):
            if ok:
                record.pop("html", None)
                if text is not None:
                    record["text"] = text
                kept.append(record)
        return kept, drops, rejects

    def _extract(self, ids: list, sources: list, htmls: list) -> tuple[list[str | None], list[bool], Counter,
                                                                      list[dict]]:
        """Per document: the extracted text (None where there was no HTML), whether it is kept, and the drops
        and rejects."""
        extract_one = self._trafilatura if self.params.extractor == "trafilatura" else self._resiliparse
        texts: list[str | None] = []
        keep: list[bool] = []
        drops: Counter = Counter()
        rejects: list[dict] = []
        for doc_id, source, html in zip(ids, sources, htmls):
            if html is None:
                texts.append(None)
                keep.append(True)  # already has text (a WET conversion record)
                continue
            try:
                text = extract_one(html)
            except Exception as exc:  # a parser failure is bad input, not a crash
                rejects.append({"id": doc_id, "source": source, "stage": self.name, "reason": "extract_error",
                                "detail": f"{type(exc).__name__}: {exc}", "excerpt": html[:256]})
                texts.append(None)
                keep.append(False)
                continue
            text = (text or "").strip()
            ok = len(text) >= self.params.min_chars
            if not ok:
                drops[f"{self.name}:empty"] += 1
            texts.append(text)
            keep.append(ok)
        return texts, keep, drops, rejects

    def _resiliparse(self, html: bytes) -> str:
        from resiliparse.extract.html2text import extract_plain_text
        from resiliparse.parse.encoding import bytes_to_str, detect_encoding

        return extract_plain_text(bytes_to_str(html, detect_encoding(html)), main_content=self.params.main_content,
                                  alt_texts=self.params.keep_alt_texts, links=False, form_fields=False,
                                  noscript=False, comments=False, list_bullets=True)

    def _trafilatura(self, html: bytes) -> str:
        import trafilatura
        from resiliparse.parse.encoding import bytes_to_str, detect_encoding

        return trafilatura.extract(bytes_to_str(html, detect_encoding(html)), favor_precision=True,
                                   include_comments=False, deduplicate=True,
                                   include_images=self.params.keep_alt_texts) or ""
