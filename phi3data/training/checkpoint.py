"""Training checkpoints: a directory per step, written atomically (temp dir + rename).

``checkpoints/step_000100/``
  ``model.safetensors``      weights (plus ``config.json`` in Hugging Face form when the config allows it, so
                              the directory loads directly in ``AutoModelForCausalLM``)
  ``phi3data_config.json``   our model config
  ``optimizer.pt``           AdamW state; tensors, numbers and lists only, read with ``weights_only=True``
  ``optimizer/``             instead, under FSDP: each rank's AdamW shard, in torch.distributed.checkpoint form
  ``rng.safetensors``        torch CPU (and CUDA) RNG states
  ``state.json``             step, data position (samples consumed), tokens seen, train config

Nothing here unpickles arbitrary objects, with one exception: torch.distributed.checkpoint keeps the index of an
FSDP run's ``optimizer/`` as a pickle (``.metadata``), which ``dcp.load`` reads; resume only checkpoints you wrote.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from phi3data.model.hf import config_to_hf
from phi3data.model.model import Phi3Config

OPTIMIZER_DIR = "optimizer"  # FSDP runs: the sharded optimizer state, written by torch.distributed.checkpoint


def temp_dir(ckpt_root: Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before its atomic rename to ``step_<step>``."""
    return ckpt_root / f".tmp_step_{step:07d}"


def start_checkpoint(ckpt_root: Path, step: int) -> Path:
    """Create checkpoint ``step``'s empty temp directory (other writers, e.g. DCP, may add to it before finishing)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(ckpt_root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def finish_checkpoint(
    tmp: Path,
    model_sd: dict[str, torch.Tensor],
    model_cfg: Phi3Config,
    optim_sd: dict[str, Any] | None,
    state: dict[str, Any],
    keep: int = 2,
    hf_config: bool = True,
) -> Path:
    """Write the files into ``tmp``, sync them, rename it to its final name and prune to the ``keep`` newest.

    ``optim_sd`` None: no ``optimizer.pt`` (an FSDP run saved its sharded optimizer state in ``tmp/optimizer``).
    ``hf_config`` False: no ``config.json`` (the weights are not a plain ``Phi3ForCausalLM``: a VLM's).
    """
    ckpt_root = tmp.parent
    final = ckpt_root / tmp.name.removeprefix(".tmp_")
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model_sd.items()}
    if model_cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "phi3data_config.json").write_text(json.dumps(model_cfg.to_dict(), indent=2))
    if hf_config and model_cfg.hf_compatible:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(model_cfg), indent=2))
    if optim_sd is not None:
        torch.save(optim_sd, tmp / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    old = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model_sd: dict[str, torch.Tensor],
    model_cfg: Phi3Config,
    optim_sd: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` under ``ckpt_root`` atomically and prune to the ``keep`` newest."""
    return finish_checkpoint(start_checkpoint(ckpt_root, step), model_sd, model_cfg, optim_sd, state, keep)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint (temp dirs from a killed writer are ignored)."""
    done = sorted(p for p in ckpt_root.glob("step_*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read (model state dict, optimizer state dict, state) and restore the RNG states."""
    model_sd = load_file(str(path / "model.safetensors"))
    optim_file = path / "optimizer.pt"  # absent in FSDP checkpoints (their optimizer/ is read by the trainer)
    optim_sd = torch.load(optim_file, map_location="cpu", weights_only=True) if optim_file.exists() else {}
    state = json.loads((path / "state.json").read_text())
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return model_sd, optim_sd, state
