"""Several curation runs on one page: their funnels side by side and their score histograms overlaid."""

from __future__ import annotations

from pathlib import Path

from phi3data.report import svg
from phi3data.report.curation import SCORE_BINS, _DataScan, _files, thresholds
from phi3data.report.detect import ReportError, detect_kind
from phi3data.report.rows import read_json


def build(directories: list[Path]) -> dict:
    runs = []
    for directory in directories:
        if detect_kind(directory) != "curation":
            raise ReportError(f"{directory} is not a curation run: --compare puts `phi3data run` outputs side by side")
        manifest = read_json(directory / "manifest.json")
        stats = read_json(directory / "stats.json")
        scan = _DataScan(_files(directory, manifest, "data", "data"))
        bars = [("read", stats["documents_read"])] + [(s["name"], s["out"]) for s in stats["stages"]]
        runs.append({"directory": str(directory), "label": f"{manifest.get('pipeline')} ({directory.name})",
                     "stats": stats, "scan": scan, "cuts": thresholds(manifest, stats),
                     "funnel_svg": svg.hbars(bars, width=520, label_width=150, title=str(directory.name)),
                     "kept_pct": 100 * stats["documents_out"] / stats["documents_read"] if stats["documents_read"]
                     else None, "words": scan.words})
    columns = sorted({c for r in runs for c in r["scan"].score_columns})
    histograms = []
    for column in columns:
        series, marks = [], []
        values_all = [v for r in runs for v in r["scan"].scores.get(column, [])]
        if not values_all:
            continue
        lo, hi = (0.0, 1.0) if 0 <= min(values_all) and max(values_all) <= 1 else (min(values_all), max(values_all))
        for r in runs:
            values = r["scan"].scores.get(column, [])
            counts, edges = svg.bins(values, SCORE_BINS, lo, hi)
            series.append((f"{r['label']}: {len(values):,} documents", counts or [0] * SCORE_BINS))
            marks += [(v, f"{r['label']}: {label}") for v, label in r["cuts"].get(column, [])]
        edges = svg.bins(values_all, SCORE_BINS, lo, hi)[1]
        histograms.append({"column": column, "svg": svg.histogram(series, edges, thresholds=marks, xlabel=column,
                                                                 density=True)})
    for r in runs:
        del r["scan"]
    return {"kind": "compare", "directory": ", ".join(str(d) for d in directories), "runs": runs,
            "histograms": histograms}
