"""The phi-3 trainer: ``phi3data train model/<config>.toml``.

One process or many under ``torchrun`` (DDP, or FSDP2 for the larger configs: the model is built on the meta
device and each rank initialises only its shards; checkpoints hold the gathered weights, loadable by transformers,
and the sharded AdamW state through torch.distributed.checkpoint, so a resumed run continues exactly).

Each optimizer step consumes a global batch of ``micro_batch_size * grad_accum * world_size`` windows from the
memory-mapped token stream; rank ``r``'s micro-batch ``m`` takes samples
``pos + (r * grad_accum + m) * micro_batch_size ...``, so the same global batch gives the same samples whatever the
split between processes and accumulation. Data comes from
:class:`phi3data.tokenization.dataset.PackedDataset`; where the shards carry a loss mask, masked targets are -100
and the loss skips them, while ``tokens`` (and tokens/s, MFU) still count every position processed.

Training config TOML::

    model = "ladder-cpu:s1"        # a recipe reference, or a [model] table of Phi3Config fields
    [data]
    path = "runs/tokens"           # a token shard dir (loss masks honoured), a dir of *.bin + manifest.json,
    dtype = "uint16"               # or a .bin file (then give dtype): see phi3data.tokenization.dataset
    val_windows = 16               # held out from the end when no val_path is given
    [train]
    seq_len = 256
    micro_batch_size = 8
    ...                            # see TrainConfig

Phased training (phi-3's two sequential phases): instead of ``path``, an ordered list of phases with token
budgets; they are read in order and never shuffled together, ``max_steps`` follows from the budgets, and a WSD
decay can sit in a phase::

    [[data.phases]]
    name = "web"
    path = "out/mix/phase1"        # a token dir, or a phase folder of a `phi3data mix` output
    tokens = 2_000_000
    [[data.phases]]
    name = "reasoning"
    path = "out/mix/phase2"
    tokens = 500_000
    allow_repeat = false           # a budget above the phase's data is refused unless this is true
    [train]
    schedule = "wsd"
    decay_phase = "reasoning"

Vision-language models (LLaVA's two stages): a ``[vision]`` table (tower, projector, stage, feature cache, blind)
makes the run train a VLM on image token shards (``phi3data tokenize --images``) in ``data.path``; see
:mod:`phi3data.training.vlm`. Every parameter group trains at its own ``base_lr`` scaled by the schedule.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import xxhash
from pydantic import TypeAdapter, ValidationError

from phi3data.config import ConfigError, check_keys, format_validation_error, read_toml
from phi3data.io.writers import output_lock
from phi3data.model.hf import load_config, load_hf, read_weights, resolve_weights
from phi3data.model.model import Phi3, Phi3Config
from phi3data.model.recipes import load_model_dict
from phi3data.tokenization.dataset import IGNORE_INDEX, PackedDataset, Phase, PhasedDataset, PreferencePairs
from phi3data.tokenization.shards import open_shards
from phi3data.training import dpo
from phi3data.training.checkpoint import (
    OPTIMIZER_DIR,
    finish_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    start_checkpoint,
    temp_dir,
)
from phi3data.training.vlm import vlm_forward

# dense bf16 peak FLOP/s per device, for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


class TrainingDiverged(RuntimeError):
    """Raised when the loss or gradient norm stops being finite."""


@dataclass
class TrainConfig:
    """Everything a run needs. TOML sections [data] and [train] map onto these fields."""

    model: str | dict[str, Any] = "ladder-cpu:s1"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data_path: str = ""
    data_dtype: str | None = None
    data_pack: Literal["stream", "documents"] = "stream"
    """``documents``: whole documents (conversations) fill each window, attention stays inside each and no target
    crosses a boundary; longer documents are left out and counted (SFT on chat shards)."""
    data_phases: list[dict[str, Any]] | None = None
    """Phased training: ``[[data.phases]]`` tables (``name``, ``path``, ``tokens``, optional ``allow_repeat``),
    consumed in order and never mixed; then ``max_steps`` comes from their token budgets unless given."""
    val_path: str | None = None
    val_windows: int = 16
    out_dir: str = "runs/train"
    seq_len: int = 256
    micro_batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    schedule: Literal["cosine", "wsd"] = "cosine"  # wsd: warmup-stable-decay
    wsd_decay_fraction: float = 0.2
    decay_phase: str | None = None
    """wsd with phases: decay over this phase's steps (e.g. the last one) instead of ``wsd_decay_fraction``."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    ckpt_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 1337
    compile: bool = False
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    device: str = "auto"
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun
    peak_tflops: float | None = None  # for MFU; guessed from the GPU name when unset
    resume: bool = True
    tensorboard: bool = False
    init_from: str | None = None
    """Start from these weights (SFT, DPO, long-context stages): a checkpoint directory (the trainer's or
    ``save_hf``'s), a Hugging Face phi3 directory, or a run's ``out_dir`` (its latest checkpoint). The model's
    config then comes from there (do not also give ``model``); a resumed run continues from its own checkpoints."""
    objective: Literal["lm", "dpo"] = "lm"
    """``lm``: next-token loss (on the loss-masked tokens when the shards carry a mask: SFT). ``dpo``: preference
    pairs from ``phi3data tokenize --preferences`` with the ``[dpo]`` settings."""
    dpo_beta: float = 0.1
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"
    dpo_label_smoothing: float = 0.0
    dpo_nll_weight: float = 0.0
    """> 0: add this times the chosen replies' mean negative log-likelihood per token (DPO + NLL, as in iterative
    reasoning preference optimisation), which keeps DPO from lowering the likelihood of what it prefers."""
    dpo_reference: Literal["precomputed", "on_the_fly"] = "precomputed"
    """``precomputed``: the reference log-probabilities are computed once and stored beside the pairs;
    ``on_the_fly``: a frozen copy of the reference model scores each batch."""
    dpo_reference_from: str | None = None
    """The reference model's weights (default: ``init_from``)."""
    vision: dict[str, Any] | None = None
    """The ``[vision]`` table: train a vision-language model (:class:`phi3data.training.vlm.VisionSettings`)."""

    @classmethod
    def from_toml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Read a training config; ``overrides`` are ``key=value`` fields, ``model.<field>`` for the model.

        An unknown or misspelt key (in the file or the overrides) or a value of the wrong type is a
        :class:`ConfigError` naming the file and the field, as for every other recipe.
        """
        path = Path(path)
        where = str(path)
        raw = read_toml(path, "training config")
        check_keys(raw, ("model", "data", "train", "dpo", "vision"), where)
        names = [f.name for f in fields(cls)]
        kw: dict[str, Any] = {}
        origin: dict[str, str] = {}  # field -> where it was set, for error messages
        model = raw.get("model")
        if isinstance(model, dict):
            model = dict(model)
            base = model.pop("base", None)
            Phi3Config.check_names(model, where, "model.")
            kw["model"] = load_model_dict(base, path.parent) | model if base else model
        elif model is not None:
            kw["model"] = load_model_dict(str(model), path.parent)
        if "vision" in raw:
            kw["vision"], origin["vision"] = raw["vision"], "vision"
        for section in ("data", "train", "dpo"):
            table = raw.get(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{where}: [{section}] must be a table")
            for k, v in table.items():
                plain_key = section == "train" or (section == "data" and k.startswith("val_"))
                name = k if plain_key else f"{section}_{k}"
                kw[name], origin[name] = v, f"{section}.{k}"
        data_keys = [f"data.{n.removeprefix('data_')}" for n in names if n.startswith(("data_", "val_"))]
        check_keys([origin[n] for n in origin if origin[n].startswith("data.")], data_keys, where)
        dpo_keys = [f"dpo.{n.removeprefix('dpo_')}" for n in names if n.startswith("dpo_")]
        check_keys([origin[n] for n in origin if origin[n].startswith("dpo.")], dpo_keys, where)
        if "model" in raw and (kw.get("init_from") or (overrides or {}).get("init_from")):
            # the checkpoint's config is the model's; a [model] table changes fields of it (e.g. LongRoPE for a
            # long-context stage), a recipe reference would contradict it
            if not isinstance(raw["model"], dict) or "base" in raw["model"]:
                raise ConfigError(f"{where}: with train.init_from the model's config comes from the checkpoint; "
                                  "a [model] table may only change fields of it (no recipe reference or base)")
            kw["model_overrides"] = kw.pop("model")
        check_keys([origin[n] for n in origin if origin[n].startswith("train.")], [f"train.{n}" for n in names], where)
        if "data_phases" in kw and "max_steps" not in kw and "max_steps" not in (overrides or {}):
            kw["max_steps"] = 0  # the phases' token budgets decide the run's length
        model_overrides = {k.removeprefix("model."): v for k, v in (overrides or {}).items() if k.startswith("model.")}
        vision_overrides = {k.removeprefix("vision."): v for k, v in (overrides or {}).items()
                            if k.startswith("vision.")}
        if vision_overrides:  # vision.blind=true
            kw["vision"] = {**kw.get("vision", {}), **vision_overrides}
        plain = {k: v for k, v in (overrides or {}).items() if not k.startswith(("model.", "vision."))}
        Phi3Config.check_names(model_overrides, f"{where}: overrides", "model.")
        check_keys(plain, names, f"{where}: overrides")
        for k, v in plain.items():
            kw[k], origin[k] = v, f"override {k}"
        if model_overrides:
            kw["model_overrides"] = {**kw.get("model_overrides", {}), **model_overrides}
        try:
            cfg = _ADAPTER.validate_python(kw)
        except ValidationError as exc:
            problems = [f"{origin.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in exc.errors()]
            raise ConfigError(f"{where}: " + "; ".join(problems)) from None
        cfg.model_config(where)  # a bad model field fails here, naming the file, not at the first step
        if cfg.vision is not None:
            from phi3data.training.vlm import VisionSettings

            VisionSettings.from_dict(cfg.vision, f"{where}: [vision]")
        return cfg

    def model_config(self, where: str = "training config") -> Phi3Config:
        """The model's config: the recipe (or inline table) with ``model_overrides`` applied, strictly checked."""
        if self.init_from:
            d = load_config(resolve_weights(self.init_from)).to_dict()
        else:
            d = load_model_dict(self.model) if isinstance(self.model, str) else dict(self.model)
        d.update(self.model_overrides)
        return Phi3Config.from_dict(d, where, "model.")


_ADAPTER = TypeAdapter(TrainConfig)


def validate_train_config(fields: dict[str, Any], where: str, prefix: str = "") -> TrainConfig:
    """A TrainConfig from keyword fields, with the same type checks as a training TOML (for callers that build
    one, like the ladder); errors name ``where`` and ``prefix.field``."""
    try:
        return _ADAPTER.validate_python(fields)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where, prefix)) from None


def lr_at(cfg: TrainConfig, step: int, decay: tuple[int, int] | None = None) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine or WSD decay. ``decay``
    (start, end steps) places a WSD decay explicitly (a phase's steps); the rate stays at ``min_lr`` after it."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        if decay is not None:
            decay_start, decay_steps = decay[0], max(1, decay[1] - decay[0])
        else:
            decay_steps = max(1, int(cfg.wsd_decay_fraction * cfg.max_steps))
            decay_start = cfg.max_steps - decay_steps
        if step < decay_start:
            return cfg.lr
        progress = min(1.0, (step - decay_start) / decay_steps)
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    raise ValueError(f"unknown schedule {cfg.schedule!r}: use 'cosine' or 'wsd'")


def _peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_FLOPS.items():
            if key in name:
                return flops
    return None


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed_tokens" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    """Builds the model, optimizer and data from a :class:`TrainConfig` and runs the loop."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cfg.device == "auto":
            self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.is_main = self.rank == 0

        self.vision = None
        if cfg.vision is not None:
            from phi3data.training.vlm import VisionSettings

            self.vision = VisionSettings.from_dict(cfg.vision)
            self._check_vision_config()

        # data
        self.phases: PhasedDataset | None = None
        self.phase_val: dict[str, PackedDataset] = {}
        self.decay: tuple[int, int] | None = None
        if self.vision is None:
            self._build_text_data()

        # model + optimizer
        torch.manual_seed(cfg.seed)
        self.model_cfg = cfg.model_config()
        self.init_dir = resolve_weights(cfg.init_from) if cfg.init_from else None
        self.fsdp = self.world > 1 and cfg.distributed == "fsdp"
        self.feature_cache = None
        if self.vision is not None:
            self._build_vlm()
            self.lm = self.model.language_model
            groups = self._vlm_param_groups()
        else:
            for data in (self.train_data, self.val_data):
                if data is not None:
                    data.check_vocab(self.model_cfg.vocab_size)
            self.model = self._build_fsdp_model() if self.fsdp else Phi3(self.model_cfg).to(self.device)
            self.lm = self.model
            groups = _param_groups(self.model, cfg.weight_decay)
        # chunked lm_head + loss helps eager mode; under torch.compile inductor fuses the plain loss better
        # (H100: 40.9% vs 39.6% MFU at 350M), so the compiled path uses it
        self.lm.fused_loss = not cfg.compile
        # FSDP: after fully_shard, which replaced the parameters with the sharded ones the optimizer must hold
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            fused=self.device.type in ("cuda", "cpu"),
        )
        self.step = 0
        self.samples = 0
        self.tokens = 0
        self.resumed_from: Path | None = None
        last = latest_checkpoint(self.ckpt_root) if cfg.resume else None
        if last is not None:
            self._restore(last)
        elif self.init_dir is not None:
            self._load_initial_weights(self.init_dir)
        self.reference: dict[Path, np.ndarray] = {}  # DPO: stored reference log-probabilities per pairs folder
        self.reference_model: Phi3 | None = None
        self.eval_extra: dict[str, float] = {}
        if cfg.objective == "dpo":
            self._prepare_reference()
        self.train_model: torch.nn.Module = self.model
        if self.world > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # a VLM batch without images leaves the projector out of the graph
            self.train_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                   find_unused_parameters=self.vision is not None)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.peak = _peak_flops(cfg, self.device)
        self.flops_per_token = self.lm.flops_per_token(cfg.seq_len)  # a VLM's: its language model's
        self.tb = None

    def _build_text_data(self) -> None:
        """The token windows (or preference pairs, or phases) of a text run, and the held-out part."""
        cfg = self.cfg
        if cfg.objective == "dpo" and (cfg.data_phases or cfg.data_pack != "stream"):
            raise ConfigError("objective = 'dpo' reads preference pairs from data.path; data.phases and data.pack "
                              "do not apply")
        if cfg.data_phases:
            if cfg.data_pack != "stream":
                raise ConfigError("data.pack = 'documents' is not supported with data.phases")
            self._build_phases()
        elif cfg.max_steps < 1:
            raise ConfigError("max_steps must be at least 1 (0, from the token budgets, needs [[data.phases]])")
        if cfg.objective == "dpo":
            data = PreferencePairs(cfg.data_path, cfg.seq_len, seed=cfg.seed)
            self._say(f"{len(data)} preference pairs ({data.dropped_pairs} left out: longer than seq_len + 1)")
        else:
            data = self.phases if self.phases is not None else PackedDataset(
                cfg.data_path, cfg.seq_len, dtype=cfg.data_dtype, seed=cfg.seed, pack=cfg.data_pack)
            if getattr(data, "dropped_documents", 0):
                self._say(f"{data.dropped_documents} documents left out: longer than seq_len + 1")
        if self.phases is not None:
            self.train_data = data
            self.val_data = PackedDataset(cfg.val_path, cfg.seq_len, dtype=cfg.data_dtype) if cfg.val_path else None
        elif cfg.val_path:
            self.train_data = data
            self.val_data = PreferencePairs(cfg.val_path, cfg.seq_len) if cfg.objective == "dpo" else \
                PackedDataset(cfg.val_path, cfg.seq_len, dtype=cfg.data_dtype, pack=cfg.data_pack)
        elif cfg.val_windows > 0 and cfg.eval_every > 0:
            self.train_data, self.val_data = data.split(min(cfg.val_windows, len(data) // 10 or 1))
        else:
            self.train_data, self.val_data = data, None

    # ---- vision-language models ----------------------------------------------------------------------------
    def _check_vision_config(self) -> None:
        cfg = self.cfg
        if cfg.objective != "lm" or cfg.data_phases:
            raise ConfigError("[vision] trains with objective = 'lm' on image shards in data.path (no data.phases)")
        if self.world > 1 and cfg.distributed == "fsdp":
            raise ConfigError("[vision] runs under torchrun with distributed = 'ddp' (FSDP is for large text models)")
        if cfg.lr <= 0:
            raise ConfigError("[vision]: train.lr must be > 0 (each module's lr is scaled by schedule / train.lr)")
        if cfg.max_steps < 1:
            raise ConfigError("max_steps must be at least 1")

    def _build_vlm(self) -> None:
        """The VLM (language model from the config, tower + projector from [vision] or a stage-1 checkpoint) and its
        image batches."""
        from phi3data.training.vlm import ImageBatches, build_vlm, feature_cache, shards_image_token_id

        cfg, settings = self.cfg, self.vision
        token_id = shards_image_token_id(cfg.data_path)
        if settings.image_token_id is not None and settings.image_token_id != token_id:
            raise ConfigError(f"[vision] image_token_id = {settings.image_token_id} but the shards in {cfg.data_path} "
                              f"use {token_id}")
        self.model = build_vlm(settings, Phi3(self.model_cfg), token_id, self.init_dir).to(self.device)
        self.feature_cache = feature_cache(settings, self.model, self.out_dir)
        decode = self.feature_cache is None
        data = ImageBatches(cfg.data_path, cfg.seq_len, self.model, seed=cfg.seed, blind=settings.blind,
                            decode_pixels=decode)
        if data.dropped_documents:
            self._say(f"{data.dropped_documents} documents left out: longer than seq_len with images expanded")
        if cfg.val_path:
            self.train_data = data
            self.val_data = ImageBatches(cfg.val_path, cfg.seq_len, self.model, blind=settings.blind,
                                         decode_pixels=decode)
        elif cfg.val_windows > 0 and cfg.eval_every > 0:
            self.train_data, self.val_data = data.split(min(cfg.val_windows, len(data) // 10 or 1))
        else:
            self.train_data, self.val_data = data, None
        for part in (self.train_data, self.val_data):
            if part is not None:
                part.check_vocab(self.model_cfg.vocab_size)

    def _vlm_param_groups(self) -> list[dict[str, Any]]:
        from phi3data.model.vlm import configure_stage

        lrs = self.vision.lrs()
        groups = configure_stage(self.model, lrs, self.cfg.weight_decay)
        if not groups:
            raise ConfigError(f"[vision] stage {self.vision.stage!r} leaves nothing to train")
        self._say("trains " + ", ".join(f"{m} (lr {lr:g})" for m, lr in lrs.items())
                  + (" without images (blind)" if self.vision.blind else ""))
        return groups

    # ---- phases ------------------------------------------------------------------------------------------
    def _build_phases(self) -> None:
        """The phases, checked before any step: each directory exists and holds tokens of one tokenizer, each
        budget fits its data (or repeats it only when allowed), and the schedule's decay falls inside the run."""
        cfg = self.cfg
        phases, tokenizers, names = [], {}, []
        global_batch = cfg.micro_batch_size * cfg.grad_accum * self.world
        for i, spec in enumerate(cfg.data_phases):
            where = f"data.phases[{i}]"
            unknown = sorted(set(spec) - {"name", "path", "tokens", "allow_repeat"})
            if unknown or "path" not in spec or "tokens" not in spec:
                raise ConfigError(f"{where}: needs path and tokens (and optionally name, allow_repeat); "
                                  f"unknown: {unknown}" if unknown else f"{where}: needs path and tokens")
            name = str(spec.get("name") or f"phase{i + 1}")
            path = Path(spec["path"])
            if not path.exists():
                raise ConfigError(f"{where} ({name}): {path} does not exist")
            shards = open_shards(path) if path.is_dir() else []
            tokenizers[name] = {s.manifest.get("tokenizer_hash") for s in shards} or {None}
            data = PackedDataset(path, cfg.seq_len, dtype=cfg.data_dtype, seed=cfg.seed + 1000 * i)
            if not cfg.val_path and cfg.val_windows > 0 and cfg.eval_every > 0:  # held out per phase
                data, self.phase_val[name] = data.split(min(cfg.val_windows, len(data) // 10 or 1))
            samples = int(spec["tokens"]) // cfg.seq_len
            if samples < 1:
                raise ConfigError(f"{where} ({name}): tokens = {spec['tokens']} is less than one window "
                                  f"(seq_len {cfg.seq_len})")
            if samples > len(data) and not spec.get("allow_repeat", False):
                raise ConfigError(f"{where} ({name}): a budget of {spec['tokens']:,} tokens needs {samples:,} windows "
                                  f"but {path} holds {len(data):,}; lower it or set allow_repeat = true")
            phases.append(Phase(name, data, samples))
            names.append(name)
        seen = {h for hashes in tokenizers.values() for h in hashes}
        if len(seen) > 1:
            raise ConfigError(f"data.phases: the phases were tokenized by different tokenizers: {tokenizers}")
        if len(set(names)) != len(names):
            raise ConfigError(f"data.phases: phase names must be unique: {names}")
        self.phases = PhasedDataset(phases)
        steps = self.phases.total_samples // global_batch
        if cfg.max_steps == 0:
            cfg.max_steps = steps
        elif cfg.max_steps > steps:
            raise ConfigError(f"max_steps = {cfg.max_steps} needs {cfg.max_steps * global_batch:,} windows but the "
                              f"phases' budgets give {self.phases.total_samples:,} ({steps} steps); leave max_steps "
                              "out to take it from the budgets")
        if cfg.decay_phase is not None:
            if cfg.schedule != "wsd":
                raise ConfigError("decay_phase places a warmup-stable-decay schedule's decay; set schedule = \"wsd\"")
            if cfg.decay_phase not in names:
                raise ConfigError(f"decay_phase {cfg.decay_phase!r} is not a phase ({', '.join(names)})")
            k = names.index(cfg.decay_phase)
            start, end = int(self.phases.starts[k]) // global_batch, int(self.phases.starts[k + 1]) // global_batch
            if start >= cfg.max_steps:
                raise ConfigError(f"decay_phase {cfg.decay_phase!r} starts at step {start}, after the run's "
                                  f"{cfg.max_steps} steps: the decay would fall outside the run")
            self.decay = (start, min(end, cfg.max_steps))
        elif cfg.schedule == "wsd" and not 0 < cfg.wsd_decay_fraction <= 1:
            raise ConfigError(f"wsd_decay_fraction = {cfg.wsd_decay_fraction} puts the decay outside the run")

    def phase_name(self, samples: int) -> str | None:
        return self.phases.phases[self.phases.phase_at(samples)].name if self.phases is not None else None

    # ---- model and checkpoints ----------------------------------------------------------------------------
    def _build_fsdp_model(self) -> Phi3:
        """FSDP2: build on the meta device, shard each block and the root, then allocate and initialise the shards.

        No process ever holds the whole model; the weights equal a whole build's from the same seed (see
        :meth:`Phi3.init_weights`).
        """
        from torch.distributed.fsdp import fully_shard

        with torch.device("meta"):
            model = Phi3(self.model_cfg)
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        model.to_empty(device=self.device)
        model.init_weights()
        return model

    def _load_initial_weights(self, path: Path) -> None:
        """``init_from``: the starting weights (the config already came from there), read as a checkpoint's are."""
        sd = read_weights(path)
        if self.vision is not None:
            from phi3data.training.vlm import full_state_dict, is_vlm_checkpoint

            if is_vlm_checkpoint(path):  # stage 2 from stage 1: tower, projector and language model
                self.model.load_state_dict(full_state_dict(sd, self.model))
            else:  # stage 1 from a text model
                if self.model_cfg.tie_word_embeddings:
                    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
                self.model.language_model.load_state_dict(sd)
            self._say(f"initialised from {path}")
            return
        if self.model_cfg.tie_word_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, sd, options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(sd)
        self._say(f"initialised from {path}")

    def _prepare_reference(self) -> None:
        """DPO's reference: log-probabilities stored beside the pairs (computed once, by rank 0), or a frozen model."""
        cfg = self.cfg
        source = cfg.dpo_reference_from or cfg.init_from
        if not source:
            raise ConfigError("objective = 'dpo' needs train.init_from (the SFT model) or dpo.reference_from")
        ref_dir = resolve_weights(source)
        if load_config(ref_dir).to_dict() != self.model_cfg.to_dict():
            raise ConfigError(f"the DPO reference {ref_dir} has another architecture than the policy")
        if cfg.dpo_reference == "on_the_fly":
            self.reference_model = load_hf(ref_dir).to(self.device).eval()
            self.reference_model.requires_grad_(False)
            return
        datasets = {d.path: d for d in (self.train_data, self.val_data) if d is not None}
        keys = {path: dpo.reference_key(ref_dir, data) for path, data in datasets.items()}
        if self.is_main:
            ref_model = load_hf(ref_dir).to(self.device)
            for path, data in datasets.items():
                with self.autocast:
                    _, stored, computed = dpo.load_or_compute_reference(
                        ref_model, data, keys[path], self.device, 2 * cfg.micro_batch_size, self._say)
                self._say(f"reference log-probabilities {'written to' if computed else 'read from'} {stored}")
            del ref_model
        if self.world > 1:
            dist.barrier()
        self.reference = {path: np.load(path / dpo.REFERENCE_DIR / f"{key}.npy") for path, key in keys.items()}

    def _reference_logps(self, batch: dict[str, torch.Tensor], data: PreferencePairs) -> tuple[torch.Tensor, ...]:
        """The reference model's (sums, counts) for a collated pair batch: stored, or scored now."""
        if self.reference_model is not None:
            with torch.no_grad():
                return dpo.pair_logps(self.reference_model, batch, self.device)
        rows = torch.from_numpy(self.reference[data.path][batch["pairs"].numpy()]).to(self.device, torch.float32)
        return torch.cat([rows[:, 0], rows[:, 1]]), torch.cat([rows[:, 2], rows[:, 3]])

    def _dpo_loss(self, batch: dict[str, torch.Tensor],
                  data: PreferencePairs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean DPO/IPO loss of a pair batch and its reward metrics (and the policy's own ranking)."""
        cfg, n = self.cfg, len(batch["pairs"])
        with self.autocast:
            sums, counts = dpo.pair_logps(self.train_model, batch, self.device)
            ref_sums, ref_counts = self._reference_logps(batch, data)
        policy, ref = sums, ref_sums
        if cfg.dpo_loss == "ipo":  # IPO compares per-token means
            policy, ref = sums / counts.clamp(min=1), ref_sums / ref_counts.clamp(min=1)
        losses, chosen, rejected = dpo.dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], cfg.dpo_beta,
                                                cfg.dpo_loss, cfg.dpo_label_smoothing)
        if cfg.dpo_nll_weight:
            losses = losses - cfg.dpo_nll_weight * sums[:n] / counts[:n].clamp(min=1)
        metrics = {"reward_chosen": chosen.mean(), "reward_rejected": rejected.mean(),
                   "reward_accuracy": (chosen > rejected).float().mean(), "reward_margin": (chosen - rejected).mean(),
                   "policy_ranking": (sums[:n] > sums[n:]).float().mean().detach(),
                   "policy_ranking_per_token": (sums[:n] / counts[:n].clamp(min=1) >
                                                sums[n:] / counts[n:].clamp(min=1)).float().mean().detach()}
        return losses.mean(), metrics

    def _restore(self, path: Path) -> None:
        """Load weights, optimizer state and the data position from checkpoint ``path``."""
        model_sd, optim_sd, state = load_checkpoint(path)
        if self.vision is not None:
            from phi3data.training.vlm import full_state_dict

            model_sd = full_state_dict(model_sd, self.model)
        elif self.model_cfg.tie_word_embeddings:
            model_sd["lm_head.weight"] = model_sd["model.embed_tokens.weight"]
        sharded = (path / OPTIMIZER_DIR).is_dir()
        if not sharded and not optim_sd:  # an FSDP checkpoint from before optimizer state was saved
            raise ConfigError(f"checkpoint {path} holds no optimizer state (an FSDP run of an older phi3data); "
                              "resuming would reset AdamW: start over with resume=false or another out_dir")
        if sharded != self.fsdp:
            if sharded and self.cfg.distributed == "fsdp":
                how = "run it under torchrun with more than one process (distributed=fsdp)"
            else:
                how = f"resume it with distributed={'fsdp' if sharded else 'ddp'}"
            kind = "an FSDP run" if sharded else "a run without FSDP"
            raise ConfigError(f"checkpoint {path} was written by {kind}; {how}, or start over with resume=false "
                              "or another out_dir")
        if self.fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            set_model_state_dict(self.model, model_sd, options=StateDictOptions(full_state_dict=True))
            sharded_sd = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
            dcp.load(sharded_sd, checkpoint_id=path / OPTIMIZER_DIR)
            set_optimizer_state_dict(self.model, self.optimizer, sharded_sd["optimizer"])
        else:
            self.model.load_state_dict(model_sd)
            self.optimizer.load_state_dict(optim_sd)
        self.step, self.samples, self.tokens = state["step"], state["samples"], state["tokens"]
        self.resumed_from = path

    def save(self) -> Path | None:
        """Write a checkpoint (rank 0; under FSDP every rank writes its optimizer shard through DCP)."""
        tmp = start_checkpoint(self.ckpt_root, self.step) if self.is_main else temp_dir(self.ckpt_root, self.step)
        if self.fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd = get_model_state_dict(self.model, options=opts)
            dist.barrier()  # rank 0 has made the temp directory
            # AdamW moments stay sharded: each rank writes its shard, rank 0 the metadata
            dcp.save(
                {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)},
                checkpoint_id=tmp / OPTIMIZER_DIR,
            )
            optim_sd: dict[str, Any] | None = None
        elif self.vision is not None:
            from phi3data.training.vlm import vlm_state_dict, write_vlm_file

            model_sd, optim_sd = vlm_state_dict(self.model), self.optimizer.state_dict()
            if self.is_main:
                write_vlm_file(tmp, self.model)
        else:
            model_sd, optim_sd = self.model.state_dict(), self.optimizer.state_dict()
        path = None
        if self.is_main:
            state = {
                "step": self.step,
                "samples": self.samples,
                "tokens": self.tokens,
                "world_size": self.world,
                "train_config": asdict(self.cfg),
            }
            path = finish_checkpoint(tmp, model_sd, self.model_cfg, optim_sd, state, keep=self.cfg.keep_checkpoints,
                                     hf_config=self.vision is None)
        if self.world > 1:
            dist.barrier()
        return path

    # ---- metrics -----------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record.get("step", 0))

    def _all_mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            x = x / self.world
        return x

    @torch.no_grad()
    def _evaluate_dpo(self, val_data: PreferencePairs) -> float:
        """Held-out pairs: the mean DPO loss; reward accuracy, margin and the policy's ranking go to ``eval_extra``."""
        self.train_model.eval()
        totals: dict[str, float] = {}
        batches = val_data.fixed_batches(self.cfg.eval_batches, self.cfg.micro_batch_size)
        pairs = sum(len(batch["pairs"]) for batch in batches)
        for batch in batches:  # a mean over pairs (the last batch may be smaller)
            loss, metrics = self._dpo_loss(batch, val_data)
            for k, v in {"loss": loss, **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(batch["pairs"]) / pairs
        self.train_model.train()
        means = {k: float(self._all_mean(torch.tensor(v, device=self.device))) for k, v in totals.items()}
        self.eval_extra = {f"val_{k}": v for k, v in means.items() if k != "loss"}
        return means["loss"]

    @torch.no_grad()
    def evaluate(self, val_data: PackedDataset | None = None) -> float | None:
        if val_data is None and self.phases is not None and self.val_data is None:
            return self.evaluate(self.phase_val.get(self.phase_name(max(self.samples - 1, 0)))) \
                if self.phase_val else None
        val_data = val_data or self.val_data
        if val_data is None:
            return None
        if self.cfg.objective == "dpo":
            return self._evaluate_dpo(val_data)
        self.train_model.eval()
        losses, counts = [], []
        for batch in val_data.fixed_batches(self.cfg.eval_batches, self.cfg.micro_batch_size):
            if self.vision is not None:
                y = batch["targets"]
                with self.autocast:
                    loss = vlm_forward(self.train_model, batch, self.device, self.feature_cache)
            else:
                x, y, *docs = batch
                documents = docs[0].to(self.device) if docs else None
                with self.autocast:
                    _, loss = self.train_model(x.to(self.device), y.to(self.device), documents=documents)
            losses.append(loss.float())
            counts.append(float((y != IGNORE_INDEX).sum()))
        self.train_model.train()
        if not val_data.has_mask:
            return float(self._all_mean(torch.stack(losses).mean()))
        # masked (SFT) data: the mean over trained targets, as in training, not over batches
        weights = torch.tensor(counts, device=self.device) / max(sum(counts), 1.0)
        return float(self._all_mean((torch.stack(losses) * weights).sum()))

    # ---- the loop ----------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        lr = lr_at(cfg, self.step, self.decay)
        for group in self.optimizer.param_groups:  # each group at its own base_lr, scaled as the schedule is
            base = group.get("base_lr", cfg.lr)
            group["lr"] = lr if base == cfg.lr else base * lr / cfg.lr
        mb, accum = cfg.micro_batch_size, cfg.grad_accum
        batches = [self.train_data.batch(self.samples + (self.rank * accum + m) * mb, mb) for m in range(accum)]
        is_dpo, is_vlm = cfg.objective == "dpo", self.vision is not None
        weights = None if is_dpo else self._micro_batch_weights([b["targets"] if is_vlm else b[1] for b in batches])
        loss_sum = torch.zeros((), device=self.device)
        extras: dict[str, torch.Tensor] = {}
        digest = xxhash.xxh64()
        step_tokens = 0
        for batch in batches:  # which samples the step saw: equal digests, equal batches (resume checks)
            inputs = batch["inputs"] if is_dpo else batch["input_ids"] if is_vlm else batch[0]
            digest.update(inputs.numpy().tobytes())
            step_tokens += inputs.numel()
        for m, batch in enumerate(batches):
            sync = m == accum - 1 or self.world == 1 or not hasattr(self.train_model, "no_sync")
            ctx = contextlib.nullcontext() if sync else self.train_model.no_sync()
            with ctx:
                if is_dpo:
                    loss, metrics = self._dpo_loss(batch, self.train_data)
                    for k, v in metrics.items():
                        extras[k] = extras.get(k, 0.0) + v / accum
                elif is_vlm:
                    with self.autocast:
                        loss = vlm_forward(self.train_model, batch, self.device, self.feature_cache)
                else:
                    x, y, *docs = (t.to(self.device, non_blocking=True) for t in batch)
                    with self.autocast:
                        _, loss = self.train_model(x, y, documents=docs[0] if docs else None)
                share = loss / accum if weights is None else loss * weights[m]
                share.backward()
            loss_sum += share.detach().float()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        loss_val = self._all_mean(loss_sum)
        if not (torch.isfinite(loss_val) and torch.isfinite(grad_norm)):
            last = latest_checkpoint(self.ckpt_root)
            raise TrainingDiverged(
                f"step {self.step}: loss={float(loss_val)} grad_norm={float(grad_norm)} is not finite "
                f"(lr={lr:.3g}). Stopping before the optimizer step so no weights are poisoned. Try a lower lr, "
                f"a longer warmup or grad_clip>0, or check the data in {cfg.data_path}. Last good checkpoint: "
                f"{last or 'none'}."
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        global_batch = mb * accum * self.world
        self.samples += global_batch
        self.tokens += step_tokens * self.world  # positions processed (DPO: both sides, padded)
        self.step += 1
        record = {"loss": float(loss_val), "lr": lr, "grad_norm": float(grad_norm), "batch_digest": digest.hexdigest()}
        if is_vlm:  # each module's own rate
            record.update({f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups
                           if not g["name"].endswith(".no_decay")})
        record.update({k: float(self._all_mean(v.detach().float())) for k, v in extras.items()})
        return record

    def _micro_batch_weights(self, targets: list[torch.Tensor]) -> list[float] | None:
        """Loss weight of each micro-batch, so a step's gradient is the mean over all its trained targets.

        Without a loss mask every micro-batch has the same number of targets and weighs ``1 / grad_accum``
        (None). With one (SFT data), a micro-batch counts by its unmasked targets, summed over micro-batches and
        ranks (DDP then averages gradients over ranks, hence the factor ``world``).
        """
        if not self.train_data.has_mask:
            return None
        counts = torch.tensor([float((y != IGNORE_INDEX).sum()) for y in targets], dtype=torch.float64)
        total = counts.sum().to(self.device)
        if self.world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        total = max(float(total), 1.0)
        return [float(c) * self.world / total for c in counts]

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.is_main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tb"))
        if self.resumed_from is not None:
            self._log({"event": "resume", "step": self.step, "checkpoint": str(self.resumed_from)})
            self._say(f"resumed from {self.resumed_from} at step {self.step}")
        self.train_model.train()
        if cfg.objective == "dpo" and self.step == 0 and cfg.eval_every > 0:  # the starting point, for comparison
            val = self.evaluate()
            if val is not None:
                self._log({"step": 0, "val_loss": val, **self.eval_extra})
                self._say(f"step 0 | val_loss {val:.4f} | held-out ranking {self.eval_extra['val_policy_ranking']:.3f}")
        last: dict[str, Any] = {}
        t_last, steps_since, tokens_since = time.perf_counter(), 0, self.tokens
        while self.step < cfg.max_steps:
            phase = self.phase_name(self.samples)
            rec = self.train_step()
            if phase is not None:
                rec["phase"] = phase
            steps_since += 1
            if self.device.type == "cuda" and (self.step % cfg.log_every == 0 or self.step == cfg.max_steps):
                torch.cuda.synchronize()
            now = time.perf_counter()
            dt = now - t_last
            tok_s = (self.tokens - tokens_since) / dt if dt > 0 else 0.0
            mfu = self.flops_per_token * tok_s / (self.peak * self.world) if self.peak else None
            rec.update(step=self.step, tokens=self.tokens, tokens_per_s=tok_s, mfu=mfu)
            self._log(rec)
            last = rec
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                mfu_s = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
                self._say(
                    f"step {self.step}/{cfg.max_steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
                    f"grad {rec['grad_norm']:.2f} | {tok_s:,.0f} tok/s | MFU {mfu_s} | "
                    f"{1000 * dt / steps_since:.0f} ms/step"
                    + (f" | reward acc {rec['reward_accuracy']:.2f} margin {rec['reward_margin']:.3f}"
                       if "reward_accuracy" in rec else "")
                )
                t_last, steps_since, tokens_since = time.perf_counter(), 0, self.tokens
            if cfg.eval_every > 0 and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                val = self.evaluate()
                if val is not None:
                    record = {"step": self.step, "val_loss": val, **self.eval_extra}
                    if self.phases is not None:  # every phase's held-out loss, and the current phase's name
                        record["phase"] = self.phase_name(self.samples - 1)
                        record.update({f"val_loss/{name}": self.evaluate(data)
                                       for name, data in self.phase_val.items()})
                    self._log(record)
                    self._say(f"step {self.step} | val_loss {val:.4f}" + "".join(
                        f" | {k.removeprefix('val_')} {v:.3f}" for k, v in self.eval_extra.items()))
                    last["val_loss"] = val
                    last.update(self.eval_extra)
                t_last, steps_since, tokens_since = time.perf_counter(), 0, self.tokens
            if cfg.ckpt_every > 0 and (self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps):
                self.save()
                t_last, steps_since, tokens_since = time.perf_counter(), 0, self.tokens
        if self.tb is not None:
            self.tb.close()
        return last

    def _say(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)


def train(config: str | Path | TrainConfig, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run training from a TOML path or a :class:`TrainConfig`; returns the last step's metrics."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_toml(config, overrides)
    # one run per out_dir: rank 0 holds its lock (a second run would delete this one's checkpoint temp dirs)
    lock = output_lock(Path(cfg.out_dir)) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()
    with lock:
        trainer = Trainer(cfg)
        try:
            return trainer.train()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def main() -> None:
    """Entry point for ``python -m phi3data.training.trainer CONFIG [key=value ...]`` (and torchrun)."""
    import sys

    from phi3data.training.overrides import parse_overrides

    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m phi3data.training.trainer CONFIG.toml [key=value ...]")
    try:
        train(sys.argv[1], parse_overrides(sys.argv[2:]))
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()
