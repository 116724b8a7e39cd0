"""Ablation ladders: model sizes x data recipes x seeds, each trained on a token budget and evaluated the same way.

``phi3data ablate model/<ladder>.toml --output DIR`` runs, in order and resumably:
  1. data: every recipe's documents (curated Parquet/JSONL), streamed through ``io.readers`` into train JSONL; a
     shared validation set is held out from all of them by a hash of the document id, so no recipe trains on it;
     unreadable source records are counted by reason (plan.json, report.md);
  2. tokenizer: by default a small byte-level BPE trained on the recipes' training text, the same for every
     recipe (a CPU ladder cannot afford phi-3's 32k output layer; the report says so), or a named tokenizer;
  3. tokens: each recipe tokenized into shards (phi3data's shard format);
  4. runs: for each seed, size and recipe, train on ``tokens_per_param x non-embedding parameters`` tokens with
     the trainer (``[train]`` sets any other TrainConfig field: grad_accum, dtype, distributed, compile ...), then
     evaluate with ``phi3data.evaluation`` on the ladder's device (validation loss / bits per byte, benchmark
     log-likelihoods); a run is done when its result.json exists, and a killed run resumes from its checkpoint;
  5. the report: fits, plot and verdict (``phi3data.scaling.report``).

Sizes are inline tables of Phi3Config fields or model recipes (``phi3data.model.recipes``); either way the
vocabulary is the ladder's tokenizer's and the context its ``seq_len``.

A ladder with a ``[vision]`` table ablates image-text recipes instead: see ``phi3data.scaling.vlm_ladder``.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import xxhash
from pydantic import Field, field_validator, model_validator

from phi3data.config import ConfigError, StrictModel, check_keys, read_toml, validate
from phi3data.io.inputs import list_input_files
from phi3data.io.readers import read_records
from phi3data.io.writers import commit, output_lock, tmp_path_for, write_json_atomic

EOS = "<|endoftext|>"
MAX_DOCUMENT_BYTES = 10_000_000
ARCHITECTURE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size")
# Model fields a ladder decides itself: it trains at its own context with its own tokenizer.
LADDER_MODEL_FIELDS = ("name", "vocab_size", "max_position_embeddings", "original_max_position_embeddings")
# Trainer settings the ladder sets from its own sections; a [train] table may set any other TrainConfig field.
LADDER_TRAIN_FIELDS = {
    "model": "[sizes]", "model_overrides": "[sizes]", "data_path": "[recipes]", "data_dtype": "[recipes]",
    "data_phases": "[recipes] phases",
    "val_path": "the shared validation set", "val_windows": "the shared validation set", "out_dir": "--output",
    "max_steps": "[ladder] tokens_per_param", "seed": "[ladder] seeds", "resume": "the ladder (it always resumes)",
    "device": "[ladder] device", "seq_len": "[ladder] seq_len", "micro_batch_size": "[ladder] micro_batch_size",
    "lr": "[ladder] lr", "min_lr": "[ladder] min_lr_ratio", "warmup_steps": "[ladder] warmup_fraction",
    "weight_decay": "[ladder] weight_decay", "vision": "[vision]",
}


class LadderSection(StrictModel):
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
    """Where every run trains and is evaluated: ``auto`` (cuda when available), ``cpu``, ``cuda``, ``cuda:1``."""


class TokenizerSection(StrictModel):
    train_vocab: int | None = 2048
    """Train a byte-level BPE of this size on the recipes' training text; 0 or None to use ``name``."""
    name: str = "phi3-mini"
    sample_chars: int = 20_000_000


class SizeSection(StrictModel):
    """One model size: its architecture, any other Phi3Config fields (``options``) and the model recipe it was
    resolved from (``recipe``), if any. The vocabulary and context length are the ladder's."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    intermediate_size: int
    recipe: str | None = None
    options: dict[str, Any] = {}


class PhaseSection(StrictModel):
    """One phase of a phased recipe: its documents and its share of every run's tokens."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    sources: list[str] = Field(min_length=1)
    fraction: float = Field(gt=0, le=1)


class RecipeSection(StrictModel):
    sources: list[str] = []
    """Files or directories of documents (curated Parquet from ``phi3data run``, JSONL, ...) ..."""
    phases: list[PhaseSection] = []
    """... or phases trained in order (phi-3's two sequential phases), each a share of the run's tokens."""
    description: str = ""

    @model_validator(mode="after")
    def _sources_or_phases(self) -> RecipeSection:
        if bool(self.sources) == bool(self.phases):
            raise ValueError("a recipe has either sources or phases")
        if self.phases:
            total = sum(p.fraction for p in self.phases)
            if abs(total - 1.0) > 1e-6:
                raise ValueError(f"the phases' fractions add up to {total:g}, not 1")
            names = [p.name for p in self.phases]
            if len(set(names)) != len(names):
                raise ValueError(f"phase names must be unique: {names}")
        return self

    def units(self, name: str) -> dict[str, list[str]]:
        """The recipe's data units (tokenized separately): itself, or ``<recipe>.<phase>`` per phase."""
        if not self.phases:
            return {name: self.sources}
        return {f"{name}.{phase.name}": phase.sources for phase in self.phases}


def _known_tasks(tasks: list[str], known, what: str) -> list[str]:
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: {what} {', '.join(known)}")
    return tasks


class EvalSection(StrictModel):
    tasks: list[str] = ["arc_easy", "arc_challenge", "piqa", "openbookqa", "hellaswag"]
    limit: int = 200
    shots: int = 0
    val_fraction: float = 0.05
    val_max_docs: int = 300
    eval_dir: str | None = None
    """Benchmark files; default ``phi3data.paths.eval_dir()``."""
    sources: list[str] = []
    """A ``[vision]`` ladder: the validation records; recipe records with one of their ids are not trained on."""
    vqa: list[str] = []
    """A ``[vision]`` ladder: VQA tasks scored on their options (``easy-vqa``, ``charts``), ``limit`` items each."""

    @field_validator("vqa")
    @classmethod
    def _vqa_tasks(cls, tasks: list[str]) -> list[str]:
        from phi3data.evaluation.vlm import VQA_TASKS

        return _known_tasks(tasks, VQA_TASKS, "VQA tasks are")

    @field_validator("tasks")
    @classmethod
    def _multiple_choice(cls, tasks: list[str]) -> list[str]:
        from phi3data.evaluation.tasks import MC_TASKS

        return _known_tasks(tasks, MC_TASKS, "a ladder scores multiple-choice tasks:")


class LadderConfig(StrictModel):
    ladder: LadderSection
    tokenizer: TokenizerSection = TokenizerSection()
    sizes: dict[str, SizeSection]
    recipes: dict[str, RecipeSection]
    eval: EvalSection = EvalSection()
    train: dict[str, Any] = {}
    """Trainer settings for every run (TrainConfig fields: grad_accum, dtype, distributed, compile, ...)."""
    vision: dict[str, Any] | None = None
    """The trainer's ``[vision]`` table, the same for every run: the recipes are image-text records and every run
    trains a VLM (``phi3data.scaling.vlm_ladder``)."""


def load_ladder(path: Path, resolve_source: Callable[[str], str] | None = None) -> LadderConfig:
    """Read and validate a ladder TOML; errors are :class:`ConfigError` naming the file and field.

    A size is an inline table of Phi3Config fields, a model recipe reference (``xs = "ladder-cpu:s1"``) or a
    table ``{base = "ladder-cpu:s1", num_hidden_layers = 3}``: the recipe's fields with overrides. Recipe sources
    become absolute paths (relative ones against the working directory, after ``resolve_source`` if given), so the
    same ladder reads the same whichever command runs it."""
    path = Path(path)
    where = str(path)
    raw = read_toml(path, "ladder config")
    def absolute(sources: list) -> list:
        return [str(Path(resolve_source(s) if resolve_source else s).resolve()) for s in sources]

    for recipe in (raw.get("recipes") or {}).values():
        if isinstance(recipe, dict) and isinstance(recipe.get("sources"), list):
            recipe["sources"] = absolute(recipe["sources"])
        for phase in recipe.get("phases", []) if isinstance(recipe, dict) else []:
            if isinstance(phase, dict) and isinstance(phase.get("sources"), list):
                phase["sources"] = absolute(phase["sources"])
    sizes = raw.get("sizes")
    if isinstance(sizes, dict):
        raw["sizes"] = {name: _resolve_size(name, size, path) for name, size in sizes.items()}
    train = raw.get("train")
    if isinstance(train, dict):
        _check_train(train, where)
    if isinstance(raw.get("vision"), dict):
        _check_vision(raw, where)
        if isinstance(raw["eval"], dict) and isinstance(raw["eval"].get("sources"), list):
            raw["eval"]["sources"] = absolute(raw["eval"]["sources"])
        if raw["vision"]["tower"] != "small":  # a tower directory
            raw["vision"]["tower"] = absolute([raw["vision"]["tower"]])[0]
    cfg = validate(LadderConfig, raw, where)
    if cfg.vision is None and (cfg.eval.sources or cfg.eval.vqa):
        raise ConfigError(f"{where}: eval.sources and eval.vqa belong to a ladder with a [vision] table")
    if len(cfg.recipes) < 1 or len(cfg.sizes) < 2:
        raise ConfigError(f"{where}: a ladder needs at least 2 sizes and 1 recipe")
    for name, size in cfg.sizes.items():  # a size that cannot build a model fails here, not after data prep
        _model_dict(size, vocab_size=32064, seq_len=cfg.ladder.seq_len, where=f"{where}: sizes.{name}")
    return cfg


def _resolve_size(name: str, size: Any, path: Path) -> Any:
    """A [sizes] entry as SizeSection fields: a recipe reference or ``base`` resolved through model.recipes."""
    from phi3data.model.model import Phi3Config
    from phi3data.model.recipes import load_model_dict

    where = f"{path}: sizes.{name}"
    if isinstance(size, str):
        size = {"base": size}
    if not isinstance(size, dict):
        return size  # validation names the wrong type
    fields = dict(size)
    base = fields.pop("base", None)
    check_keys(fields, Phi3Config.field_names(), where)
    for key in LADDER_MODEL_FIELDS:
        if key in fields:
            raise ConfigError(f"{where}.{key}: set by the ladder (its tokenizer and seq_len), not per size")
    if base is not None:
        try:
            recipe = load_model_dict(str(base), path.parent)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where}.base: {exc}") from None
        recipe = {k: v for k, v in recipe.items() if k not in LADDER_MODEL_FIELDS}
        # an untold field is the recipe model's default, not the ladder's tied embeddings
        recipe.setdefault("tie_word_embeddings", Phi3Config.tie_word_embeddings)
        fields = recipe | fields
    entry = {k: fields.pop(k) for k in ARCHITECTURE if k in fields}
    if base is not None:
        entry["recipe"] = str(base)
    if fields:
        entry["options"] = fields
    return entry


def _check_train(train: dict[str, Any], where: str) -> None:
    """A [train] table holds TrainConfig fields the ladder does not set itself."""
    from phi3data.training.trainer import validate_train_config

    for key in train:
        if key in LADDER_TRAIN_FIELDS:
            raise ConfigError(f"{where}: train.{key}: set by {LADDER_TRAIN_FIELDS[key]}, not [train]")
    check_keys([f"train.{k}" for k in train], [f"train.{k}" for k in _train_config_fields()], where)
    grad_accum = validate_train_config(train, where, "train").grad_accum
    if not isinstance(grad_accum, int) or grad_accum < 1:  # the token budget counts on it
        raise ConfigError(f"{where}: train.grad_accum: must be a positive integer, got {grad_accum!r}")


def _check_vision(raw: dict[str, Any], where: str) -> None:
    """A [vision] ladder: the trainer's [vision] table with its own tower, phi-3's tokenizer (no BPE is trained:
    the image placeholder is one of its special tokens), VQA tasks instead of text benchmarks, no phases."""
    from phi3data.training.vlm import VisionSettings

    settings = VisionSettings.from_dict(raw["vision"], f"{where}: [vision]")
    if settings.tower is None or settings.projector is None:
        raise ConfigError(f"{where}: [vision] tower and projector: every run builds its VLM, set both")
    tokenizer = raw.setdefault("tokenizer", {})
    evaluation = raw.setdefault("eval", {})
    if not isinstance(tokenizer, dict) or not isinstance(evaluation, dict):
        return  # validation names the wrong type
    if tokenizer.setdefault("train_vocab", 0):
        raise ConfigError(f"{where}: tokenizer.train_vocab: a [vision] ladder uses a named tokenizer (name)")
    if evaluation.setdefault("tasks", []):
        raise ConfigError(f"{where}: eval.tasks: a [vision] ladder scores VQA tasks (eval.vqa)")
    for name, recipe in (raw.get("recipes") or {}).items():
        if isinstance(recipe, dict) and recipe.get("phases"):
            raise ConfigError(f"{where}: recipes.{name}.phases: a [vision] ladder's recipes have sources")


def _train_config_fields() -> list[str]:
    from phi3data.training.trainer import TrainConfig

    if hasattr(TrainConfig, "model_fields"):  # a pydantic model
        return list(TrainConfig.model_fields)
    import dataclasses

    return [f.name for f in dataclasses.fields(TrainConfig)]


# --- data ------------------------------------------------------------------------------------------------------

def _documents(sources: list[str], rejects: Counter) -> Iterator[tuple[str, str]]:
    """(id, text) for every readable document of the sources, streamed; unreadable records are counted in
    ``rejects`` by reason. The id is the document's own (a WARC-Record-ID survives every pipeline), so the same
    page is held out of every recipe that contains it."""
    for source in sources:
        root = Path(source)
        for path in list_input_files(root):
            relpath = path.relative_to(root.parent if root.is_file() else root).as_posix()
            for rec in read_records(path, source=relpath, max_document_bytes=MAX_DOCUMENT_BYTES):
                if rec.get("reject"):
                    rejects[rec["reason"]] += 1
                elif rec.get("text") is None:
                    raise ValueError(f"{path}: a ladder trains on documents with text (curated Parquet or JSONL); "
                                     "this is raw HTML: curate it with `phi3data run` first")
                else:
                    yield str(rec["id"]), rec["text"]


def _is_validation(key: str, fraction: float) -> bool:
    return xxhash.xxh64_intdigest(key) % 10_000 < fraction * 10_000


class _HeldOut:
    """The shared validation set: the ``limit`` smallest held-out ids, each with the first recipe's version of
    the page (the baseline's). Holds at most ``limit`` documents: an id pushed out is larger than every id kept,
    and the largest kept id only decreases, so it is never taken back."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.keys: list[str] = []
        self.texts: dict[str, str] = {}

    def add(self, key: str, text: str) -> None:
        if key in self.texts or self.limit <= 0 or (len(self.keys) >= self.limit and key > self.keys[-1]):
            return
        bisect.insort(self.keys, key)
        self.texts[key] = text
        if len(self.keys) > self.limit:
            del self.texts[self.keys.pop()]

    def items(self) -> Iterator[tuple[str, str]]:
        return ((key, self.texts[key]) for key in self.keys)


def prepare_data(cfg: LadderConfig, out: Path) -> dict[str, Any]:
    """Split every recipe into train text and one shared validation set, written as JSONL while the sources are
    read (no recipe is held in memory). Unreadable source records are counted by reason per recipe. Idempotent."""
    marker = out / "data" / "prepared.json"
    if marker.exists():
        return json.loads(marker.read_text())
    (out / "data").mkdir(parents=True, exist_ok=True)
    held_out = _HeldOut(cfg.eval.val_max_docs)
    counts = {}
    units = {unit: sources for name, recipe in cfg.recipes.items() for unit, sources in recipe.units(name).items()}
    for name, sources in units.items():
        path = out / "data" / name / "train.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        rejects: Counter = Counter()
        documents = characters = validation = 0
        tmp = tmp_path_for(path)
        with open(tmp, "w", encoding="utf-8") as handle:
            for key, text in _documents(sources, rejects):
                if _is_validation(key, cfg.eval.val_fraction):
                    validation += 1
                    held_out.add(key, text)
                else:
                    handle.write(_jsonl_line(key, text))
                    documents += 1
                    characters += len(text)
        if documents + validation == 0:
            tmp.unlink()
            raise ValueError(f"recipe {name}: no documents in {sources} "
                             f"(unreadable records: {dict(rejects) or 'none'})")
        commit(tmp, path)
        counts[name] = {"documents": documents, "characters": characters, "held_out": validation,
                        "rejects": dict(sorted(rejects.items()))}
    val_path = out / "data" / "validation.jsonl"
    tmp = tmp_path_for(val_path)
    val_documents = val_characters = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for key, text in held_out.items():
            handle.write(_jsonl_line(key, text))
            val_documents += 1
            val_characters += len(text)
    commit(tmp, val_path)
    info = {"recipes": counts, "validation_documents": val_documents, "validation_characters": val_characters}
    write_json_atomic(marker, info)
    return info


def data_units(cfg: LadderConfig) -> list[str]:
    """Every tokenized data unit: each plain recipe, and each phase of a phased one (``<recipe>.<phase>``)."""
    return [unit for name, recipe in cfg.recipes.items() for unit in recipe.units(name)]


def _jsonl_line(key: str, text: str) -> str:
    return json.dumps({"id": key, "text": text}, ensure_ascii=False) + "\n"


def _read_texts(path: Path) -> Iterator[str]:
    """The texts of a JSONL file the ladder wrote, streamed through io.readers."""
    from phi3data.evaluation.run import read_texts

    return read_texts(path)


def prepare_tokenizer(cfg: LadderConfig, out: Path) -> str:
    """The tokenizer spec every run uses: a BPE trained here on all recipes' training text, or a named one."""
    if not cfg.tokenizer.train_vocab:
        return cfg.tokenizer.name
    path = out / "tokenizer" / "tokenizer.json"
    if path.exists():
        return str(path)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    units = data_units(cfg)

    def sample():
        budget = cfg.tokenizer.sample_chars // max(len(units), 1)
        for name in units:
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
    for name in [*data_units(cfg), "validation"]:
        source = out / "data" / ("validation.jsonl" if name == "validation" else f"{name}/train.jsonl")
        target = out / "tokens" / name
        tokenize([source], target, config, source=name, engine="local", workers=1)
        dirs[name] = target
    return dirs


# --- runs ------------------------------------------------------------------------------------------------------

def _model_dict(size: SizeSection, vocab_size: int, seq_len: int, where: str = "ladder size") -> dict[str, Any]:
    """The Phi3Config fields of one size at the ladder's vocabulary and context; checked by building the config.
    Inline sizes tie input and output embeddings unless they say otherwise."""
    from phi3data.model.model import Phi3Config

    context = max(seq_len, 128)
    model = {"tie_word_embeddings": True, **size.options,
             **size.model_dump(include=set(ARCHITECTURE)),
             "num_key_value_heads": size.num_key_value_heads or size.num_attention_heads,
             "vocab_size": vocab_size, "max_position_embeddings": context,
             "original_max_position_embeddings": context}
    Phi3Config.from_dict(model, where)
    return model


def tokens_per_step(cfg: LadderConfig) -> int:
    """Tokens one optimizer step trains on (micro-batch x accumulation x sequence length, one process)."""
    return cfg.ladder.micro_batch_size * int(cfg.train.get("grad_accum", 1)) * cfg.ladder.seq_len


def run_plan(cfg: LadderConfig, vocab_size: int) -> list[dict[str, Any]]:
    """Every (seed, size, recipe) run with its parameter count, token budget and steps."""
    from phi3data.model.model import Phi3Config, num_parameters

    plan = []
    step_tokens = tokens_per_step(cfg)
    for seed in cfg.ladder.seeds:
        for size_name, size in cfg.sizes.items():
            model = _model_dict(size, vocab_size, cfg.ladder.seq_len)
            params = num_parameters(Phi3Config(**model))
            budget = max(int(cfg.ladder.tokens_per_param * params["non_embedding"]), cfg.ladder.min_tokens)
            steps = max(10, math.ceil(budget / step_tokens))
            for recipe in cfg.recipes:
                plan.append({"run": f"{recipe}/{size_name}/seed{seed}", "recipe": recipe, "size": size_name,
                             "seed": seed, "model": model, "params": params["non_embedding"],
                             "params_total": params["total"], "steps": steps, "tokens": steps * step_tokens})
    return plan


def train_config(cfg: LadderConfig, out: Path, run: dict[str, Any], token_dirs: dict[str, Path]):
    """The TrainConfig of one run: the ladder's settings, its [train] table over the defaults below."""
    from phi3data.training.trainer import validate_train_config

    steps = run["steps"]
    lad = cfg.ladder
    defaults = {"eval_every": steps, "eval_batches": 4, "ckpt_every": max(10, steps // 4),
                "log_every": max(1, steps // 4)}
    recipe = cfg.recipes[run["recipe"]]
    data: dict[str, Any] = {"data_path": str(token_dirs[run["recipe"]])} if not recipe.phases else \
        {"data_phases": phase_budgets(recipe, run, token_dirs, tokens_per_step(cfg))}
    ladder = {"model": run["model"], **data,
              "val_path": str(token_dirs["validation"]), "out_dir": str(out / "runs" / run["run"]),
              "seq_len": lad.seq_len, "micro_batch_size": lad.micro_batch_size, "max_steps": steps, "lr": lad.lr,
              "min_lr": lad.lr * lad.min_lr_ratio, "warmup_steps": max(1, int(lad.warmup_fraction * steps)),
              "weight_decay": lad.weight_decay, "seed": 1000 + run["seed"], "device": lad.device}
    if cfg.vision is not None:
        ladder["vision"] = cfg.vision
    return validate_train_config(defaults | cfg.train | ladder, f"ladder run {run['run']}")


def phase_budgets(recipe: RecipeSection, run: dict[str, Any], token_dirs: dict[str, Path],
                  step_tokens: int) -> list[dict[str, Any]]:
    """A phased recipe's phases for one run: each phase's share of the run's steps (the last takes the rest, so
    the phases add up to the run exactly), as token budgets; a phase smaller than its budget repeats its data, as
    a plain recipe does."""
    steps = run["steps"]
    shares = [round(phase.fraction * steps) for phase in recipe.phases[:-1]]
    shares.append(steps - sum(shares))
    return [{"name": phase.name, "path": str(token_dirs[f"{run['recipe']}.{phase.name}"]),
             "tokens": share * step_tokens, "allow_repeat": True}
            for phase, share in zip(recipe.phases, shares)]


def train_run(cfg: LadderConfig, out: Path, run: dict[str, Any], token_dirs: dict[str, Path]) -> Path:
    """Train one run (resuming from its last checkpoint if it was interrupted); returns its checkpoint dir."""
    from phi3data.training.checkpoint import latest_checkpoint
    from phi3data.training.trainer import train

    run_dir = out / "runs" / run["run"]
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None or json.loads((ckpt / "state.json").read_text())["step"] < run["steps"]:
        train(train_config(cfg, out, run, token_dirs))
        ckpt = latest_checkpoint(run_dir / "checkpoints")
    return ckpt


def evaluate_run(cfg: LadderConfig, out: Path, checkpoint: Path, tokenizer: str) -> dict[str, Any]:
    """Validation loss / bits per byte and benchmark log-likelihoods for one trained checkpoint, scored by the
    evaluation plane on the ladder's device."""
    from phi3data.evaluation.run import evaluate_checkpoint

    scored = evaluate_checkpoint(checkpoint, tokenizer, cfg.eval.tasks, limit=cfg.eval.limit, shots=cfg.eval.shots,
                                 val_text=out / "data" / "validation.jsonl",
                                 eval_dir=Path(cfg.eval.eval_dir) if cfg.eval.eval_dir else None,
                                 device=cfg.ladder.device, batch_size=32)
    tasks = {name: {"n": t["n"], "acc": t["acc"], "acc_norm": t["acc_norm"], "prob_correct": t["prob_correct"],
                    "p_gold": [round(it["p_gold"], 6) for it in t["items"]], "chance": t["chance"]}
             for name, t in scored["tasks"].items()}
    return {"validation": scored["validation"], "tasks": tasks, "eval_device": scored["device"]}


def run_ladder(cfg: LadderConfig, out: Path, *, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) the whole ladder; returns every run's result. The ladder directory is locked meanwhile."""
    with output_lock(out):
        return _run_ladder_locked(cfg, out, progress=progress)


def _run_ladder_locked(cfg: LadderConfig, out: Path, *, progress: bool) -> list[dict[str, Any]]:
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
    from phi3data.scaling import vlm_ladder

    vision = cfg.vision is not None
    info = vlm_ladder.prepare_image_data(cfg, out) if vision else prepare_data(cfg, out)
    for name, counts in info["recipes"].items():
        if counts["rejects"] and progress:
            console.print(f"[yellow]recipe {name}: skipped unreadable source records: {counts['rejects']}[/yellow]")
    tokenizer = cfg.tokenizer.name if vision else prepare_tokenizer(cfg, out)
    token_dirs = (vlm_ladder.prepare_image_tokens if vision else prepare_tokens)(cfg, out, tokenizer)
    from phi3data.tokenization.tokenizers import get_tokenizer

    vocab_size = get_tokenizer(tokenizer).vocab_size
    plan = run_plan(cfg, vocab_size)
    manifests = {unit: json.loads((path / "manifest.json").read_text()) for unit, path in token_dirs.items()}
    recipe_tokens = {name: sum(manifests[unit]["tokens"] for unit in recipe.units(name))
                     for name, recipe in cfg.recipes.items()}
    for run in plan:
        if vision:  # a VLM batch is micro_batch_size padded records, not packed windows
            seen = run["steps"] * cfg.ladder.micro_batch_size * int(cfg.train.get("grad_accum", 1))
            run["epochs"] = round(seen / max(manifests[run["recipe"]]["documents"], 1), 2)
        else:
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
        evaluation = vlm_ladder.evaluate_vlm_run(cfg, checkpoint, tokenizer, token_dirs) if vision else \
            evaluate_run(cfg, out, checkpoint, tokenizer)
        result = {**{k: v for k, v in run.items() if k != "model"}, "checkpoint": str(checkpoint),
                  "train_seconds": round(train_seconds, 1), **evaluation}
        write_json_atomic(result_path, result)
        results.append(result)
    return results
