"""Examples of dropped documents, by replaying a deterministic sample of the run's input through its stages.

A run keeps only what it keeps: ``stats.json`` counts each drop by reason, but the dropped documents are gone. Given
the run's input (``phi3data report DIR --input PATH``; ``phi3data run`` passes its own), the report reads the
input shards the manifest lists (at most REPLAY_SHARDS of them, the first SCAN_RECORDS records of each), takes the
documents with the smallest id hashes among them (``limit`` in all), and pushes
each one alone through the recipe's stages, so the stage and reason that drop it are known exactly. Global stages
apply the run's saved decision; a keyed global stage (dedup) ends the replay (its drops are findings already).
"""

from __future__ import annotations

import math
from pathlib import Path

from phi3data.report.sample import Reservoir, excerpt, id_hash

REPLAY_LIMIT = 240
REPLAY_SHARDS = 16
"""Input shards replayed at most (those with the smallest hash of their name): a large run's report reads a bounded
part of its input."""
SCAN_RECORDS = 2_000
"""Records read per replayed shard; the sample is drawn from them."""


def recipe_of(manifest: dict):
    """The run's recipe, rebuilt from the canonical form its manifest records."""
    from phi3data.pipelines.recipe import load_recipe

    canonical = manifest["recipe"]
    return load_recipe({"pipeline": {"name": manifest.get("pipeline") or "run"},
                        "input": canonical["input"], "output": canonical["output"],
                        "stage": [{"type": s["type"], "name": s["name"], **s["params"]} for s in canonical["stages"]]})


def replay_drops(manifest: dict, stats: dict, input_path: Path, limit: int = REPLAY_LIMIT) -> dict:
    """``{"sampled": n, "drops": [{"stage", "reason", "id", "url", "source", "text", "language"...}], "kept": n,
    "stopped_at": name}``: ``kept`` counts the documents that passed every replayed stage; with ``stopped_at`` (a
    keyed global stage the replay cannot run) they only reached that stage."""
    from phi3data.documents import make_batch
    from phi3data.io.inputs import plan_shards
    from phi3data.io.readers import detect_format, read_records
    from phi3data.pipelines.base import GlobalStage, KeyedStage
    from phi3data.pipelines.pipeline import Pipeline, _Decided
    pipeline = Pipeline(recipe_of(manifest))
    wanted = {entry["input"] for entry in manifest.get("shards", [])}
    shards = [s for s in plan_shards(Path(input_path), pipeline.recipe.input.format, pipeline.recipe.input.image_root)
              if s.relpath in wanted]
    shards = sorted(sorted(shards, key=lambda s: id_hash(s.relpath))[:REPLAY_SHARDS], key=lambda s: s.relpath)
    if not shards:
        raise ValueError(f"{input_path} holds none of the input shards this run read "
                         f"({', '.join(sorted(wanted)[:3])} ...): pass the run's --input")
    cfg_in = pipeline.recipe.input
    per_shard = max(1, math.ceil(limit / len(shards)))
    sample = Reservoir(per_shard)
    fmt_of = {}
    for shard in shards:
        fmt = detect_format(Path(shard.path)) if cfg_in.format == "auto" else cfg_in.format
        fmt_of[shard.relpath] = fmt
        records = read_records(Path(shard.path), fmt=fmt, source=cfg_in.source or shard.relpath,
                               id_prefix=f"{cfg_in.source}:{shard.relpath}" if cfg_in.source else None,
                               max_document_bytes=cfg_in.max_document_bytes, text_key=cfg_in.text_key,
                               id_key=cfg_in.id_key, url_key=cfg_in.url_key)
        for number, record in enumerate(records):
            if number >= SCAN_RECORDS:
                break
            if record.get("reject"):
                continue
            sample.offer(shard.relpath, record.get("id"), lambda r=record: r)

    stages, stopped_at = [], None
    decisions = stats.get("decisions", {})
    for seg in pipeline.segments:
        if seg.opening is not None:
            if isinstance(seg.opening, KeyedStage) or seg.opening.name not in decisions:
                stopped_at = seg.opening.name
                break
            stages.append(_Decided(seg.opening, decisions[seg.opening.name]))
        stages.extend(s for s in seg.stages if not isinstance(s, GlobalStage))
    drops, kept, sampled = [], 0, 0
    for relpath, fmt in fmt_of.items():
        for record in sample.get(relpath):
            sampled += 1
            batch = make_batch([record], with_html=fmt == "warc")
            for stage in stages:
                stage.ensure_setup()
                before = batch
                result = stage.process(batch)
                batch = result.batch
                if batch.num_rows == 0:
                    row = before.drop_columns([c for c in ("html",) if c in before.column_names]).to_pylist()[0]
                    reason = next(iter(result.drops), None) or (result.rejects[0].get("reason") if result.rejects
                                                                  else "dropped")
                    text = row.get("text")
                    if not text and "html" in before.column_names:
                        text = "(no text extracted; raw HTML) " + excerpt(before.column("html")[0].as_py(), 300)
                    drops.append({"stage": stage.name, "reason": reason, "id": row.get("id"), "url": row.get("url"),
                                  "source": row.get("source"), "text": excerpt(text),
                                  "language": row.get("language"),
                                  "scores": {k: round(v, 4) for k, v in row.items()
                                             if k.endswith("_score") and isinstance(v, float)}})
                    break
            else:
                kept += 1
    return {"sampled": sampled, "kept": kept, "drops": drops, "stopped_at": stopped_at}
