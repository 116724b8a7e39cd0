"""The HTML report of any phi3data output directory: ``phi3data report DIR`` writes ``DIR/report.html``.

One self-contained file (inline CSS and SVG, PNGs as data URIs, no script, nothing fetched) for whatever the
directory holds, detected from its files (:mod:`phi3data.report.detect`): a curation run, a generation run, token
shards (``tokenize`` / ``mix``) or an ablation ladder. ``write_compare`` puts several curation runs on one page.
Samples are chosen deterministically (smallest hash of the id) and capped, every text is escaped.
"""

from __future__ import annotations

from phi3data.report.detect import ReportError, detect_kind
from phi3data.report.html import write_compare, write_report

__all__ = ["ReportError", "detect_kind", "write_compare", "write_report"]
