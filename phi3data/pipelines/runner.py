"""Run a pipeline over an input directory with any engine: plan shards, skip finished ones, merge stats.

Exactly once: an output shard is named from its input's content key and the recipe hash, written atomically,
and followed by a done marker. A rerun skips shards whose marker and outputs exist and redoes the others, so
after ``kill -9`` the output equals that of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from phi3data import __version__
from phi3data.documents import FINDING_SCHEMA
from phi3data.engines import engine_session, map_shards
from phi3data.engines.progress import drain
from phi3data.io.inputs import InputShard, plan_shards
from phi3data.io.readers import detect_format
from phi3data.io.writers import output_lock, remove_stale_tmp, write_json_atomic
from phi3data.pipelines.base import KeyedStage, merge_summaries
from phi3data.pipelines.pipeline import SEGMENTS_DIR, Pipeline, run_shard_task
from phi3data.pipelines.recipe import Recipe, RecipeError
from phi3data.pipelines.shuffle import ShuffleJob, sha256_file


def materialise_hf_dataset(name: str, target: Path) -> Path:
    """Save a Hugging Face hub dataset (``hf:org/name`` or ``hf:org/name:split``) as Arrow shards to read.

    Needs network access the first time; a directory saved with ``save_to_disk`` can be passed as input
    directly instead (its ``*.arrow`` files are the shards).
    """
    from phi3data.io.readers import load_hf_dataset

    if (target / "dataset_info.json").exists():
        return target
    repo, _, split = name.partition(":")
    load_hf_dataset(repo, split or "train").save_to_disk(str(target))
    return target


@dataclass
class RunSummary:
    output: Path
    stats: dict
    shards_total: int
    shards_skipped: int
    seconds: float


def run_pipeline(recipe: Recipe, input_path: Path, output: Path, *, engine: str = "local",
                 workers: int | None = None, ray_address: str | None = None, spark_master: str | None = None,
                 progress: bool = True) -> RunSummary:
    """Run ``recipe`` over every shard under ``input_path`` into ``output``; resumable and idempotent.

    The output directory is locked for the run: a second run on it fails at once (:class:`OutputLocked`).
    Paths are the driver's: workers on other processes or machines get them absolute, and run in the driver's
    working directory, so relative paths in a recipe (a classifier, benchmark files) mean the same everywhere."""
    output = Path(output).absolute()
    if not str(input_path).startswith("hf:"):
        input_path = Path(input_path).absolute()
    with output_lock(output):
        return _run_locked(recipe, input_path, output, engine=engine, workers=workers, ray_address=ray_address,
                           spark_master=spark_master, progress=progress)


def _run_locked(recipe: Recipe, input_path: Path, output: Path, *, engine: str, workers: int | None,
                ray_address: str | None, spark_master: str | None, progress: bool) -> RunSummary:
    started = time.perf_counter()
    pipeline = Pipeline(recipe)
    if str(input_path).startswith("hf:"):
        input_path = materialise_hf_dataset(str(input_path)[3:], output / "_hf_input")
    shards = plan_shards(input_path, recipe.input.format, recipe.input.image_root)
    if recipe.input.format == "auto" and not recipe.extracts_html():
        warc = [s.relpath for s in shards if detect_format(Path(s.path)) == "warc"]
        if warc:
            raise RecipeError(f"{input_path} holds WARC files ({warc[0]} ...) but the recipe "
                              f"{recipe.pipeline.name!r} has no extract stage to turn their HTML into text; "
                              f"add [[stage]] type = \"extract\" first")
    manifest_path = output / "manifest.json"
    if manifest_path.exists():
        previous = json.loads(manifest_path.read_text())
        if previous.get("recipe_hash") != pipeline.hash:
            raise RecipeError(f"{output} holds the output of another recipe (hash {previous.get('recipe_hash')}, "
                              f"this one is {pipeline.hash}); choose a new output directory")
    remove_stale_tmp(output)
    write_json_atomic(manifest_path, _manifest(recipe, pipeline, shards, engine, complete=False))

    recipe_json = json.dumps(recipe.model_dump(mode="json"), sort_keys=True)
    decision = None
    skipped = 0
    # several passes with work left: start Ray / Spark once for all of them, not once per pass
    unfinished = any(not _is_done(pipeline, output, s, pipeline.last_segment) for s in shards)
    session = engine_session(engine, workers=workers, ray_address=ray_address, spark_master=spark_master) \
        if pipeline.last_segment > 0 and unfinished else contextlib.nullcontext()
    with session:
        for segment in range(pipeline.last_segment + 1):
            pending = [s for s in shards if not _is_done(pipeline, output, s, segment)]
            if segment == pipeline.last_segment:
                skipped = len(shards) - len(pending)
            task = functools.partial(run_shard_task, recipe_json, str(output), segment=segment, decision=decision,
                                     recipe_hash=pipeline.hash, cwd=os.getcwd())
            items = [{"path": s.path, "relpath": s.relpath, "key": s.key} for s in _largest_first(pending)]
            results = map_shards(task, items, engine=engine, workers=workers, ray_address=ray_address,
                                 spark_master=spark_master)
            mapper = functools.partial(_map_tasks, engine=engine, workers=workers, ray_address=ray_address,
                                       spark_master=spark_master)
            label = engine if pipeline.last_segment == 0 else \
                f"{engine}, pass {segment + 1}/{pipeline.last_segment + 1}"
            drain(results, total=len(shards), skipped=len(shards) - len(pending), label=f"run ({label})",
                  count=lambda r: r["read"]["documents"], unit="docs", progress=progress)
            if segment < pipeline.last_segment:
                broken = _broken_intermediates(pipeline, output, shards, segment)
                if broken:  # a corrupt or missing intermediate file is rebuilt, never read
                    redo = [{"path": s.path, "relpath": s.relpath, "key": s.key} for s in broken]
                    drain(map_shards(task, redo, engine=engine, workers=workers, ray_address=ray_address,
                                     spark_master=spark_master), total=len(redo), skipped=0,
                          label=f"run ({engine}, rebuilding {len(redo)} intermediate shard(s))",
                          count=lambda r: r["read"]["documents"], unit="docs", progress=progress)
                decision = _decide(pipeline, output, shards, segment, mapper)

    per_segment = [[json.loads(pipeline.output_paths(output, s, k)["done"].read_text()) for s in shards]
                   for k in range(pipeline.last_segment + 1)]
    stats = merge_stats(per_segment[0])
    for later in per_segment[1:]:
        more = merge_stats(later)
        stats["stages"].extend(more["stages"])
        stats["rejects_out"] += more["rejects_out"]
        stats["documents_out"] = more["documents_out"]
    stats["decisions"] = {pipeline.segments[k].closing.name: json.loads(_decision_path(output, k).read_text())
                          for k in range(pipeline.last_segment)}
    stats["recipe_hash"] = pipeline.hash
    stats["engine"] = engine
    reports = _reports(pipeline, output, shards)
    if reports:
        stats["reports"] = reports
    per_shard = per_segment[-1]
    write_json_atomic(output / "stats.json", stats)
    write_json_atomic(manifest_path, _manifest(recipe, pipeline, shards, engine, complete=True, per_shard=per_shard))
    return RunSummary(output, stats, len(shards), skipped, time.perf_counter() - started)


def _decision_path(output: Path, segment: int) -> Path:
    return output / SEGMENTS_DIR / f"decision-{segment}.json"


def _map_tasks(fn, items: list[dict], *, engine: str, workers: int | None, ray_address: str | None,
               spark_master: str | None):
    return map_shards(fn, items, engine=engine, workers=workers, ray_address=ray_address, spark_master=spark_master)


def _broken_intermediates(pipeline: Pipeline, output: Path, shards: list[InputShard], segment: int) -> list:
    """Shards whose intermediate files for ``segment`` are missing or differ from the sha256 their pass recorded;
    their done markers are removed so they are redone. Checked only while the next pass still has work."""
    if all(_is_done(pipeline, output, s, segment + 1) for s in shards):
        return []
    broken = []
    for shard in shards:
        paths = pipeline.output_paths(output, shard, segment)
        done = json.loads(paths["done"].read_text())
        recorded = done.get("sha256", {})
        if any(not paths[name].exists() or sha256_file(paths[name]) != sha for name, sha in recorded.items()):
            paths["done"].unlink()
            broken.append(shard)
    if broken:
        _decision_path(output, segment).unlink(missing_ok=True)
    return broken


def _decide(pipeline: Pipeline, output: Path, shards: list[InputShard], segment: int, mapper) -> dict:
    """Let the segment's closing global stage decide: sum the per-shard summaries on the driver, or, for a keyed
    stage (dedup), run its shuffle on the engine.

    The decision is saved, and reused by a resumed run, so every shard of the next pass sees the same one.
    """
    path = _decision_path(output, segment)
    stage = pipeline.segments[segment].closing
    if path.exists():
        decision = json.loads(path.read_text())
        files = decision.get("resolved", {}) if isinstance(stage, KeyedStage) else {}
        if all((output / f).exists() and sha256_file(output / f) == sha for f, sha in files.items()):
            return decision
        path.unlink()  # what the shuffle resolved changed since: resolve again (its intact steps are reused)
    if isinstance(stage, KeyedStage):
        paths = [pipeline.output_paths(output, s, segment) for s in shards]
        job = ShuffleJob(work=output / SEGMENTS_DIR / str(segment) / "shuffle" / stage.name, output=output,
                         stems=[s.output_stem(pipeline.hash) for s in shards],
                         keys_files=[p["keys"] for p in paths],
                         data_files={s.output_stem(pipeline.hash): p["data"] for s, p in zip(shards, paths)},
                         mapper=mapper)
        stage.ensure_setup()
        decision = stage.resolve(job)
        write_json_atomic(path, decision)
        return decision
    summary: dict = {}
    for shard in shards:
        done = json.loads(pipeline.output_paths(output, shard, segment)["done"].read_text())
        summary = merge_summaries(summary, done.get("summary", {}))
    stage.ensure_setup()
    decision = stage.decide(summary)
    write_json_atomic(path, decision)
    return decision


def _reports(pipeline: Pipeline, output: Path, shards: list[InputShard]) -> dict:
    """Each stage's report over all its findings (``Stage.report``), also written to ``reports/<stage>.json``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    # ParquetFile, not read_table: no pyarrow.dataset import (0.2 s) for a run whose shards found nothing
    files = [pq.ParquetFile(pipeline.output_paths(output, s, k)["findings"])
             for k in range(pipeline.last_segment + 1) for s in shards]
    tables = [f.read() for f in files if f.metadata.num_rows]
    findings = pa.concat_tables(tables) if tables else None
    reports = {}
    for stage in pipeline.stages:
        mine = findings.filter(pc.equal(findings.column("stage"), stage.name)) if findings is not None else None
        if mine is None or mine.num_rows == 0:
            if not stage.reports_always:
                continue
            mine = FINDING_SCHEMA.empty_table()
        reports[stage.name] = stage.report(mine)
        write_json_atomic(output / "reports" / f"{stage.name}.json", reports[stage.name])
    return reports


def _largest_first(shards: list[InputShard]) -> list[InputShard]:
    """Big inputs start first, so no worker is left with a big one at the end while the others wait (the output
    does not depend on the order)."""
    return sorted(shards, key=lambda s: -Path(s.path).stat().st_size)


def _is_done(pipeline: Pipeline, output: Path, shard: InputShard, segment: int | None = None) -> bool:
    paths = pipeline.output_paths(output, shard, segment)
    return all(p.exists() for p in paths.values())


def merge_stats(per_shard: list[dict]) -> dict:
    """Sum per-shard stats into run totals: documents read, rejects by reason, per-stage in/out and drops."""
    read_rejects: Counter = Counter()
    stages: dict[str, dict] = {}
    docs_read = docs_out = rejects_out = 0
    for shard in per_shard:
        docs_read += shard["read"]["documents"]
        read_rejects.update(shard["read"]["rejects"])
        docs_out += shard["documents_out"]
        rejects_out += shard["rejects_out"]
        for s in shard["stages"]:
            total = stages.setdefault(s["name"], {"name": s["name"], "type": s["type"], "in": 0, "out": 0,
                                                  "seconds": 0.0, "drops": Counter(), "rejects": 0})
            total["in"] += s["in"]
            total["out"] += s["out"]
            total["seconds"] += s["seconds"]
            total["rejects"] += s["rejects"]
            total["findings"] = total.get("findings", 0) + s.get("findings", 0)
            total["drops"].update(s["drops"])
    for s in stages.values():
        s["drops"] = dict(sorted(s["drops"].items()))
        s["seconds"] = round(s["seconds"], 3)
    return {"shards": len(per_shard), "documents_read": docs_read, "documents_out": docs_out,
            "rejects_out": rejects_out, "read_rejects": dict(sorted(read_rejects.items())),
            "stages": list(stages.values()), "phi3data_version": __version__}


def _manifest(recipe: Recipe, pipeline: Pipeline, shards: list[InputShard], engine: str, *, complete: bool,
              per_shard: list[dict] | None = None) -> dict:
    entries = []
    for i, shard in enumerate(shards):
        entry = {"input": shard.relpath, "input_key": shard.key}
        if per_shard is not None:
            entry.update(per_shard[i]["outputs"])
            entry["documents"] = per_shard[i]["documents_out"]
            entry["rejects"] = per_shard[i]["rejects_out"]
        entries.append(entry)
    return {"pipeline": recipe.pipeline.name, "recipe_hash": pipeline.hash, "recipe": recipe.canonical(),
            "engine": engine, "complete": complete, "shards": entries, "phi3data_version": __version__}


def stats_table(stats: dict):
    """A rich Table of per-stage documents in/out and drops by reason."""
    from rich.table import Table

    table = Table(title=f"phi3data run: {stats['documents_read']} documents read -> "
                        f"{stats['documents_out']} kept, {stats['rejects_out']} rejected as bad input")
    table.add_column("stage")
    table.add_column("in", justify="right")
    table.add_column("out", justify="right")
    table.add_column("kept %", justify="right")
    table.add_column("drops by reason")
    table.add_column("s", justify="right")
    if stats["read_rejects"]:
        table.add_row("read (rejects)", "", "", "",
                      ", ".join(f"{k}={v}" for k, v in stats["read_rejects"].items()), "")
    for s in stats["stages"]:
        kept = f"{100 * s['out'] / s['in']:.1f}" if s["in"] else "-"
        reasons = ", ".join(f"{k.split(':', 1)[-1]}={v}" for k, v in sorted(s["drops"].items(), key=lambda x: -x[1]))
        if s["rejects"]:
            reasons = (reasons + ", " if reasons else "") + f"rejected={s['rejects']}"
        table.add_row(s["name"], str(s["in"]), str(s["out"]), kept, reasons, f"{s['seconds']:.1f}")
    return table
