"""Hugging Face import / export: ``config.json`` + ``model.safetensors`` in ``Phi3ForCausalLM`` form.

Parameter names are identical on both sides, so conversion is a rename-free copy; only the config is
translated. Loading reads safetensors only (never pickles).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from phi3data.config import check_keys
from phi3data.model.model import Phi3, Phi3Config

_HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "original_max_position_embeddings",
    "rms_norm_eps",
    "sliding_window",
    "tie_word_embeddings",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def config_from_hf(d: dict[str, Any]) -> Phi3Config:
    """Translate a Hugging Face phi3 ``config.json`` dict into our config."""
    if d.get("model_type") not in (None, "phi3"):
        raise ValueError(f"expected a phi3 config.json, got model_type={d.get('model_type')!r}")
    kw = {k: d[k] for k in _HF_KEYS if k in d}
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    kw["rope_theta"] = float(d.get("rope_theta", rope.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type"))
    if kind in ("longrope", "su", "yarn"):
        kw["rope_scaling"] = {
            "type": "longrope",
            "short_factor": list(rope["short_factor"]),
            "long_factor": list(rope["long_factor"]),
        }
        for extra in ("factor", "attention_factor"):
            if rope.get(extra) is not None:
                kw["rope_scaling"][extra] = rope[extra]
        if "original_max_position_embeddings" in rope:
            kw["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"phi3 hidden_act {d['hidden_act']!r} is not supported (only silu)")
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = kw["eos_token_id"][0]
    if "original_max_position_embeddings" not in kw:
        kw["original_max_position_embeddings"] = kw.get("max_position_embeddings", 4096)
    return Phi3Config(**kw)


def config_to_hf(cfg: Phi3Config) -> dict[str, Any]:
    """Our config as a Hugging Face ``Phi3Config`` dict (classic ``rope_scaling`` form, as Microsoft ships it)."""
    if not cfg.hf_compatible:
        raise ValueError(
            "this config uses phi-3-small options (gegelu / muP / blocksparse / LayerNorm / biases) that transformers' "
            "Phi3ForCausalLM does not implement; save it with phi3data.model.hf.save_native instead"
        )
    d: dict[str, Any] = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu"}
    for k in _HF_KEYS:
        d[k] = getattr(cfg, k)
    d["rope_theta"] = cfg.rope_theta
    d["torch_dtype"] = "float32"
    d["attention_dropout"] = 0.0
    d["resid_pdrop"] = 0.0
    d["embd_pdrop"] = 0.0
    d["use_cache"] = True
    if cfg.rope_scaling is not None:
        d["rope_scaling"] = {
            "type": "longrope",
            "short_factor": list(cfg.rope_scaling["short_factor"]),
            "long_factor": list(cfg.rope_scaling["long_factor"]),
        }
    else:
        d["rope_scaling"] = None
    return d


def _state_dict_for_saving(model: Phi3) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def save_hf(model: Phi3, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that ``AutoModelForCausalLM.from_pretrained`` loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    d = config_to_hf(model.cfg)
    sd = _state_dict_for_saving(model)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
        d["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(d, indent=2))
    return path


def save_native(model: Phi3, path: str | Path) -> Path:
    """Write ``phi3data_config.json`` + ``model.safetensors`` for any config (phi-3-small options included)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(_state_dict_for_saving(model), str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "phi3data_config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2))
    return path


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of every ``model*.safetensors`` in a checkpoint directory (never pickles)."""
    files = sorted(path.glob("model*.safetensors"))  # not rng.safetensors beside it in a training checkpoint
    if not files:
        raise FileNotFoundError(f"no model*.safetensors file in {path} (pickled .bin checkpoints are not loaded)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def resolve_weights(path: str | Path) -> Path:
    """The directory holding the weights: ``path`` itself when it has ``model*.safetensors``, else, for a training
    run's ``out_dir``, its newest complete checkpoint."""
    from phi3data.training.checkpoint import latest_checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"checkpoint {path} is not a directory (give the checkpoint or run directory)")
    if any(path.glob("model*.safetensors")):
        return path
    last = latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else None
    if last is None:
        raise FileNotFoundError(f"{path}: no model*.safetensors here and no finished checkpoint under "
                                f"{path / 'checkpoints'}")
    return last


def load_config(path: str | Path) -> Phi3Config:
    """The model config of a checkpoint or Hugging Face phi3 directory."""
    path = Path(path)
    if (path / "phi3data_config.json").exists():  # a checkpoint of this or an older version: lenient
        return Phi3Config.from_checkpoint_dict(json.loads((path / "phi3data_config.json").read_text()))
    if (path / "config.json").exists():
        return config_from_hf(json.loads((path / "config.json").read_text()))
    raise FileNotFoundError(f"{path} has neither config.json nor phi3data_config.json")


def load_hf(path: str | Path, **overrides: Any) -> Phi3:
    """Load a Hugging Face phi3 directory (or one written by :func:`save_native`) into our model."""
    path = Path(path)
    cfg = load_config(path)
    check_keys(overrides, Phi3Config.field_names(), "load_hf overrides")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = Phi3(cfg)
    sd = read_weights(path)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if cfg.tie_word_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the config: missing {missing}, unexpected {unexpected}")
    return model
