"""Export a :class:`~phi3data.model.vlm.VLM` as transformers' ``LlavaForConditionalGeneration``, and read it back.

The directory holds ``config.json`` (a ``LlavaConfig``: ``vision_config`` a ``CLIPVisionConfig`` for the in-repo
ViT or the loaded CLIP / SigLIP config, ``text_config`` a ``Phi3Config``, the projector's activation, LLaVA's
feature layer and selection, the image token id and count), ``model.safetensors`` with the weights in the layout
the llava-hf checkpoints use (``vision_tower.vision_model.*``, ``multi_modal_projector.*``,
``language_model.model.*``, ``language_model.lm_head.weight``; transformers 4.x and 5.x and vLLM read it),
``preprocessor_config.json`` for the images and ``phi3data_vlm.json`` with what LlavaConfig has no field for.

transformers' projector is always linear -> activation -> linear; a ``linear`` projector is written exactly as
``linear_1`` = ours, activation ``linear`` (identity) and ``linear_2`` = the identity matrix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from phi3data.model.hf import config_from_hf, config_to_hf
from phi3data.model.model import Phi3
from phi3data.model.vision import HFVisionTower, ViT, ViTConfig, clip_preprocessor_config
from phi3data.model.vlm import VLM

EXTRA_FILE = "phi3data_vlm.json"


def _vision_config(vlm: VLM) -> dict[str, Any]:
    tower = vlm.vision_tower
    if isinstance(tower, ViT):
        return tower.cfg.to_hf()
    if isinstance(tower, HFVisionTower):
        d = tower.model.config.to_dict()
        for key in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
            d.pop(key, None)
        return d
    raise TypeError(f"cannot export a {type(tower).__name__} vision tower (use ViT or a CLIP / SigLIP tower)")


def llava_config(vlm: VLM) -> dict[str, Any]:
    """The ``LlavaConfig`` dict of the model; the text model must be plain phi-3 (``Phi3ForCausalLM``)."""
    tower = vlm.vision_tower
    text = config_to_hf(vlm.language_model.cfg)  # refuses phi-3-small options
    text.pop("architectures")
    drops_cls = tower.has_class_token and tower.select_feature == "patch"
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": _vision_config(vlm),
        "text_config": text,
        "image_token_index": vlm.image_token_id,
        "image_seq_length": vlm.n_tokens,
        "projector_hidden_act": "gelu" if vlm.projector.kind == "mlp2x_gelu" else "linear",
        "multimodal_projector_bias": True,
        "vision_feature_layer": tower.feature_layer,
        # transformers' "default" drops the first token: right for CLIP's class token, wrong for SigLIP
        "vision_feature_select_strategy": "default" if drops_cls else "full",
        "tie_word_embeddings": vlm.language_model.cfg.tie_word_embeddings,
        "torch_dtype": "float32",
    }


def llava_state_dict(vlm: VLM) -> dict[str, torch.Tensor]:
    """The weights under llava-hf's names."""
    out: dict[str, torch.Tensor] = {}
    tower = vlm.vision_tower
    vision = tower.model.state_dict() if isinstance(tower, HFVisionTower) else tower.state_dict()
    for k, v in vision.items():
        out[f"vision_tower.vision_model.{k.removeprefix('vision_model.')}"] = v
    proj = vlm.projector
    out["multi_modal_projector.linear_1.weight"] = proj.linear_1.weight
    out["multi_modal_projector.linear_1.bias"] = proj.linear_1.bias
    if proj.linear_2 is not None:
        out["multi_modal_projector.linear_2.weight"] = proj.linear_2.weight
        out["multi_modal_projector.linear_2.bias"] = proj.linear_2.bias
    else:
        h = proj.linear_1.out_features
        out["multi_modal_projector.linear_2.weight"] = torch.eye(h, dtype=proj.linear_1.weight.dtype)
        out["multi_modal_projector.linear_2.bias"] = torch.zeros(h, dtype=proj.linear_1.weight.dtype)
    lm = vlm.language_model
    for k, v in lm.state_dict().items():
        if k == "lm_head.weight":
            if not lm.cfg.tie_word_embeddings:
                out["language_model.lm_head.weight"] = v
        else:
            out[f"language_model.{k}"] = v  # model.embed_tokens / model.layers / model.norm
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_llava(vlm: VLM, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the export directory (each file atomically); ``LlavaForConditionalGeneration.from_pretrained`` loads
    it."""
    from safetensors.torch import save_file

    from phi3data.io.writers import commit, tmp_path_for, write_text_atomic

    cfg = llava_config(vlm)
    sd = llava_state_dict(vlm)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    tmp = tmp_path_for(path / "model.safetensors")
    save_file(sd, str(tmp), metadata={"format": "pt"})
    commit(tmp, path / "model.safetensors")
    tower = vlm.vision_tower
    processor = clip_preprocessor_config(tower.image_size, tower.image_mean, tower.image_std)
    write_text_atomic(path / "preprocessor_config.json", json.dumps(processor, indent=2))
    extra = {"projector": vlm.projector.kind, "select_feature": tower.select_feature,
             "image_mean": list(tower.image_mean), "image_std": list(tower.image_std)}
    write_text_atomic(path / EXTRA_FILE, json.dumps(extra, indent=2))
    write_text_atomic(path / "config.json", json.dumps(cfg, indent=2))
    return path


def load_llava(path: str | Path) -> VLM:
    """Read an export of an in-repo ViT model (a CLIP vision tower) back into a :class:`VLM`."""
    from phi3data.model.hf import read_weights

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    extra = json.loads((path / EXTRA_FILE).read_text()) if (path / EXTRA_FILE).exists() else {}
    vc = cfg["vision_config"]
    if vc.get("model_type") != "clip_vision_model":
        raise ValueError(f"{path}: only CLIP vision towers are read back (got {vc.get('model_type')!r})")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    vit_cfg = ViTConfig(**{k: vc[k] for k in ("image_size", "patch_size", "num_channels", "hidden_size",
                                              "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                              "layer_norm_eps", "hidden_act", "initializer_range") if k in vc},
                        feature_layer=cfg.get("vision_feature_layer", -2),
                        select_feature="patch" if strategy == "default" else "cls_patch",
                        **{k: tuple(extra[k]) for k in ("image_mean", "image_std") if k in extra})
    act = cfg.get("projector_hidden_act", "gelu")
    if act not in ("gelu", "linear"):
        raise ValueError(f"{path}: projector_hidden_act {act!r} has no phi3data projector")
    text = dict(cfg["text_config"])
    if "tie_word_embeddings" not in text:
        text["tie_word_embeddings"] = cfg.get("tie_word_embeddings", False)
    vlm = VLM(ViT(vit_cfg), Phi3(config_from_hf(text)), "mlp2x_gelu" if act == "gelu" else "linear",
              cfg.get("image_token_index", 32000))
    sd = read_weights(path)
    parts: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "projector": {}, "lm": {}}
    for k, v in sd.items():
        if k.startswith("vision_tower.vision_model."):
            parts["vision"][k.removeprefix("vision_tower.vision_model.")] = v
        elif k.startswith("multi_modal_projector."):
            parts["projector"][k.removeprefix("multi_modal_projector.")] = v
        elif k.startswith("language_model."):
            parts["lm"][k.removeprefix("language_model.")] = v
        else:
            raise ValueError(f"{path}: unexpected tensor {k}")
    if vlm.projector.linear_2 is None:
        w2, b2 = parts["projector"].pop("linear_2.weight"), parts["projector"].pop("linear_2.bias")
        if not (torch.equal(w2, torch.eye(w2.shape[0], dtype=w2.dtype)) and not b2.any()):
            raise ValueError(f"{path}: projector_hidden_act 'linear' with a second layer that is not the identity")
    vlm.vision_tower.load_state_dict(parts["vision"])
    vlm.projector.load_state_dict(parts["projector"])
    lm = parts["lm"]
    if vlm.language_model.cfg.tie_word_embeddings:
        lm["lm_head.weight"] = lm["model.embed_tokens.weight"]
    vlm.language_model.load_state_dict(lm)
    return vlm
