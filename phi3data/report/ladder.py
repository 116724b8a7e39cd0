"""The report of an ablation ladder (``phi3data ablate``): scaling plots, fitted lines with their intervals, the
verdict, and every run's numbers."""

from __future__ import annotations

import re
from pathlib import Path

from phi3data.report.html import png_data_uri
from phi3data.report.rows import read_json

RUN_COLUMNS = ("recipe", "size", "seed", "params", "tokens", "epochs", "train_seconds")


def _verdict(report_md: str) -> list[dict]:
    """The bullets of report.md's ``## Verdict`` section: one row per comparison, one cell per model size."""
    match = re.search(r"^## Verdict\s*$(.*?)(?=^## |^!\[|\Z)", report_md, re.M | re.S)
    rows = []
    for line in (match.group(1) if match else "").splitlines():
        line = line.strip()
        if not line.startswith("- "):
            continue
        head, _, rest = line[2:].partition(": ")
        parts = [p.strip() for p in re.split(r";\s*(?=at N=|slopes )", rest) if p.strip()]
        rows.append({"comparison": head, "findings": parts or [rest]})
    return rows


def _mean_error(result: dict) -> float | None:
    tasks = result.get("tasks") or {}
    values = [1 - t["prob_correct"] for t in tasks.values() if "prob_correct" in t]
    return sum(values) / len(values) if values else None


def build(directory: Path) -> dict:
    plan = read_json(directory / "plan.json")
    fits_path = directory / "fits.json"
    fits = read_json(fits_path, {})
    report_md = (directory / "report.md").read_text(encoding="utf-8") if (directory / "report.md").is_file() else ""
    results = [read_json(p) for p in sorted((directory / "runs").rglob("result.json"))]
    runs = []
    for r in sorted(results, key=lambda r: (r.get("recipe", ""), r.get("params", 0), r.get("seed", 0))):
        runs.append({**{k: r.get(k) for k in RUN_COLUMNS}, "run": r.get("run"),
                     "val_loss": (r.get("validation") or {}).get("loss"),
                     "bits_per_byte": (r.get("validation") or {}).get("bits_per_byte"),
                     "benchmark_error": _mean_error(r),
                     "vqa": {task: v.get("acc") for task, v in (r.get("vqa") or {}).items()}})
    vqa_tasks = sorted({task for r in runs for task in r["vqa"]})  # a [vision] ladder's VQA accuracies
    fit_rows = []
    for metric, per_recipe in fits.items():
        for recipe, f in per_recipe.items():
            fit_rows.append({"metric": metric, "recipe": recipe, "a": f.get("a"), "b": f.get("b"),
                             "a_ci": f.get("a_ci"), "b_ci": f.get("b_ci"),
                             "points": list(zip(f.get("sizes", []), f.get("errors", []), f.get("error_ci", [])))})
    plots = [{"name": p.stem.removeprefix("scaling_"), "src": png_data_uri(p)}
             for p in sorted(directory.glob("scaling_*.png"))]
    title = re.search(r"^# (.+)$", report_md, re.M)
    return {"kind": "ladder", "directory": str(directory), "title": title.group(1) if title else directory.name,
            "plan": plan, "planned": len(plan.get("runs", [])), "runs": runs, "vqa_tasks": vqa_tasks,
            "fits": fit_rows, "plots": plots,
            "verdict": _verdict(report_md), "recipes": plan.get("recipe_order", []),
            "report_md": bool(report_md)}
