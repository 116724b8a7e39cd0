"""The image-text side of an ablation ladder: a ladder TOML with a ``[vision]`` table ablates VLM data recipes.

Each recipe's ``sources`` are image-text record parquet (pairs or conversations, :mod:`phi3data.multimodal`).
The ladder then, instead of its text steps:
  1. data: splits every recipe's records into train parquet and one shared validation set, held out from all
     recipes by a hash of the record id (as for text), or the records of ``[eval] sources`` when given (records
     of the recipes with one of their ids are then left out of training);
  2. tokens: tokenizes them with ``[tokenizer] name`` (phi-3's, no BPE is trained) into image token shards,
     the image placeholder token standing for each image, loss on the assistant replies (a pair's caption);
  3. runs: each (seed, size, recipe) trains a VLM with the ladder's ``[vision]`` table (tower, projector, stage
     lrs: the same for every run; the sizes are the language model's), then is scored on the validation set by
     loss per trained token and, with ``[eval] vqa``, VQA accuracy (``phi3data.evaluation.vlm``).
The report, fits and plots are the text ladder's, on the validation loss and the VQA error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from phi3data.io.writers import write_json_atomic
from phi3data.multimodal.readers import read_record_sources
from phi3data.scaling.ladder import LadderConfig, _HeldOut, _is_validation, data_units


def _write_part(tables: list[pa.Table], directory: Path, number: int) -> None:
    from phi3data.multimodal.writers import write_parquet

    write_parquet(pa.concat_tables(tables), directory / f"part-{number:05d}.parquet")


def prepare_image_data(cfg: LadderConfig, out: Path) -> dict[str, Any]:
    """Each recipe's training records as parquet under ``data/<recipe>/`` (one part per source file, streamed)
    and the shared validation records under ``data/validation/`` (at most ``val_max_docs``, the smallest held-out
    ids). Idempotent."""
    marker = out / "data" / "prepared.json"
    if marker.exists():
        return json.loads(marker.read_text())
    held_out = _HeldOut(cfg.eval.val_max_docs)
    explicit: set[str] = set()  # the ids of [eval] sources: validation, so never trained on
    for _, tables in read_record_sources(cfg.eval.sources):
        for table in tables:
            for row in table.to_pylist():
                explicit.add(str(row["id"]))
                held_out.add(str(row["id"]), (table.schema, row))
    counts = {}
    for name, recipe in cfg.recipes.items():
        documents, validation, parts = 0, 0, 0
        for _, tables in read_record_sources(recipe.sources):
            train = []
            for table in tables:
                keep = []
                for i, record_id in enumerate(map(str, table.column("id").to_pylist())):  # only held rows as dicts
                    if cfg.eval.sources:
                        held = record_id in explicit
                    else:
                        held = _is_validation(record_id, cfg.eval.val_fraction)
                        if held:
                            held_out.add(record_id, (table.schema, table.slice(i, 1).to_pylist()[0]))
                    keep.append(not held)
                validation += keep.count(False)
                documents += keep.count(True)
                train.append(table.filter(pa.array(keep, pa.bool_())))
            if sum(t.num_rows for t in train):
                _write_part(train, out / "data" / name, parts)
                parts += 1
        if documents == 0:
            raise ValueError(f"recipe {name}: no training records in {recipe.sources} "
                             f"({validation} held out for validation)")
        counts[name] = {"documents": documents, "characters": 0, "held_out": validation, "rejects": {}}
    by_schema: dict[str, tuple[pa.Schema, list[dict]]] = {}
    for _, (schema, row) in held_out.items():
        by_schema.setdefault(str(schema), (schema, []))[1].append(row)
    if not by_schema:
        raise ValueError("no validation records: raise [eval] val_fraction or give [eval] sources")
    for number, (schema, rows) in enumerate(by_schema.values()):
        _write_part([pa.Table.from_pylist(rows, schema=schema)], out / "data" / "validation", number)
    info = {"recipes": counts, "validation_documents": len(held_out.keys), "validation_characters": 0,
            "validation_source": cfg.eval.sources or "held out by record id"}
    write_json_atomic(marker, info)
    return info


def prepare_image_tokens(cfg: LadderConfig, out: Path, tokenizer: str) -> dict[str, Path]:
    """Image token shards of each recipe's training records and of the validation records."""
    from phi3data.tokenization.images import ImageTokenizeConfig, tokenize_images

    config = ImageTokenizeConfig(tokenizer=tokenizer, mask="assistant")  # a pair's one reply is its caption
    dirs = {}
    for name in [*data_units(cfg), "validation"]:
        tokenize_images([out / "data" / name], out / "tokens" / name, config, source=name, workers=1)
        dirs[name] = out / "tokens" / name
    return dirs


def evaluate_vlm_run(cfg: LadderConfig, checkpoint: Path, tokenizer: str, token_dirs: dict[str, Path],
                     batch_size: int = 32) -> dict[str, Any]:
    """The validation loss per trained token (every validation record that fits ``seq_len``, in order) and, with
    ``[eval] vqa``, each VQA task's accuracy on its options."""
    import torch

    from phi3data.evaluation.run import resolve_device
    from phi3data.evaluation.vlm import evaluate_vlm_checkpoint
    from phi3data.tokenization.dataset import IGNORE_INDEX
    from phi3data.training.vlm import ImageBatches, load_vlm, vlm_forward

    device = resolve_device(cfg.ladder.device)
    vlm = load_vlm(checkpoint, device=device).eval()
    data = ImageBatches(token_dirs["validation"], cfg.ladder.seq_len, vlm)
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = data.collate([int(i) for i in data.items[start:start + batch_size]])
            n = int((batch["targets"] != IGNORE_INDEX).sum())
            loss_sum += float(vlm_forward(vlm, batch, torch.device(device))) * n
            tokens += n
    validation = {"loss": loss_sum / tokens, "tokens": tokens, "documents": len(data),
                  "dropped_documents": data.dropped_documents}
    vqa = {}
    if cfg.eval.vqa:
        scored = evaluate_vlm_checkpoint(checkpoint, tokenizer, cfg.eval.vqa, limit=cfg.eval.limit,
                                         modes=("options",), device=device, vlm=vlm)
        vqa = {task: {"n": t["n"], "acc": t["overall"]["options_accuracy"],
                      "majority_acc": t["overall"].get("majority_accuracy")} for task, t in scored["tasks"].items()}
    return {"validation": validation, "tasks": {}, "vqa": vqa, "eval_device": device}

