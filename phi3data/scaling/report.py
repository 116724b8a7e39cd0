"""A ladder's report: per-recipe power-law fits with bootstrap intervals, the Figure 3 style plots, a table and a
plain verdict on which recipe is better at which sizes and whether the gap is larger than the noise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from phi3data.scaling.fit import PowerLawFit, RunPoint, compare_fits, fit_chinchilla, fit_power_law
from phi3data.scaling.plot import plot_scaling

# metric -> (plot label, verdict label); a [vision] ladder is fitted on its validation loss per trained token
TEXT_METRICS = {"benchmark": ("benchmark error (1 - p(correct))", "benchmark error"),
                "bits_per_byte": ("validation bits per byte", "validation bits per byte")}
VLM_METRICS = {"loss": ("validation loss per trained token", "validation loss per trained token"),
               "vqa": ("VQA error (1 - accuracy)", "VQA error")}


def load_results(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    plan = json.loads((out / "plan.json").read_text())
    results = []
    for run in plan["runs"]:
        path = out / "runs" / run["run"] / "result.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
    return plan, results


def _points(results: list[dict], metric: str) -> dict[str, list[RunPoint]]:
    by_recipe: dict[str, list[RunPoint]] = {}
    for r in results:
        if metric == "benchmark":
            errors = np.array([1.0 - p for task in sorted(r["tasks"]) for p in r["tasks"][task]["p_gold"]])
        elif metric == "loss":
            errors = np.array([r["validation"]["loss"]])
        elif metric == "vqa":  # the tasks' mean error
            errors = np.array([1.0 - np.mean([t["acc"] for t in r["vqa"].values()])])
        else:
            errors = np.array([r["validation"]["bits_per_byte"]])
        by_recipe.setdefault(r["recipe"], []).append(
            RunPoint(r["recipe"], r["params"], r["seed"], r["tokens"], errors, r["validation"]["loss"]))
    return by_recipe


def write_report(out: Path, *, n_boot: int = 1000) -> Path:
    """Fit, plot and write ``report.md`` (plus ``fits.json`` and two PNGs) for a finished or partial ladder."""
    plan, results = load_results(out)
    if not results:
        raise ValueError(f"{out} has no finished runs yet")
    recipes = plan.get("recipe_order") or list(plan["config"]["recipes"])  # the first recipe is the baseline
    sizes = sorted({r["params"] for r in results})
    vision = plan["config"].get("vision") is not None
    metrics = TEXT_METRICS
    if vision:  # VQA error only where VQA tasks were scored
        metrics = {k: v for k, v in VLM_METRICS.items() if k != "vqa" or plan["config"]["eval"].get("vqa")}
    fits: dict[str, dict[str, PowerLawFit]] = {}
    for metric in metrics:
        points = _points(results, metric)
        fits[metric] = {name: fit_power_law(points[name], n_boot=n_boot) for name in recipes if name in points
                        and len({p.params for p in points[name]}) >= 2}
    plots = {}
    for metric, (label, _) in metrics.items():
        if fits[metric]:
            plots[metric] = plot_scaling(list(fits[metric].values()), out / f"scaling_{metric}.png", metric=label,
                                         title=f"{plan['config']['ladder']['name']}: {label}")
    lines = [f"# Ablation ladder: {plan['config']['ladder']['name']}", ""]
    tok = plan["tokenizer"]
    tok_note = (f"a byte-level BPE with {plan['vocab_size']:,} tokens trained on the recipes' own training text "
                "(the same for every recipe; phi-3's 32,064-token vocabulary would make the output layer most of the "
                "compute at this size)" if tok.endswith("tokenizer.json")
                else f"`{tok}` ({plan['vocab_size']:,} tokens)")
    lad = plan["config"]["ladder"]
    lines += [f"- runs finished: {len(results)} of {len(plan['runs'])}; seeds: {lad['seeds']}",
              f"- tokenizer: {tok_note}",
              f"- token budget: {lad['tokens_per_param']} tokens per non-embedding parameter "
              f"(at least {lad['min_tokens']:,}); sequence length {lad['seq_len']}",
              *(_vision_lines(plan) if vision else [
                  f"- benchmarks: {', '.join(plan['config']['eval']['tasks'])}, {plan['config']['eval']['limit']} "
                  f"items each, {plan['config']['eval']['shots']}-shot; error = 1 - p(correct choice), averaged "
                  "over items",
                  f"- validation: {plan['data']['validation_documents']} held-out documents shared by all recipes"]),
              f"- unreadable source records, skipped: {_rejects(plan['data'], recipes)}"]
    if plan["config"].get("train"):
        lines.append("- trainer settings: " + ", ".join(f"{k} = {v}" for k, v in plan["config"]["train"].items()))
    lines.append("")
    if plan.get("recipe_tokens"):
        sizes_txt = ", ".join(f"{k} {v:,}" for k, v in plan["recipe_tokens"].items())
        lines += [f"- training tokens available per recipe: {sizes_txt}; a run that needs more repeats its data "
                  "(the epochs column) and is then data-limited, not only model-limited", ""]
    phased = {name: r["phases"] for name, r in plan["config"]["recipes"].items() if r.get("phases")}
    for name, phases in phased.items():
        lines.append(f"- phased recipe {name}: " + ", then ".join(
            f"{ph['name']} ({100 * ph['fraction']:.0f}% of each run's tokens)" for ph in phases)
            + "; read in order, never mixed")
    if phased:
        lines.append("")
    lines += _vision_runs(plan, results) if vision else _text_runs(results)
    lines += ["", "## Fits: log(error) = a + b·log(N), 90% bootstrap intervals over seeds and items", "",
              "| metric | recipe | a | b (slope) | b interval |", "|---|---|---:|---:|---|"]
    for metric, per in fits.items():
        for name, fit in per.items():
            one_value = metric != "benchmark" and len(plan["config"]["ladder"]["seeds"]) < 2
            interval = "n/a (one seed per size)" if one_value else f"[{fit.b_ci[0]:+.4f}, {fit.b_ci[1]:+.4f}]"
            lines.append(f"| {metric} | {name} | {fit.a:.3f} | {fit.b:+.4f} | {interval} |")
    lines += ["", "## Verdict", ""]
    lines += _verdict(fits, recipes, sizes, n_seeds=len(plan["config"]["ladder"]["seeds"]), metrics=metrics)
    chin = _chinchilla(results)
    if chin:
        lines += ["", chin]
    for metric, path in plots.items():
        lines += ["", f"![{metric}]({path.name})"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "fits.json").write_text(json.dumps(
        {m: {n: {"a": f.a, "b": f.b, "a_ci": f.a_ci, "b_ci": f.b_ci, "sizes": f.sizes, "errors": f.errors,
                 "error_ci": f.error_ci} for n, f in per.items()} for m, per in fits.items()}, indent=2))
    return report


def _vision_lines(plan: dict[str, Any]) -> list[str]:
    """A [vision] ladder's setup: the fixed tower, what the validation set is, the VQA tasks."""
    cfg = plan["config"]
    vision = ", ".join(f"{k} = {v}" for k, v in cfg["vision"].items())
    source = plan["data"].get("validation_source", "held out by record id")
    held = "held out of every recipe by record id" if isinstance(source, str) else f"from {', '.join(source)}"
    lines = [f"- vision (the same for every run; sizes are the language model's): {vision}",
             f"- validation: {plan['data']['validation_documents']} image-text records {held}, shared by all "
             "recipes; loss per trained token (assistant replies, a pair's caption)",
             "- tokens: steps x micro-batch x seq_len (each batch holds whole records, padded; the epochs column "
             "counts records seen)"]
    if cfg["eval"].get("vqa"):
        lines.append(f"- VQA: {', '.join(cfg['eval']['vqa'])}, {cfg['eval']['limit']} questions each, accuracy "
                     "of the best-scored option")
    return lines


def _vision_runs(plan: dict[str, Any], results: list[dict]) -> list[str]:
    tasks = plan["config"]["eval"].get("vqa") or []
    lines = ["## Runs", "", "| recipe | size (non-emb.) | seed | tokens | epochs | train s | val loss | "
             + "".join(f"{t} acc | " for t in tasks), "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(tasks)]
    for r in sorted(results, key=lambda r: (r["recipe"], r["params"], r["seed"])):
        lines.append(f"| {r['recipe']} | {r['params']:,} | {r['seed']} | {r['tokens']:,} | {r.get('epochs', '-')} | "
                     f"{r['train_seconds']} | {r['validation']['loss']:.4f} | "
                     + "".join(f"{r['vqa'][t]['acc']:.3f} | " for t in tasks))
    return lines


def _text_runs(results: list[dict]) -> list[str]:
    lines = ["## Runs", "", "| recipe | size (non-emb.) | seed | tokens | epochs | train s | val loss | bits/byte | "
             "benchmark error | acc (mean) | chance |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["recipe"], r["params"], r["seed"])):
        tasks = r["tasks"].values()
        error = np.mean([1 - p for t in tasks for p in t["p_gold"]])
        acc = np.mean([t["acc"] for t in tasks])
        chance = np.mean([t["chance"] for t in tasks])
        lines.append(f"| {r['recipe']} | {r['params']:,} | {r['seed']} | {r['tokens']:,} | {r.get('epochs', '-')} | "
                     f"{r['train_seconds']} | "
                     f"{r['validation']['loss']:.3f} | {r['validation']['bits_per_byte']:.3f} | {error:.4f} | "
                     f"{acc:.3f} | {chance:.3f} |")
    return lines


def _rejects(data: dict[str, Any], recipes: list[str]) -> str:
    """Unreadable source records per recipe and reason, e.g. ``web: malformed_json 1; textbooks: none``."""
    parts = []
    for name in recipes:  # a phased recipe's data units are "<recipe>.<phase>"
        for unit, counts in data["recipes"].items():
            if unit == name or unit.startswith(f"{name}."):
                reasons = ", ".join(f"{reason} {n:,}" for reason, n in (counts.get("rejects") or {}).items())
                parts.append(f"{unit}: {reasons or 'none'}")
    return "; ".join(parts)


def _verdict(fits: dict[str, dict[str, PowerLawFit]], recipes: list[str], sizes: list[int],
             n_seeds: int, metrics: dict[str, tuple[str, str]] = TEXT_METRICS) -> list[str]:
    lines = []
    for metric, (_, label) in metrics.items():
        per = fits[metric]
        if len(per) < 2:
            lines.append(f"- {label}: fewer than two recipes have a fit; no comparison.")
            continue
        base_name = recipes[0]
        base = per[base_name]
        for name in recipes[1:]:
            if name not in per:
                continue
            rows = compare_fits(base, per[name], sizes)
            parts = []
            for row in rows:
                better = name if row["gap"] < 0 else base_name
                if metric != "benchmark" and n_seeds < 2:
                    sig = "noise unknown: one seed per size; add seeds to measure it"
                else:
                    sig = "larger than the noise" if row["significant"] else "within the noise"
                parts.append(f"at N={int(row['size']):,}: {better} lower by {abs(row['gap']):.4f} "
                             f"(90% interval of the gap {row['ci'][0]:+.4f} to {row['ci'][1]:+.4f}, {sig})")
            slope = (f"slopes {per[name].b:+.3f} vs {base.b:+.3f}"
                     + (" (steeper: its advantage grows with size)" if per[name].b < base.b else ""))
            lines.append(f"- {label}, {name} vs {base_name}: " + "; ".join(parts) + f"; {slope}.")
    return lines


def _chinchilla(results: list[dict]) -> str | None:
    """The Chinchilla form on validation loss, where the grid has enough distinct (N, D) points."""
    ratios = {round(r["tokens"] / r["params"], 1) for r in results}
    if len({(r["params"], r["tokens"]) for r in results}) < 5 or len(ratios) < 2:
        return None  # with one tokens-per-parameter ratio, N and D move together and the form is not identified
    lines = ["## Chinchilla form on validation loss: L = E + A/N^alpha + B/D^beta", ""]
    by_recipe: dict[str, list[dict]] = {}
    for r in results:
        by_recipe.setdefault(r["recipe"], []).append(r)
    for name, runs in by_recipe.items():
        if len({(r["params"], r["tokens"]) for r in runs}) < 5:
            continue
        try:
            fit = fit_chinchilla([r["params"] for r in runs], [r["tokens"] for r in runs],
                                 [r["validation"]["loss"] for r in runs])
        except ValueError:
            continue
        lines.append(f"- {name}: E={fit.E:.3f}, A={fit.A:.3g}, alpha={fit.alpha:.3f}, B={fit.B:.3g}, "
                     f"beta={fit.beta:.3f}")
    return "\n".join(lines) if len(lines) > 2 else None
