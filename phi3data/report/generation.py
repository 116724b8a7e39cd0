"""The report of a generation run (``phi3data generate``): coverage heat map, failures and verification by reason,
sample generations per cell with their provenance, tokens and cost."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from phi3data.report import svg
from phi3data.report.rows import iter_rows, read_json
from phi3data.report.sample import Reservoir, excerpt, smallest

SAMPLE_CELLS = 12
FAILURE_EXAMPLES = 3
AXES = ("topic", "audience", "style")



def cell_label(cell: dict, keys: tuple[str, ...]) -> str:
    return " / ".join(str(cell.get(k, "–")) for k in keys) or "(all)"


def _row_keys(cells: list[dict]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Rows: source and topic; columns: audience x style and any other axis. Axes with one value are left out
    (the caption names them)."""
    keys = sorted({k for c in cells for k in c})
    varying = [k for k in keys if len({str(c.get(k)) for c in cells}) > 1]
    rows = tuple(k for k in ("source", "topic") if k in varying) or tuple(varying[:1])
    cols = tuple(k for k in varying if k not in rows)
    return rows, cols


def heat(cells: list[dict], counts: dict[str, int]) -> tuple:
    """A heat map of ``counts`` (by cell JSON) over the planned cells."""
    row_keys, col_keys = _row_keys(cells)
    rows = sorted({cell_label(c, row_keys) for c in cells})
    cols = sorted({cell_label(c, col_keys) for c in cells})
    grid: list[list[int | None]] = [[None] * len(cols) for _ in rows]
    for c in cells:
        i, j = rows.index(cell_label(c, row_keys)), cols.index(cell_label(c, col_keys))
        grid[i][j] = (grid[i][j] or 0) + counts.get(json.dumps(c, sort_keys=True), 0)
    fixed = ", ".join(f"{k} = {cells[0].get(k)}" for k in sorted({k for c in cells for k in c})
                      if k not in row_keys + col_keys)
    return svg.heatmap(rows, cols, grid), " / ".join(row_keys) or "(all)", \
        (" / ".join(col_keys) or "(all)") + (f"; every cell has {fixed}" if fixed else "")


def build(directory: Path) -> dict:
    manifest = read_json(directory / "manifest.json") or {}
    coverage = read_json(directory / "coverage.json") or {"cells": [], "totals": {}}
    cells = [c["cell"] for c in coverage["cells"]]
    data_paths = sorted((directory / "data").glob("*.parquet"))
    kept: Counter = Counter()
    samples = Reservoir(1)
    prompt_tokens = completion_tokens = 0
    finish: Counter = Counter()
    for row in iter_rows(data_paths, ["id", "text", "metadata"]):
        meta = json.loads(row["metadata"]) if row.get("metadata") else {}
        key = json.dumps(meta.get("cell", {}), sort_keys=True)
        kept[key] += 1
        usage = meta.get("usage") or {}
        prompt_tokens += usage.get("prompt_tokens") or 0
        completion_tokens += usage.get("completion_tokens") or 0
        finish[meta.get("finish_reason")] += 1

        def make(row=row, meta=meta):
            return {"id": row["id"], "text": excerpt(row.get("text")), "cell": meta.get("cell", {}),
                    "provenance": {k: meta.get(k) for k in ("template_id", "template_hash", "seed_id", "model",
                                                            "server", "backend", "finish_reason", "request_key")},
                    "params": json.dumps(meta.get("params"), sort_keys=True),
                    "usage": meta.get("usage") or {}, "seed_text": excerpt(meta.get("seed_text"), 300)}

        samples.offer(key, row["id"], make)
    if not cells:
        cells = [json.loads(k) for k in sorted(kept)]
    heat_svg, rows_axis, cols_axis = heat(cells, kept) if cells else (None, "", "")
    per_cell = [{"cell": c, "label": cell_label(c, tuple(sorted(c))),
                 "kept": kept.get(json.dumps(c, sort_keys=True), 0),
                 **{k: entry.get(k, 0) for k in ("planned", "generated", "failed", "pending", "truncated")}}
                for entry, c in zip(coverage["cells"], cells)] if coverage["cells"] else []
    chosen_cells = smallest([{"id": k} for k in sorted(samples.groups)], SAMPLE_CELLS)
    sample_rows = [samples.get(c["id"])[0] for c in chosen_cells]

    failures = list(iter_rows(sorted((directory / "failures").glob("*.parquet"))))
    by_class = Counter(f.get("error_class") for f in failures)
    failure_groups = [{"reason": reason, "count": count,
                       "examples": [{"id": f.get("id"), "cell": f.get("cell"), "template_id": f.get("template_id"),
                                     "error": excerpt(f.get("error"), 300)}
                                    for f in smallest([f for f in failures if f.get("error_class") == reason],
                                                      FAILURE_EXAMPLES)]}
                      for reason, count in by_class.most_common()]

    verification = read_json(directory / "verification.json")
    verified_heat = None
    rejected_examples: dict[str, list[dict]] = defaultdict(list)
    if verification is not None:
        verified_kept: Counter = Counter()
        for row in iter_rows(sorted((directory / "verified" / "data").glob("*.parquet")), ["metadata"]):
            verified_kept[json.dumps(json.loads(row["metadata"]).get("cell", {}), sort_keys=True)] += 1
        if cells:
            verified_heat = heat(cells, verified_kept)[0]
        rejected = list(iter_rows(sorted((directory / "verified" / "rejected").glob("*.parquet"))))
        for row in smallest(rejected, len(rejected)):
            if len(rejected_examples[row.get("reason")]) < FAILURE_EXAMPLES:
                meta = json.loads(row["metadata"]) if row.get("metadata") else {}
                rejected_examples[row.get("reason")].append(
                    {"id": row.get("id"), "text": excerpt(row.get("text"), 400),
                     "verification": excerpt(json.dumps(meta.get("verification"), default=str), 400)})
    usage = manifest.get("client_usage") or {}
    return {"kind": "generation", "directory": str(directory), "manifest": manifest, "coverage": coverage,
            "heat": heat_svg, "rows_axis": rows_axis, "cols_axis": cols_axis, "per_cell": per_cell,
            "kept_total": sum(kept.values()), "samples": sample_rows, "failures": failure_groups,
            "failures_total": len(failures), "verification": verification, "verified_heat": verified_heat,
            "rejected_examples": dict(rejected_examples), "usage": usage,
            "row_tokens": {"prompt": prompt_tokens, "completion": completion_tokens},
            "finish_reasons": sorted(((str(k), v) for k, v in finish.items()), key=lambda kv: -kv[1])}
