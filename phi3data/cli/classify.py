"""The classifier plane's commands, ``phi3data classify annotate / train / evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def annotate(
    inputs: Annotated[list[Path], typer.Argument(help="JSONL/Parquet/WARC files or directories to sample from")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Annotations JSONL (appended; reruns resume)")],
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible API root")] = "http://127.0.0.1:8000/v1",
    model: Annotated[str, typer.Option(help="Model name the server knows")] = "default",
    api_key_env: Annotated[str, typer.Option(help="Environment variable holding the API key")] = "OPENAI_API_KEY",
    sample: Annotated[int, typer.Option("--sample", "-n", help="Documents to annotate")] = 100,
    seed: Annotated[int, typer.Option(help="Sampling seed")] = 0,
    rubric: Annotated[Path | None, typer.Option(help="Rubric template with a {text} placeholder, or a built-in: "
                                                     "edu_additive (default), knowledge_level")] = None,
    max_doc_chars: Annotated[int, typer.Option(help="Characters of each document shown to the LLM")] = 4000,
    max_tokens: Annotated[int, typer.Option(help="Completion tokens per reply")] = 128,
    json_mode: Annotated[bool, typer.Option(help="Ask for a JSON reply constrained by a schema")] = False,
    concurrency: Annotated[int, typer.Option(help="Requests in flight")] = 8,
    timeout: Annotated[float, typer.Option(help="Per-request timeout, seconds")] = 120.0,
    cache: Annotated[Path | None, typer.Option(help="Request cache (SQLite); default: OUTPUT.cache.sqlite")] = None,
    price_in: Annotated[float, typer.Option(help="Price per million prompt tokens, for the estimate")] = 0.0,
    price_out: Annotated[float, typer.Option(help="Price per million completion tokens, for the estimate")] = 0.0,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Start without asking after the estimate")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the estimate and stop")] = False,
) -> None:
    """Grade a sample of documents 0-5 with the educational rubric, plus a level (primary ... expert); with
    --rubric knowledge_level, 0-5 for lasting knowledge against ephemeral, time-bound facts.

    Example: phi3data classify annotate ../shared/data/quality/dclm_majority_labeled.jsonl -o out/annotations.jsonl
    --base-url http://127.0.0.1:8080/v1 --sample 200 --yes
    """
    from phi3data.classifiers.annotate import plan_annotation, run_annotation
    from phi3data.generators.client import ClientConfig, LLMClient

    plan = plan_annotation([str(p) for p in inputs], output, n=sample, seed=seed, rubric=rubric,
                           max_doc_chars=max_doc_chars, max_tokens=max_tokens, json_mode=json_mode,
                           price_in_per_m=price_in, price_out_per_m=price_out)
    console.print(f"{plan.already_done} already annotated in {output}; to do: {plan.estimate.describe()}")
    if dry_run or not plan.documents:
        return
    if not yes and not typer.confirm("Start?"):
        raise typer.Exit(1)
    config = ClientConfig(base_url=base_url, model=model, api_key_env=api_key_env, max_concurrency=concurrency,
                          timeout_s=timeout, cache_path=str(cache or output.with_suffix(".cache.sqlite")))
    result = run_annotation(plan, LLMClient(config), output, max_tokens=max_tokens, json_mode=json_mode)
    console.print(f"status: {dict(result.status)}  scores: {dict(sorted(result.scores.items()))}")
    console.print(f"usage: {result.usage}")


def train(
    recipe: Annotated[Path, typer.Argument(help="Classifier recipe (TOML), e.g. classifiers/edu_fasttext_dclm.toml")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Override the recipe's output dir")] = None,
) -> None:
    """Train a fastText or embedding classifier from a recipe, measure it, and save it with a manifest.

    Example: phi3data classify train classifiers/edu_default.toml
    """
    from phi3data.classifiers.train import load_config, train_from_config

    result = train_from_config(load_config(recipe), output=output)
    console.print(metrics_table(result.manifest["metrics"]))
    for source, counts in result.skipped.items():
        console.print(f"left out of {source}: " + ", ".join(f"{reason}={n}" for reason, n in counts.items()))
    console.print(f"threshold {result.manifest['threshold']:.4f}; saved to {result.output} "
                  f"(manifest.json, metrics.json, sweep_*.md/png) in {result.seconds:.1f}s")


def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="A saved classifier directory")],
    data: Annotated[Path, typer.Argument(help="Labelled JSONL/Parquet file or directory")],
    label_key: Annotated[str, typer.Option(help="Field holding the label (0/1, or a 0-5 grade)")] = "label",
    task: Annotated[str, typer.Option(help="binary | ordinal")] = "binary",
    threshold: Annotated[float | None, typer.Option(help="Decision threshold; default: the manifest's")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write the sweep md/png")] = None,
) -> None:
    """Measure a saved classifier on labelled data: P/R/F1, ROC-AUC, confusion matrix, threshold sweep.

    Example: phi3data classify evaluate out/classifiers/edu_default
    ../shared/data/quality/dclm_majority_labeled.jsonl -o out/eval_dclm
    """
    from collections import Counter

    import numpy as np

    from phi3data.classifiers.data import SourceConfig, load_source
    from phi3data.classifiers.evaluate import evaluate_scores, plot_sweep, sweep_markdown
    from phi3data.classifiers.saved import load_classifier
    from phi3data.io.writers import write_json_atomic

    classifier, manifest = load_classifier(model_dir)
    skipped: Counter = Counter()
    examples = load_source(SourceConfig(path=str(data), label_key=label_key), skipped=skipped)
    if not examples:
        raise ValueError(f"no documents with a {label_key!r} label in {data}")
    if skipped:
        console.print(f"left out of {data}: " + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
    scores = classifier.predict([e.text for e in examples])
    report = evaluate_scores(scores, np.array([e.label for e in examples]), [e.text for e in examples], task=task,
                             threshold=manifest["threshold"] if threshold is None else threshold)
    report["skipped"] = dict(sorted(skipped.items()))
    console.print(metrics_table({data.name: report}))
    console.print(sweep_markdown(report["sweep"]))
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "sweep.md").write_text(sweep_markdown(report["sweep"]), encoding="utf-8")
        plot_sweep(report["sweep"], output / "sweep.png", title=f"{model_dir.name} on {data.name}")
        write_json_atomic(output / "metrics.json", report, default=float)
        console.print(f"wrote {output}/sweep.md, sweep.png, metrics.json")


def metrics_table(metrics: dict[str, dict]) -> Table:
    """One row per evaluation set: n, ROC-AUC, P/R/F1 and the confusion matrix."""
    table = Table("eval set", "n", "ROC-AUC", "precision", "recall", "F1", "confusion (tn fp / fn tp)")
    for name, m in metrics.items():
        table.add_row(name, str(m["n"]), f"{m['roc_auc']:.3f}", f"{m['precision']:.3f}", f"{m['recall']:.3f}",
                      f"{m['f1']:.3f}", str(m["confusion_matrix"]))
    return table
