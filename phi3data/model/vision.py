"""Vision towers for the VLM: one interface, a small in-repo ViT, and CLIP / SigLIP towers loaded from a local path.

A tower maps pixels ``(B, 3, image_size, image_size)`` (already normalised with its ``image_mean`` / ``image_std``)
to features ``(B, n_tokens, hidden_size)``: the hidden states of ``feature_layer`` (LLaVA's -2, the penultimate
layer), without the class token when ``select_feature`` is ``"patch"`` (LLaVA's default) or with it for
``"cls_patch"``. ``pooled(pixels)`` gives one vector per image (the post-layernormed class token, what CLIP's
contrastive loss trains).

:class:`ViT` is config-driven and small enough to train on a CPU. Its modules and parameter names are those of
transformers' ``CLIPVisionModel`` (patch conv, class token, position embeddings, ``pre_layrnorm`` with
transformers' spelling, encoder layers, ``post_layernorm``), so :func:`save_vit` writes a directory that
``CLIPVisionModel.from_pretrained`` loads and :mod:`phi3data.export.llava` exports it as a LLaVA vision tower.
:func:`load_vision_tower` reads either kind of directory.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from phi3data.config import ConfigError, check_keys

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
SELECT_FEATURES = ("patch", "cls_patch")
VIT_FILE = "phi3data_vision.json"  # marks a directory written by save_vit (our ViT; also a CLIPVisionModel dir)


class VisionTower(nn.Module):
    """The interface every tower implements (attributes set by the subclass)."""

    image_size: int
    hidden_size: int
    n_tokens: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    feature_layer: int
    select_feature: str
    has_class_token: bool

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, n_tokens, hidden_size)
        raise NotImplementedError

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, hidden_size)
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What, besides the weights, decides the features (part of the tower's identity)."""
        raise NotImplementedError

    def preprocess(self, images: list, pad: bool = True) -> torch.Tensor:
        """PIL images or encoded bytes -> normalised pixels for this tower (see :func:`preprocess_images`)."""
        return preprocess_images(images, self.image_size, self.image_mean, self.image_std, pad=pad)

    def transform(self, image) -> torch.Tensor:
        """One image -> ``(3, S, S)`` pixels: the ``transform`` for ``tokenization.images.ImageTokenDataset``."""
        return self.preprocess([image])[0]


def preprocess_images(images: list, size: int, mean: tuple, std: tuple, pad: bool = True) -> torch.Tensor:
    """Decode (bytes or PIL), convert to RGB, pad to a square with the mean colour (LLaVA's ``pad``; no crop loses
    the image's edges), resize to ``size`` x ``size`` (bicubic) and normalise: a ``(N, 3, size, size)`` float tensor."""
    from PIL import Image

    out = torch.empty(len(images), 3, size, size)
    mean_t, std_t = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    for i, image in enumerate(images):
        try:
            if isinstance(image, (bytes, bytearray, memoryview)):
                image = Image.open(io.BytesIO(bytes(image)))
            image = image.convert("RGB")
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise ValueError(f"image {i} of {len(images)} cannot be decoded: {exc}") from None
        if pad and image.width != image.height:
            side = max(image.size)
            square = Image.new("RGB", (side, side), tuple(int(round(m * 255)) for m in mean))
            square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = square
        image = image.resize((size, size), Image.Resampling.BICUBIC)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
        out[i] = (pixels.permute(2, 0, 1).float() / 255.0 - mean_t) / std_t
    return out


def _select(hidden: torch.Tensor, tower: VisionTower) -> torch.Tensor:
    if tower.select_feature == "patch" and tower.has_class_token:
        return hidden[:, 1:]
    return hidden


def _check_select(select_feature: str) -> None:
    if select_feature not in SELECT_FEATURES:
        raise ValueError(f"select_feature must be one of {', '.join(SELECT_FEATURES)}, got {select_feature!r}")


# ---- the small ViT (CLIPVisionModel's layout) ----------------------------------------------------------------


@dataclass
class ViTConfig:
    """Hyper-parameters; the architecture fields are named as in transformers' ``CLIPVisionConfig``."""

    image_size: int = 64
    patch_size: int = 8
    num_channels: int = 3
    hidden_size: int = 192
    intermediate_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # "quick_gelu" (CLIP) or "gelu"
    initializer_range: float = 0.02
    feature_layer: int = -2  # hidden state the VLM reads: 0 is the embeddings, -1 the last layer
    select_feature: str = "patch"  # "patch": drop the class token (LLaVA); "cls_patch": keep it
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {', '.join(ACTIVATIONS)}, got {self.hidden_act!r}")
        _check_select(self.select_feature)
        if not -self.num_hidden_layers - 1 <= self.feature_layer <= self.num_hidden_layers:
            raise ValueError(f"feature_layer {self.feature_layer} is outside the {self.num_hidden_layers} layers")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def feature_depth(self) -> int:
        """Encoder layers the features need (the hidden state ``feature_layer`` counts the embeddings as 0)."""
        n = self.num_hidden_layers
        return self.feature_layer if self.feature_layer >= 0 else n + 1 + self.feature_layer

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "vision config") -> ViTConfig:
        """Build from a recipe's fields; an unknown (misspelt) or invalid field is a :class:`ConfigError`."""
        check_keys(d, [f.name for f in fields(cls)], where)
        try:
            return cls(**d)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def to_hf(self) -> dict[str, Any]:
        """The transformers ``CLIPVisionConfig`` dict of this architecture."""
        keys = ("image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "layer_norm_eps", "hidden_act", "initializer_range")
        return {"model_type": "clip_vision_model", **{k: getattr(self, k) for k in keys}, "attention_dropout": 0.0,
                "projection_dim": self.hidden_size}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class ViTAttention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.n_head = cfg.num_attention_heads
        h = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(h, h) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = (p(x).view(b, t, self.n_head, h // self.n_head).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # bidirectional, scale 1/sqrt(head_dim)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, h))


class ViTMLP(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTLayer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.self_attn = ViTAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = ViTMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([ViTLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class ViT(VisionTower):
    """A CLIP-style vision transformer, parameter for parameter transformers' ``CLIPVisionModel``."""

    has_class_token = True

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = ViTEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # transformers' spelling
        self.encoder = ViTEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.image_size, self.hidden_size = cfg.image_size, cfg.hidden_size
        self.image_mean, self.image_std = cfg.image_mean, cfg.image_std
        self.feature_layer, self.select_feature = cfg.feature_layer, cfg.select_feature
        self.n_tokens = cfg.num_patches + (cfg.select_feature == "cls_patch")
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """N(0, initializer_range) for the linear, conv and position weights, N(0, 1/sqrt(hidden)) for the class
        token, zero biases, unit layer norms."""
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        self.embeddings.class_embedding.normal_(0.0, self.cfg.hidden_size**-0.5, generator=generator)

    def _check(self, pixels: torch.Tensor) -> None:
        s = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (self.cfg.num_channels, s, s):
            raise ValueError(f"expected pixels (B, {self.cfg.num_channels}, {s}, {s}), got {tuple(pixels.shape)}")

    def hidden_states(self, pixels: torch.Tensor, depth: int) -> torch.Tensor:
        """The hidden state after the first ``depth`` encoder layers (0: the pre-layernormed embeddings)."""
        self._check(pixels)
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers[:depth]:
            x = layer(x)
        return x

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return _select(self.hidden_states(pixels, self.cfg.feature_depth), self)

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.hidden_states(pixels, self.cfg.num_hidden_layers)[:, 0])

    def describe(self) -> dict[str, Any]:
        return {"kind": "vit", **self.cfg.to_dict()}


def save_vit(tower: ViT, path: str | Path) -> Path:
    """Write the ViT as a transformers ``CLIPVisionModel`` directory (``config.json``, ``model.safetensors``,
    ``preprocessor_config.json``) plus ``phi3data_vision.json`` with its full config. Files are written atomically."""
    from safetensors.torch import save_file

    from phi3data.io.writers import commit, tmp_path_for, write_text_atomic

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = tower.cfg
    tmp = tmp_path_for(path / "model.safetensors")
    save_file({k: v.detach().contiguous() for k, v in tower.state_dict().items()}, str(tmp),
              metadata={"format": "pt"})
    commit(tmp, path / "model.safetensors")
    hf = {"architectures": ["CLIPVisionModel"], **cfg.to_hf(), "torch_dtype": "float32"}
    write_text_atomic(path / "config.json", json.dumps(hf, indent=2))
    write_text_atomic(path / "preprocessor_config.json", json.dumps(
        clip_preprocessor_config(cfg.image_size, cfg.image_mean, cfg.image_std), indent=2))
    write_text_atomic(path / VIT_FILE, json.dumps(cfg.to_dict(), indent=2))  # last: marks the directory complete
    return path


def clip_preprocessor_config(s: int, mean: tuple, std: tuple) -> dict[str, Any]:
    """A ``CLIPImageProcessor`` config for a tower's image size and normalisation (for transformers users)."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": s},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": s, "width": s}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean), "image_std": list(std),
            "do_convert_rgb": True}


def load_vit(path: str | Path) -> ViT:
    """Read a directory written by :func:`save_vit`."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = ViTConfig.from_dict(json.loads((path / VIT_FILE).read_text()), where=str(path / VIT_FILE))
    tower = ViT(cfg)
    tower.load_state_dict(load_file(str(path / "model.safetensors")))
    return tower


# ---- CLIP / SigLIP towers from transformers ----------------------------------------------------------------


class HFVisionTower(VisionTower):
    """A transformers ``CLIPVisionModel`` or ``SiglipVisionModel`` read from a local directory.

    Features are ``hidden_states[feature_layer]`` (LLaVA's -2); CLIP's class token is dropped for ``"patch"``.
    SigLIP has no class token, so both selections keep every patch.
    """

    def __init__(self, model: nn.Module, kind: str, feature_layer: int, select_feature: str,
                 image_mean: tuple, image_std: tuple, source: str) -> None:
        super().__init__()
        _check_select(select_feature)
        self.model, self.kind, self.source = model, kind, source
        vc = model.config
        n_layers = vc.num_hidden_layers
        if not -n_layers - 1 <= feature_layer <= n_layers:
            raise ValueError(f"feature_layer {feature_layer} is outside the tower's {n_layers} layers")
        self.image_size, self.hidden_size = int(vc.image_size), int(vc.hidden_size)
        self.feature_layer, self.select_feature = feature_layer, select_feature
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.has_class_token = kind == "clip"
        patches = (self.image_size // int(vc.patch_size)) ** 2
        self.n_tokens = patches + (self.has_class_token and select_feature == "cls_patch")

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels.to(next(self.model.parameters()).dtype), output_hidden_states=True)
        return _select(out.hidden_states[self.feature_layer], self)

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels.to(next(self.model.parameters()).dtype)).pooler_output

    def describe(self) -> dict[str, Any]:
        config = {k: v for k, v in self.model.config.to_dict().items()
                  if k not in ("_name_or_path", "transformers_version", "architectures")}  # not where it was read
        return {"kind": self.kind, "config": config, "feature_layer": self.feature_layer,
                "select_feature": self.select_feature, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std)}


def load_vision_tower(path: str | Path, feature_layer: int | None = None, select_feature: str | None = None,
                      dtype: torch.dtype | None = None) -> VisionTower:
    """A tower from a local directory: one written by :func:`save_vit` (read as our :class:`ViT`), or a CLIP /
    SigLIP checkpoint (vision-only or full model) read through transformers, never from the hub.

    ``feature_layer`` / ``select_feature`` override the saved ones (transformers towers default to LLaVA's -2 and
    ``"patch"``)."""
    path = Path(path)
    if not (path / "config.json").exists() and not (path / VIT_FILE).exists():
        raise FileNotFoundError(f"{path}: no config.json (not a vision tower directory)")
    if (path / VIT_FILE).exists():
        tower = load_vit(path)
        if feature_layer is not None or select_feature is not None:
            d = tower.cfg.to_dict()
            d["feature_layer"] = tower.cfg.feature_layer if feature_layer is None else feature_layer
            d["select_feature"] = select_feature or tower.cfg.select_feature
            state = tower.state_dict()
            tower = ViT(ViTConfig(**d))
            tower.load_state_dict(state)
        return tower.to(dtype) if dtype is not None else tower
    model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
    if model_type.startswith("clip"):
        from transformers import CLIPVisionModel as cls

        kind, mean, std = "clip", CLIP_MEAN, CLIP_STD
    elif model_type.startswith("siglip"):
        from transformers import SiglipVisionModel as cls

        kind, mean, std = "siglip", SIGLIP_MEAN, SIGLIP_STD
    else:
        raise ValueError(f"{path}: model_type {model_type!r} is not a CLIP or SigLIP vision model")
    processor = path / "preprocessor_config.json"
    if processor.exists():
        p = json.loads(processor.read_text())
        mean, std = p.get("image_mean", mean), p.get("image_std", std)
    kw = {"dtype": dtype} if dtype is not None else {}
    model = cls.from_pretrained(str(path), local_files_only=True, **kw).eval()
    return HFVisionTower(model, kind, -2 if feature_layer is None else feature_layer, select_feature or "patch",
                         mean, std, str(path))


def tower_identity(tower: VisionTower) -> str:
    """A sha256 of the tower's description and weights: equal identities, equal features for equal pixels.
    Computed once per tower object (a tower whose features are cached is frozen)."""
    cached = getattr(tower, "_identity", None)
    if cached is not None:
        return cached
    digest = hashlib.sha256(json.dumps(tower.describe(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    tower._identity = digest.hexdigest()
    return tower._identity
