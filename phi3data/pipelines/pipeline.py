"""Pipeline: read one input shard, push its documents through the stages, write output and rejects atomically.

This is the unit of work every engine runs. It is deterministic: the same shard and recipe give the same
output bytes-for-rows on any engine, so a rerun can simply redo an unfinished shard.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from phi3data.documents import REJECT_SCHEMA, make_batch, make_rejects
from phi3data.io.readers import detect_format, read_records
from phi3data.io.writers import ShardWriter, write_json_atomic
from phi3data.pipelines.recipe import Recipe, load_recipe

DATA_DIR = "data"
REJECTS_DIR = "rejects"
PROGRESS_DIR = "_progress"


@dataclass(frozen=True)
class InputShard:
    """One unit of work: an input file, its path relative to the input root, and a content key."""

    path: str
    relpath: str
    key: str

    def output_stem(self, recipe_hash: str) -> str:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", self.relpath)
        return f"{stem}-{self.key[:10]}-{recipe_hash[:10]}"


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

    def output_paths(self, out_dir: Path, shard: InputShard) -> dict[str, Path]:
        stem = shard.output_stem(self.hash)
        ext = "parquet" if self.recipe.output.format == "parquet" else "jsonl"
        return {"data": out_dir / DATA_DIR / f"{stem}.{ext}",
                "rejects": out_dir / REJECTS_DIR / f"{stem}.parquet",
                "done": out_dir / PROGRESS_DIR / f"{stem}.json"}

    def run_batch(self, batch: pa.Table, stats: list[dict]) -> tuple[pa.Table, list[dict]]:
        """Push one batch through every stage, adding to per-stage stats; returns kept docs and rejects."""
        rejects: list[dict] = []
        for stage, stage_stats in zip(self.stages, stats):
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
        return batch, rejects

    def process_shard(self, shard: InputShard, out_dir: Path) -> dict:
        """Process one input shard end to end and return its stats (also written as its done marker)."""
        started = time.perf_counter()
        cfg_in, cfg_out = self.recipe.input, self.recipe.output
        path = Path(shard.path)
        fmt = detect_format(path) if cfg_in.format == "auto" else cfg_in.format
        with_html = fmt == "warc"
        paths = self.output_paths(out_dir, shard)
        for p in paths.values():
            p.parent.mkdir(parents=True, exist_ok=True)
        stage_stats = [{"name": s.name, "type": s.type_name, "in": 0, "out": 0, "seconds": 0.0,
                        "drops": Counter(), "rejects": 0} for s in self.stages]
        read_rejects: Counter = Counter()
        docs_read = 0
        writer = ShardWriter(paths["data"], cfg_out.format, cfg_out.compression)
        reject_writer = ShardWriter(paths["rejects"], "parquet", cfg_out.compression)
        try:
            empty_out, _ = self.run_batch(make_batch([], with_html=with_html), _fresh(stage_stats))
            pending: list[dict] = []
            pending_rejects: list[dict] = []

            def flush() -> None:
                if pending:
                    kept, rejects = self.run_batch(make_batch(pending, with_html=with_html), stage_stats)
                    if kept.num_rows:
                        writer.write(kept)
                    pending_rejects.extend(rejects)
                    pending.clear()
                if pending_rejects:
                    reject_writer.write(make_rejects(pending_rejects))
                    pending_rejects.clear()

            records = read_records(path, fmt=fmt, source=cfg_in.source or shard.relpath,
                                   max_document_bytes=cfg_in.max_document_bytes, text_key=cfg_in.text_key,
                                   id_key=cfg_in.id_key, url_key=cfg_in.url_key)
            for record in records:
                if record.pop("reject", False):
                    read_rejects[record["reason"]] += 1
                    pending_rejects.append(record)
                    continue
                docs_read += 1
                pending.append(record)
                if len(pending) >= cfg_out.batch_size:
                    flush()
            flush()
            writer.close(empty_schema=empty_out.schema)
            reject_writer.close(empty_schema=REJECT_SCHEMA)
        except BaseException:
            writer.abort()
            reject_writer.abort()
            raise
        for s in stage_stats:
            s["drops"] = dict(sorted(s["drops"].items()))
            s["seconds"] = round(s["seconds"], 4)
        stats = {
            "shard": shard.relpath,
            "input_key": shard.key,
            "recipe_hash": self.hash,
            "outputs": {"data": paths["data"].name, "rejects": paths["rejects"].name},
            "read": {"documents": docs_read, "rejects": dict(sorted(read_rejects.items()))},
            "stages": stage_stats,
            "documents_out": writer.rows,
            "rejects_out": reject_writer.rows,
            "seconds": round(time.perf_counter() - started, 4),
        }
        write_json_atomic(paths["done"], stats)
        return stats


def _fresh(stage_stats: list[dict]) -> list[dict]:
    return [{"in": 0, "out": 0, "seconds": 0.0, "drops": Counter(), "rejects": 0} for _ in stage_stats]


_PIPELINES: dict[str, Pipeline] = {}


def run_shard_task(recipe_json: str, out_dir: str, shard: dict) -> dict:
    """Engine entry point (picklable): process one shard. The Pipeline, and the models its stages load, are
    kept per worker process so each worker loads them once."""
    pipeline = _PIPELINES.get(recipe_json)
    if pipeline is None:
        pipeline = _PIPELINES[recipe_json] = Pipeline(load_recipe(json.loads(recipe_json)))
    return pipeline.process_shard(InputShard(**shard), Path(out_dir))
