"""Ablation ladders: model sizes x data recipes x seeds, each trained on a token budget and evaluated the same way.

``phi3data ablate model/<ladder>.toml --output DIR`` runs, in order and resumably:
  1. data: every recipe's documents (curated Parquet/JSONL); a shared validation set is held out from all of them
     by a hash of the document id, so no recipe trains on it;
  2. tokenizer: by default a small byte-level BPE trained on the recipes' training text, the same for every
     recipe (a CPU ladder cannot afford phi-3's 32k output layer; the report says so), or a named tokenizer;
  3. tokens: each recipe tokenized into shards (phi3data's shard format);
  4. runs: for each seed, size and recipe, train on ``tokens_per_param x non-embedding parameters`` tokens, then
     evaluate (validation loss / bits per byte, benchmark log-likelihoods); a run is done when its result.json
     exists, and a killed run resumes from its last checkpoint;
  5. the report: fits, plot and verdict (``phi3data.scaling.report``).
"""

from __future__ import annotations

import functools
import json
import math
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash
from pydantic import BaseModel, ConfigDict, Field

from phi3data.io.inputs import list_input_files
from phi3data.io.readers import read_records
from phi3data.io.writers import commit, tmp_path_for, write_json_atomic

EOS = "<|endoftext|>"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LadderSection(_Strict):
    name: str
    seeds: list[int] = [0]
    tokens_per_param: float = Field(20.0, gt=0)
    """Training tokens per non-embedding parameter (Chinchilla's ~20 by default)."""
    min_tokens: int = 0
    seq_len: int = 128
    micro_batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    device: str = "auto"


class TokenizerSection(_Strict):
    train_vocab: int | None = 2048
    """Train a byte-level BPE of this size on the recipes' training text; 0 or None to use ``name``."""
    name: str = "phi3-mini"
    sample_chars: int = 20_000_000


class SizeSection(_Strict):
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    intermediate_size: int


class RecipeSection(_Strict):
    sources: list[str]
    """Files or directories of documents (curated Parquet from ``phi3data run``, JSONL, ...)."""
    description: str = ""


class EvalSection(_Strict):
    tasks: list[str] = ["arc_easy", "arc_challenge", "piqa", "openbookqa", "hellaswag"]
    limit: int = 200
    shots: int = 0
    val_fraction: float = 0.05
    val_max_docs: int = 300
    eval_dir: str | None = None


class LadderConfig(_Strict):
    ladder: LadderSection
    tokenizer: TokenizerSection = TokenizerSection()
    sizes: dict[str, SizeSection]
    recipes: dict[str, RecipeSection]
    eval: EvalSection = EvalSection()


def load_ladder(path: Path, resolve_source: Callable[[str], str] | None = None) -> LadderConfig:
    """Read and validate a ladder TOML; errors name the bad field. Recipe sources become absolute paths
    (relative ones against the working directory, after ``resolve_source`` if given), so the same ladder reads
    the same whichever command runs it."""
    if not path.exists():
        raise FileNotFoundError(f"ladder config not found: {path}")
    raw = tomllib.loads(path.read_text())
    for recipe in (raw.get("recipes") or {}).values():
        if isinstance(recipe, dict) and isinstance(recipe.get("sources"), list):
            recipe["sources"] = [str(Path(resolve_source(s) if resolve_source else s).resolve())
                                 for s in recipe["sources"]]
    cfg = LadderConfig(**raw)
    if len(cfg.recipes) < 1 or len(cfg.sizes) < 2:
        raise ValueError(f"{path}: a ladder needs at least 2 sizes and 1 recipe")
    return cfg


# --- data ------------------------------------------------------------------------------------------------------

def _documents(sources: list[str]) -> list[tuple[str, str]]:
    """(id, text) for every readable document of the sources. The id is the document's own (a WARC-Record-ID
    survives every pipeline), so the same page is held out of every recipe that contains it."""
    docs = []
    for source in sources:
        root = Path(source)
        for path in list_input_files(root):
            relpath = path.relative_to(root.parent if root.is_file() else root).as_posix()
            for rec in read_records(path, source=relpath, max_document_bytes=10_000_000):
                if not rec.get("reject"):
                    docs.append((str(rec["id"]), rec["text"]))
    if not docs:
        raise ValueError(f"no documents in {sources}")
    return docs


def _is_validation(key: str, fraction: float) -> bool:
    return xxhash.xxh64_intdigest(key) % 10_000 < fraction * 10_000


def prepare_data(cfg: LadderConfig, out: Path) -> dict[str, Any]:
    """Split every recipe into train text and one shared validation set; write them as JSONL. Idempotent."""
    marker = out / "data" / "prepared.json"
    if marker.exists():
        return json.loads(marker.read_text())
    (out / "data").mkdir(parents=True, exist_ok=True)
    validation: dict[str, str] = {}
    counts = {}
    for name, recipe in cfg.recipes.items():
        docs = _documents(recipe.sources)
        train = [(k, t) for k, t in docs if not _is_validation(k, cfg.eval.val_fraction)]
        for key, text in docs:  # the first recipe's version of a held-out page (the baseline's) is the one kept
            if _is_validation(key, cfg.eval.val_fraction):
                validation.setdefault(key, text)
        path = out / "data" / name / "train.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(path, train)
        counts[name] = {"documents": len(train), "characters": sum(len(t) for _, t in train)}
    val = sorted(validation.items())[: cfg.eval.val_max_docs]
    _write_jsonl(out / "data" / "validation.jsonl", val)
    info = {"recipes": counts, "validation_documents": len(val),
            "validation_characters": sum(len(t) for _, t in val)}
    write_json_atomic(marker, info)
    return info


def _write_jsonl(path: Path, docs: list[tuple[str, str]]) -> None:
    tmp = tmp_path_for(path)
    with open(tmp, "w", encoding="utf-8") as handle:
        for key, text in docs:
            handle.write(json.dumps({"id": key, "text": text}, ensure_ascii=False) + "\n")
    commit(tmp, path)


def _read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def prepare_tokenizer(cfg: LadderConfig, out: Path) -> str:
    """The tokenizer spec every run uses: a BPE trained here on all recipes' training text, or a named one."""
    if not cfg.tokenizer.train_vocab:
        return cfg.tokenizer.name
    path = out / "tokenizer" / "tokenizer.json"
    if path.exists():
        return str(path)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def sample():
        budget = cfg.tokenizer.sample_chars // max(len(cfg.recipes), 1)
        for name in cfg.recipes:
            used = 0
            for text in _read_texts(out / "data" / name / "train.jsonl"):
                if used >= budget:
                    break
                used += len(text)
                yield text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.tokenizer.train_vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample(), trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    tok.save(str(tmp))
    commit(tmp, path)
    return str(path)


def prepare_tokens(cfg: LadderConfig, out: Path, tokenizer: str) -> dict[str, Path]:
    """Tokenize each recipe's training text and the validation set into shard directories."""
    from phi3data.tokenization.runner import TokenizeConfig, tokenize

    config = TokenizeConfig(tokenizer=tokenizer)
    dirs = {}
    for name in [*cfg.recipes, "validation"]:
        source = out / "data" / ("validation.jsonl" if name == "validation" else f"{name}/train.jsonl")
        target = out / "tokens" / name
        tokenize([source], target, config, source=name, engine="local", workers=1)
        dirs[name] = target
    return dirs


# --- runs ------------------------------------------------------------------------------------------------------

def _model_dict(size: SizeSection, vocab_size: int, seq_len: int) -> dict[str, Any]:
    return {"vocab_size": vocab_size, "hidden_size": size.hidden_size, "num_hidden_layers": size.num_hidden_layers,
            "num_attention_heads": size.num_attention_heads,
            "num_key_value_heads": size.num_key_value_heads or size.num_attention_heads,
            "intermediate_size": size.intermediate_size, "max_position_embeddings": max(seq_len, 128),
            "tie_word_embeddings": True}


def run_plan(cfg: LadderConfig, vocab_size: int) -> list[dict[str, Any]]:
    """Every (seed, size, recipe) run with its parameter count, token budget and steps."""
    from phi3data.model.model import Phi3Config, num_parameters

    plan = []
    tokens_per_step = cfg.ladder.micro_batch_size * cfg.ladder.seq_len
    for seed in cfg.ladder.seeds:
        for size_name, size in cfg.sizes.items():
            model = _model_dict(size, vocab_size, cfg.ladder.seq_len)
            params = num_parameters(Phi3Config(**model))
            budget = max(int(cfg.ladder.tokens_per_param * params["non_embedding"]), cfg.ladder.min_tokens)
            steps = max(10, math.ceil(budget / tokens_per_step))
            for recipe in cfg.recipes:
                plan.append({"run": f"{recipe}/{size_name}/seed{seed}", "recipe": recipe, "size": size_name,
                             "seed": seed, "model": model, "params": params["non_embedding"],
                             "params_total": params["total"], "steps": steps, "tokens": steps * tokens_per_step})
    return plan


def train_run(cfg: LadderConfig, out: Path, run: dict[str, Any], token_dirs: dict[str, Path]) -> Path:
    """Train one run (resuming from its last checkpoint if it was interrupted); returns its checkpoint dir."""
    from phi3data.training.checkpoint import latest_checkpoint
    from phi3data.training.trainer import TrainConfig, train

    run_dir = out / "runs" / run["run"]
    steps = run["steps"]
    lad = cfg.ladder
    tc = TrainConfig(model=run["model"], data_path=str(token_dirs[run["recipe"]]),
                     val_path=str(token_dirs["validation"]), out_dir=str(run_dir), seq_len=lad.seq_len,
                     micro_batch_size=lad.micro_batch_size, max_steps=steps, lr=lad.lr,
                     min_lr=lad.lr * lad.min_lr_ratio,
                     warmup_steps=max(1, int(lad.warmup_fraction * steps)), weight_decay=lad.weight_decay,
                     eval_every=steps, eval_batches=4, ckpt_every=max(10, steps // 4), log_every=max(1, steps // 4),
                     seed=1000 + run["seed"], device=lad.device)
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None or json.loads((ckpt / "state.json").read_text())["step"] < steps:
        train(tc)
        ckpt = latest_checkpoint(run_dir / "checkpoints")
    return ckpt


@functools.cache
def _eval_items(task: str, eval_dir: Path, shots: int, limit: int) -> tuple:
    """A task's prompted, subsampled items; the same for every run of a ladder, so built once per process."""
    from phi3data.evaluation.tasks import load_mc_task, subsample, with_shots

    return tuple(subsample(with_shots(load_mc_task(task, eval_dir), shots), limit, seed=0))


@functools.cache
def _validation_texts(path: Path) -> tuple[str, ...]:
    return tuple(_read_texts(path))


def evaluate_run(cfg: LadderConfig, out: Path, checkpoint: Path, tokenizer: str) -> dict[str, Any]:
    """Validation loss / bits per byte and benchmark log-likelihoods for one trained checkpoint."""
    from phi3data.evaluation.harness import logits_fn_for, score_multiple_choice, validation_loss
    from phi3data.evaluation.tasks import DEFAULT_EVAL_DIR
    from phi3data.model.hf import load_hf
    from phi3data.tokenization.tokenizers import get_tokenizer

    model = load_hf(checkpoint).eval()
    tok = get_tokenizer(tokenizer)
    encode = tok.encode_text
    max_length = model.cfg.max_position_embeddings
    logits = logits_fn_for(model)
    val_texts = _validation_texts(out / "data" / "validation.jsonl")
    result: dict[str, Any] = {"validation": validation_loss(logits, encode, val_texts, max_length=max_length)}
    eval_dir = Path(cfg.eval.eval_dir) if cfg.eval.eval_dir else DEFAULT_EVAL_DIR
    tasks = {}
    for task in cfg.eval.tasks:
        items = _eval_items(task, eval_dir, cfg.eval.shots, cfg.eval.limit)
        scored = score_multiple_choice(logits, encode, items, max_length=max_length, batch_size=32)
        tasks[task] = {"n": scored["n"], "acc": scored["acc"], "acc_norm": scored["acc_norm"],
                       "prob_correct": scored["prob_correct"],
                       "p_gold": [round(it["p_gold"], 6) for it in scored["items"]],
                       "chance": sum(1 / len(it.choices) for it in items) / len(items)}
    result["tasks"] = tasks
    return result


def run_ladder(cfg: LadderConfig, out: Path, *, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) the whole ladder; returns every run's result."""
    from rich.console import Console

    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    if plan_path.exists():
        previous = json.loads(plan_path.read_text())["config"]
        if previous != json.loads(json.dumps(cfg.model_dump(mode="json"))):
            raise ValueError(f"{out} holds a ladder with another configuration; use a new --output directory "
                             "(or the old configuration to resume it)")
    started = time.perf_counter()
    info = prepare_data(cfg, out)
    tokenizer = prepare_tokenizer(cfg, out)
    token_dirs = prepare_tokens(cfg, out, tokenizer)
    from phi3data.tokenization.tokenizers import get_tokenizer

    vocab_size = get_tokenizer(tokenizer).vocab_size
    plan = run_plan(cfg, vocab_size)
    recipe_tokens = {name: json.loads((token_dirs[name] / "manifest.json").read_text())["tokens"]
                     for name in cfg.recipes}
    for run in plan:
        run["epochs"] = round(run["tokens"] / max(recipe_tokens[run["recipe"]], 1), 2)
    write_json_atomic(out / "plan.json", {"tokenizer": tokenizer, "vocab_size": vocab_size, "data": info,
                                          "recipe_order": list(cfg.recipes), "recipe_tokens": recipe_tokens,
                                          "config": cfg.model_dump(mode="json"), "runs": plan})
    results = []
    for index, run in enumerate(plan, start=1):
        result_path = out / "runs" / run["run"] / "result.json"
        if result_path.exists():
            results.append(json.loads(result_path.read_text()))
            continue
        if progress:
            elapsed = time.perf_counter() - started
            console.print(f"[bold]run {index}/{len(plan)}[/bold] {run['run']}: {run['params']:,} non-embedding "
                          f"params, {run['tokens']:,} tokens ({run['steps']} steps) [{elapsed:.0f}s elapsed]")
        t0 = time.perf_counter()
        checkpoint = train_run(cfg, out, run, token_dirs)
        train_seconds = time.perf_counter() - t0
        evaluation = evaluate_run(cfg, out, checkpoint, tokenizer)
        result = {**{k: v for k, v in run.items() if k != "model"}, "checkpoint": str(checkpoint),
                  "train_seconds": round(train_seconds, 1), **evaluation}
        write_json_atomic(result_path, result)
        results.append(result)
    return results
