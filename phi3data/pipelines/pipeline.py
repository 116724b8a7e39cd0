"""Pipeline: read one input shard, push its documents through the stages, write output and rejects atomically.

This is the unit of work every engine runs. It is deterministic: the same shard and recipe give the same
rows on any engine, so a rerun can simply redo an unfinished shard.

A recipe with global stages (``GlobalStage``: percentile thresholds, token budgets ...) is cut into segments at
each of them. Segment 0 reads the input shard; segment k > 0 reads segment k-1's intermediate Parquet for the
same shard and starts by applying the global stage's decision, which the runner computed on the driver from
the summaries segment k-1 returned.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from phi3data.documents import FINDING_SCHEMA, REJECT_SCHEMA, make_batch, make_findings, make_rejects
from phi3data.io.inputs import InputShard
from phi3data.io.readers import detect_format, read_records
from phi3data.io.writers import ShardWriter, write_json_atomic
from phi3data.multimodal import readers as mm
from phi3data.multimodal.readers import ReadBatch
from phi3data.multimodal.records import SCHEMAS
from phi3data.pipelines.base import GlobalStage, KeyedStage, Stage, StageOutput, merge_summaries
from phi3data.pipelines.recipe import MULTIMODAL_FORMATS, Recipe, load_recipe
from phi3data.pipelines.shuffle import node_name, read_shard_rows, sha256_file, write_keys
from phi3data.pipelines.stages import stage_class

DATA_DIR = "data"
REJECTS_DIR = "rejects"
FINDINGS_DIR = "findings"
PROGRESS_DIR = "_progress"
SEGMENTS_DIR = "_segments"


@dataclass
class Segment:
    """Stages between global stages: ``opening`` (applied first, with its decision) and ``closing`` (summarised
    at the end, decided on the driver before the next segment)."""

    stages: list[Stage] = field(default_factory=list)
    opening: GlobalStage | None = None
    closing: GlobalStage | None = None


class _Decided(Stage):
    """A global stage bound to its decision, so it runs like any other stage."""

    def __init__(self, stage: GlobalStage, decision: dict):
        super().__init__(stage.params, name=stage.name)
        self.type_name = stage.type_name
        self.stage = stage
        self.decision = decision
        self.resolved: pa.Table | None = None

    def bind_shard(self, out_dir: Path, stem: str) -> None:
        """A keyed stage reads the rows its shuffle resolved for this shard."""
        if isinstance(self.stage, KeyedStage):
            self.resolved = read_shard_rows([str(out_dir / f) for f in sorted(self.decision["resolved"])], stem)

    def setup(self) -> None:
        self.stage.ensure_setup()

    def process(self, batch: pa.Table) -> StageOutput:
        if isinstance(self.stage, KeyedStage):
            return self.stage.apply_resolved(batch, self.decision, self.resolved)
        return self.stage.apply(batch, self.decision)


class Pipeline:
    """A recipe's stages, ready to run over shards."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.hash = recipe.config_hash()
        self.stages = recipe.build_stages()
        names = [s.name for s in self.stages]
        duplicated = {n for n in names if names.count(n) > 1}
        if duplicated:
            raise ValueError(f"stage names must be unique; give these a 'name': {', '.join(sorted(duplicated))}")
        self.segments = [Segment()]
        for stage in self.stages:
            if isinstance(stage, GlobalStage):
                self.segments[-1].closing = stage
                self.segments.append(Segment(opening=stage))
            else:
                self.segments[-1].stages.append(stage)

    @property
    def last_segment(self) -> int:
        return len(self.segments) - 1

    def output_paths(self, out_dir: Path, shard: InputShard, segment: int | None = None) -> dict[str, Path]:
        """Where a shard's outputs go for one segment (the last segment by default: the final outputs)."""
        segment = self.last_segment if segment is None else segment
        stem = shard.output_stem(self.hash)
        side = f"{stem}.parquet" if segment == 0 else f"{stem}.s{segment}.parquet"
        rejects, findings = out_dir / REJECTS_DIR / side, out_dir / FINDINGS_DIR / side
        if segment == self.last_segment:
            ext = "parquet" if self.recipe.output.format == "parquet" else "jsonl"
            return {"data": out_dir / DATA_DIR / f"{stem}.{ext}", "rejects": rejects, "findings": findings,
                    "done": out_dir / PROGRESS_DIR / f"{stem}.json"}
        base = out_dir / SEGMENTS_DIR / str(segment)
        paths = {"data": base / f"{stem}.parquet", "rejects": rejects, "findings": findings,
                 "done": base / PROGRESS_DIR / f"{stem}.json"}
        if isinstance(self.segments[segment].closing, KeyedStage):
            paths["keys"] = base / "keys" / f"{stem}.parquet"
        return paths

    def segment_stages(self, segment: int, decision: dict | None) -> list[Stage]:
        seg = self.segments[segment]
        if seg.opening is None:
            return list(seg.stages)
        if decision is None:
            raise ValueError(f"segment {segment} starts with global stage {seg.opening.name} and needs its decision")
        return [_Decided(seg.opening, decision), *seg.stages]

    @staticmethod
    def run_batch(stages: list[Stage], batch: pa.Table, stats: list[dict]) -> tuple[pa.Table, list[dict],
                                                                                     list[pa.Table]]:
        """Push one batch through the stages, adding to per-stage stats; returns kept docs, rejects and
        findings (one table per stage that found something)."""
        rejects: list[dict] = []
        findings: list[pa.Table] = []
        for stage, stage_stats in zip(stages, stats):
            stage.ensure_setup()
            started = time.perf_counter()
            rows_in = batch.num_rows
            result = stage.process(batch)
            batch = result.batch
            stage_stats["in"] += rows_in
            stage_stats["out"] += batch.num_rows
            stage_stats["seconds"] += time.perf_counter() - started
            stage_stats["drops"].update(result.drops)
            stage_stats["rejects"] += len(result.rejects)
            rejects.extend(result.rejects)
            if result.findings:
                stage_stats["findings"] = stage_stats.get("findings", 0) + len(result.findings)
                findings.append(make_findings(stage.name, result.findings))
        return batch, rejects, findings

    def _input_batches(self, shard: InputShard, out_dir: Path, segment: int, read_rejects: Counter,
                       pending_rejects: list[dict], first: tuple[Stage, dict] | None = None):
        """Yield document batches for a segment: parsed input for segment 0, the previous segment's rows after.

        ``first``: a stage that takes WARC records as read (``process_records``) and its stats; it runs here,
        before the batch is built, and the batches yielded are its output."""
        cfg_in, batch_size = self.recipe.input, self.recipe.output.batch_size
        if segment > 0:
            previous = self.output_paths(out_dir, shard, segment - 1)["data"]
            for record_batch in pq.ParquetFile(previous).iter_batches(batch_size=batch_size):
                yield pa.Table.from_batches([record_batch])
            return
        path = Path(shard.path)
        fmt = self._input_format(shard)
        if fmt in MULTIMODAL_FORMATS:
            for read in self._read_multimodal(shard, fmt):
                for row in read.rejects.to_pylist():
                    read_rejects[row["reason"]] += 1
                    pending_rejects.append(row)
                if read.records.num_rows:
                    yield read.records
            return
        with_html = fmt == "warc"
        # With a fixed [input] source, ids of records without their own still name the shard, so they stay unique
        records = read_records(path, fmt=fmt, source=cfg_in.source or shard.relpath,
                               id_prefix=f"{cfg_in.source}:{shard.relpath}" if cfg_in.source else None,
                               max_document_bytes=cfg_in.max_document_bytes, text_key=cfg_in.text_key,
                               id_key=cfg_in.id_key, url_key=cfg_in.url_key)
        pending: list[dict] = []
        for record in records:
            if record.pop("reject", False):
                read_rejects[record["reason"]] += 1
                pending_rejects.append(record)
                continue
            pending.append(record)
            if len(pending) >= batch_size:
                yield self._make_input_batch(pending, with_html, first, pending_rejects)
                pending = []
        if pending:
            yield self._make_input_batch(pending, with_html, first, pending_rejects)

    @staticmethod
    def _make_input_batch(records: list[dict], with_html: bool, first: tuple[Stage, dict] | None,
                          pending_rejects: list[dict]) -> pa.Table:
        if first is None or not with_html:
            return make_batch(records, with_html=with_html)
        stage, stats = first
        stage.ensure_setup()
        started = time.perf_counter()
        kept, drops, rejects = stage.process_records(records)
        stats["in"] += len(records)
        stats["out"] += len(kept)
        stats["drops"].update(drops)
        stats["rejects"] += len(rejects)
        pending_rejects.extend(rejects)
        batch = make_batch(kept)
        stats["seconds"] += time.perf_counter() - started
        return batch

    def _input_format(self, shard: InputShard) -> str:
        fmt = self.recipe.input.format
        return detect_format(Path(shard.path)) if fmt == "auto" else fmt

    def _read_multimodal(self, shard: InputShard, fmt: str) -> Iterator[ReadBatch]:
        """Image-text records of one input shard, in batches, with the rejects met while reading them."""
        cfg_in, rows = self.recipe.input, self.recipe.output.batch_size
        path, source = Path(shard.path), self.recipe.input.source or shard.relpath
        if fmt == "llava":
            root = Path(cfg_in.image_root) if cfg_in.image_root else path.parent
            return mm.read_llava(path, root, source=source, batch_rows=rows)
        if fmt == "cauldron":
            return mm.read_cauldron(path, source=source, batch_rows=rows)
        if fmt == "webdataset":
            return mm.read_webdataset(path, source=source, batch_rows=rows)
        if fmt == "warc_images":
            return mm.read_warc_images(path, source=source, batch_rows=rows)
        if fmt == "urls":
            return mm.read_url_list(path, source=source, batch_rows=rows)
        return mm.read_records_parquet(path, batch_rows=rows)

    def _empty_input(self, shard: InputShard, out_dir: Path, segment: int) -> pa.Table:
        if segment > 0:
            return pq.read_schema(self.output_paths(out_dir, shard, segment - 1)["data"]).empty_table()
        path = Path(shard.path)
        fmt = self._input_format(shard)
        if fmt in MULTIMODAL_FORMATS:
            return _record_schema(path, fmt).empty_table()
        return make_batch([], with_html=fmt == "warc")

    def process_shard(self, shard: InputShard, out_dir: Path, segment: int = 0,
                      decision: dict | None = None) -> dict:
        """Run one segment of the pipeline over one shard and return its stats (also written as a done marker)."""
        started = time.perf_counter()
        cfg_out = self.recipe.output
        final = segment == self.last_segment
        stages = self.segment_stages(segment, decision)
        stem = shard.output_stem(self.hash)
        for stage in stages:
            if isinstance(stage, _Decided):
                stage.bind_shard(out_dir, stem)
        closing = self.segments[segment].closing
        keyed = isinstance(closing, KeyedStage)
        keys: list[pa.Table] = []
        paths = self.output_paths(out_dir, shard, segment)
        for p in paths.values():
            p.parent.mkdir(parents=True, exist_ok=True)
        stage_stats = [{"name": s.name, "type": s.type_name, "in": 0, "out": 0, "seconds": 0.0,
                        "drops": Counter(), "rejects": 0} for s in stages]
        read_rejects: Counter = Counter()
        pending_rejects: list[dict] = []
        docs_read = 0
        summary: dict = {}
        writer = ShardWriter(paths["data"], cfg_out.format if final else "parquet", cfg_out.compression)
        reject_writer = ShardWriter(paths["rejects"], "parquet", cfg_out.compression)
        finding_writer = ShardWriter(paths["findings"], "parquet", cfg_out.compression)
        try:
            scratch = [{"in": 0, "out": 0, "seconds": 0.0, "drops": Counter(), "rejects": 0} for _ in stages]
            empty_out, _, _ = self.run_batch(stages, self._empty_input(shard, out_dir, segment), scratch)
            # a first stage that works on WARC records as read (extract) runs inside the reading
            first = ((stages[0], stage_stats[0]) if segment == 0 and stages and self._input_format(shard) == "warc"
                     and hasattr(stages[0], "process_records") else None)
            later = slice(1 if first else 0, None)
            for batch in self._input_batches(shard, out_dir, segment, read_rejects, pending_rejects, first):
                docs_read += batch.num_rows
                kept, rejects, findings = self.run_batch(stages[later], batch, stage_stats[later])
                for table in findings:
                    finding_writer.write(table)
                if kept.num_rows:
                    writer.write(kept)
                    if keyed:
                        closing.ensure_setup()
                        rows = closing.keys(kept)
                        keys.append(rows.append_column("node", pa.array(
                            node_name(rows.column("id").to_pylist(), stem), pa.string())).drop_columns(["id"]))
                    elif closing is not None:
                        closing.ensure_setup()
                        summary = merge_summaries(summary, closing.summarize(kept))
                pending_rejects.extend(rejects)
                if pending_rejects:
                    reject_writer.write(make_rejects(pending_rejects))
                    pending_rejects.clear()
            if pending_rejects:
                reject_writer.write(make_rejects(pending_rejects))
            if first:
                docs_read = stage_stats[0]["in"]  # the batches counted above are what the first stage kept
            writer.close(empty_schema=empty_out.schema)
            reject_writer.close(empty_schema=REJECT_SCHEMA)
            finding_writer.close(empty_schema=FINDING_SCHEMA)
            if keyed:
                empty = pa.table({"band": pa.array([], pa.int16()), "key": pa.array([], pa.uint64()),
                                  "node": pa.array([], pa.string())})
                write_keys(pa.concat_tables([empty.cast(t.schema) for t in keys[:1]] + keys) if keys else empty,
                           paths["keys"], closing.params.partitions)
        except BaseException:
            writer.abort()
            reject_writer.abort()
            finding_writer.abort()
            raise
        for s in stage_stats:
            s["drops"] = dict(sorted(s["drops"].items()))
            s["seconds"] = round(s["seconds"], 4)
        stats = {
            "shard": shard.relpath,
            "input_key": shard.key,
            "recipe_hash": self.hash,
            "segment": segment,
            "outputs": {"data": paths["data"].name, "rejects": paths["rejects"].name,
                        "findings": paths["findings"].name},
            "read": {"documents": docs_read, "rejects": dict(sorted(read_rejects.items()))},
            "stages": stage_stats,
            "documents_out": writer.rows,
            "rejects_out": reject_writer.rows,
            "findings_out": finding_writer.rows,
            "seconds": round(time.perf_counter() - started, 4),
        }
        if closing is not None:
            stats["summary"] = summary
        if not final:  # the next pass and the shuffle check these before reading them
            stats["sha256"] = {name: sha256_file(paths[name]) for name in ("data", "keys") if name in paths}
        write_json_atomic(paths["done"], stats)
        return stats


_FORMAT_KINDS = {"llava": "conversation", "cauldron": "conversation", "webdataset": "pair", "warc_images": "image",
                 "urls": "url"}


def _record_schema(path: Path, fmt: str) -> pa.Schema:
    """The schema of the records an image-text input gives (``records``: the kind its parquet holds, with the
    columns stages added)."""
    if fmt in _FORMAT_KINDS:
        return SCHEMAS[_FORMAT_KINDS[fmt]]
    return mm.record_schema(path)[1]


_PIPELINES: dict[str, Pipeline] = {}


def run_shard_task(recipe_json: str, out_dir: str, shard: dict, segment: int = 0,
                   decision: dict | None = None, recipe_hash: str | None = None, cwd: str | None = None) -> dict:
    """Engine entry point (picklable): run one segment over one shard. The Pipeline, and the models its stages
    load, are kept per worker process so each worker loads them once. ``recipe_hash`` is the driver's: a worker
    that sees other model files (a classifier retrained mid-run) refuses instead of mixing them into the output.
    ``cwd`` is the driver's working directory: the task runs there, so a recipe's relative paths resolve as they
    do on the driver (Spark executors and Ray workers start elsewhere)."""
    if cwd is not None and os.path.isdir(cwd) and os.getcwd() != cwd:
        # Stage modules load lazily: import this recipe's before leaving the worker's directory, where a relative
        # import path still resolves (Spark's --py-files zip is on sys.path, and in package paths, as ./NAME.zip).
        for spec in json.loads(recipe_json).get("stage", []):
            stage_class(spec.get("type"))
        os.chdir(cwd)
    pipeline = _PIPELINES.get(recipe_json)
    if pipeline is None or (recipe_hash is not None and pipeline.hash != recipe_hash):
        # first use in this process, or the cached one was built over other model files (an earlier run)
        pipeline = _PIPELINES[recipe_json] = Pipeline(load_recipe(json.loads(recipe_json)))
    if recipe_hash is not None and pipeline.hash != recipe_hash:
        raise RuntimeError(f"the files this recipe loads changed during the run (driver recipe hash {recipe_hash}, "
                           f"worker {pipeline.hash}): rerun to start over with the new ones")
    return pipeline.process_shard(InputShard(**shard), Path(out_dir), segment, decision)
