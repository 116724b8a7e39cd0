"""The quickstart: curate -> train an edu classifier -> filter by it -> a 3-size x 2-recipe ladder -> plot and report.

Everything runs on the shared real data on this machine's CPU, in about 8 minutes on 2 cores. Each step is
resumable, so rerunning the quickstart after an interruption continues where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from phi3data.config import read_toml
from phi3data.paths import shared_data, use_shared_data

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_PREFIX = "../shared/data/"
"""How the repository's recipes name the shared data; the quickstart maps it to ``--data``."""


def run_quickstart(output: Path, data: Path | None = None, engine: str = "local", console: Console | None = None,
                   ladder: Path = REPO_ROOT / "model" / "ladder-quickstart.toml") -> dict[str, Path]:
    """Run every step; returns where the results are. ``data`` (default: :func:`phi3data.paths.shared_data`) is
    used for everything: the web sample, the classifier's sources, tokenizers and benchmarks (workers too)."""
    from phi3data.classifiers.train import load_config, train_from_config
    from phi3data.pipelines.recipe import load_recipe
    from phi3data.pipelines.runner import run_pipeline, stats_table
    from phi3data.scaling.ladder import load_ladder, run_ladder
    from phi3data.scaling.report import write_report

    console = console or Console()
    data = Path(data or shared_data()).resolve()
    warc = data / "web" / "warc"
    if not warc.exists():
        raise FileNotFoundError(f"the shared WARC sample is missing at {warc}; pass --data DIR")
    if not (REPO_ROOT / "pipelines" / "web_quality.toml").exists():
        raise FileNotFoundError(f"the quickstart runs the repository's recipes (pipelines/, classifiers/, model/), "
                                f"which are not beside this install ({REPO_ROOT}); run it from a clone")
    output = output.resolve()
    use_shared_data(data)  # only once the folder is known good: workers and later steps inherit it
    started = time.perf_counter()

    def step(title: str) -> None:
        console.rule(f"[bold]{title}[/bold]  ({time.perf_counter() - started:.0f}s)")

    step("1/4 curate: pipelines/web_quality.toml over the shared WARC sample")
    curated = run_pipeline(load_recipe(REPO_ROOT / "pipelines" / "web_quality.toml"), warc, output / "web_quality",
                           engine=engine)
    console.print(stats_table(curated.stats))

    step("2/4 classify: the default edu classifier (fastText, DCLM human labels + OpenStax textbooks)")
    classifier_dir = output / "classifiers" / "edu_default"
    if not (classifier_dir / "manifest.json").exists():
        config = load_config(REPO_ROOT / "classifiers" / "edu_default.toml")
        for source in [*config.source, *(e.source for e in config.eval)]:
            source.path = _resolve_source(source.path, output, data)
        trained = train_from_config(config, base=REPO_ROOT, output=classifier_dir)
        console.print(f"classifier saved to {trained.output}")

    step("3/4 filter: pipelines/edu.toml keeps the top 30% of curated pages by edu score")
    edu = read_toml(REPO_ROOT / "pipelines" / "edu.toml", "recipe")
    for stage in edu["stage"]:
        if stage["type"] == "edu_score":
            stage["model"] = str(classifier_dir)
    filtered = run_pipeline(load_recipe(edu), warc, output / "edu", engine=engine)
    console.print(stats_table(filtered.stats))

    step("4/4 ablate: 3 sizes x 2 recipes (heuristic web vs edu web + textbooks)")
    ablate_dir = output / "ablate"
    run_ladder(load_ladder(ladder, lambda source: _resolve_source(source, output, data)), ablate_dir)
    report = write_report(ablate_dir)
    console.rule(f"[bold]done in {time.perf_counter() - started:.0f}s[/bold]")
    results = {"curated": output / "web_quality" / "data", "classifier": classifier_dir,
               "edu": output / "edu" / "data", "report": report}
    results.update({png.stem: png for png in sorted(ablate_dir.glob("scaling_*.png"))})
    for name, path in results.items():
        console.print(f"{name:>24}: {path}")
    return results


def _resolve_source(source: str, output: Path, data: Path) -> str:
    """Ladder sources name the quickstart's own outputs (out/quickstart/...) and the shared data (../shared/data)."""
    if source.startswith("out/quickstart/"):
        return str(output / source.removeprefix("out/quickstart/"))
    if source.startswith(SHARED_PREFIX):
        return str(data / source.removeprefix(SHARED_PREFIX))
    return str((REPO_ROOT / source).resolve())
