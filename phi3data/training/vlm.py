"""Vision-language training for the trainer: the ``[vision]`` table, the VLM it builds, its data and checkpoints.

A training config with a ``[vision]`` table trains a :class:`~phi3data.model.vlm.VLM` (LLaVA's two stages) on image
token shards (``phi3data tokenize --images``) instead of a text model::

    [vision]
    tower = "small"            # "small": the in-repo ViT ([vision.vit] fields); or a directory: a save_vit /
                               # clip_pretrain output, or a CLIP / SigLIP checkpoint (transformers)
    projector = "mlp2x_gelu"   # or "linear"
    stage = "pretrain"         # "pretrain" (projector at 1e-3), "finetune" (projector + language model at 2e-5),
                               # or a table {projector = 1e-3, language_model = 2e-5} of per-module peak lrs
    image_token_id = 32002     # default: the shards' (their manifest names it)
    feature_cache = false      # true: the frozen tower's features under OUT_DIR/feature_cache; or a directory
    blind = false              # true: images removed (their placeholder tokens dropped, the text kept)

The language model comes from ``train.init_from`` (a text run or checkpoint, or a Hugging Face phi3 directory) or
a ``model`` recipe; stage 2 starts from stage 1's VLM checkpoint (``init_from`` = the stage-1 run), whose tower and
projector it keeps (then leave ``tower`` and ``projector`` out). The schedule scales every module's lr: at step s
a module trains at ``its_lr * schedule(s) / train.lr`` (``train.min_lr / train.lr`` is the floor's fraction).

A VLM checkpoint is a trainer checkpoint whose ``model.safetensors`` holds the whole VLM (``vision_tower.*``,
``projector.*``, ``language_model.*``; a tied ``lm_head`` is left out), ``phi3data_config.json`` the language
model's config and ``phi3data_vlm.json`` the tower and projector; :func:`load_vlm` reads it back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import TypeAdapter, ValidationError

from phi3data.config import ConfigError, check_keys, format_validation_error
from phi3data.model.model import Phi3
from phi3data.model.vision import HFVisionTower, VisionTower, ViT, ViTConfig, load_vision_tower
from phi3data.model.vlm import LLAVA_STAGES, MODULES, PROJECTORS, VLM, ImageFeatureCache
from phi3data.tokenization.dataset import IGNORE_INDEX, epoch_permutation, hold_out

VLM_FILE = "phi3data_vlm.json"


@dataclass
class VisionSettings:
    """The ``[vision]`` table of a training config."""

    tower: str | None = None
    """``small``, or a tower directory; None only when ``init_from`` is a VLM checkpoint (its tower is kept)."""
    vit: dict[str, Any] = field(default_factory=dict)
    """``small``: :class:`~phi3data.model.vision.ViTConfig` fields (the default is a 64 px, 6-layer ViT)."""
    projector: str | None = None
    """``linear`` or ``mlp2x_gelu`` (default); None with a VLM ``init_from`` (its projector is kept)."""
    stage: str | dict[str, float] = "pretrain"
    image_token_id: int | None = None
    feature_cache: bool | str = False
    blind: bool = False
    feature_layer: int | None = None
    """A tower directory's feature layer (default: its own, LLaVA's -2 for CLIP / SigLIP)."""
    select_feature: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "[vision]") -> VisionSettings:
        """Strictly checked: an unknown key, a bad stage or projector is a :class:`ConfigError`."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where} must be a table")
        check_keys(d, [f.name for f in fields(cls)], where)
        try:
            s = _SETTINGS.validate_python(d)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, where, "vision.")) from None
        if s.projector is not None and s.projector not in PROJECTORS:
            raise ConfigError(f"{where}.projector must be one of {', '.join(PROJECTORS)}, got {s.projector!r}")
        if isinstance(s.stage, str):
            if s.stage not in LLAVA_STAGES:
                raise ConfigError(f"{where}.stage must be one of {', '.join(LLAVA_STAGES)} or a table of "
                                  f"per-module lrs, got {s.stage!r}")
        elif not s.stage or set(s.stage) - set(MODULES) or \
                not all(isinstance(v, (int, float)) and v >= 0 for v in s.stage.values()):
            raise ConfigError(f"{where}.stage: a table of {{module: lr}} with modules from {', '.join(MODULES)} "
                              f"and lrs >= 0, got {s.stage!r}")
        if s.vit and s.tower != "small":
            raise ConfigError(f"{where}.vit configures tower = \"small\" only")
        ViTConfig.from_dict(s.vit, f"{where}.vit")
        return s

    def lrs(self) -> dict[str, float]:
        """The trained modules and their peak lrs. Blind: without the projector (no image reaches it)."""
        lrs = dict(LLAVA_STAGES[self.stage] if isinstance(self.stage, str) else self.stage)
        if self.blind:
            lrs.pop("projector", None)
        lrs = {k: float(v) for k, v in lrs.items()}
        if not lrs:
            raise ConfigError(f"[vision] stage {self.stage!r} with blind = true trains nothing (the projector sees "
                              "no image): a blind baseline trains the language model (stage = \"finetune\")")
        return lrs


_SETTINGS = TypeAdapter(VisionSettings)


def is_vlm_checkpoint(path: Path | None) -> bool:
    return path is not None and (Path(path) / VLM_FILE).exists()


# ---- building and saving the model ---------------------------------------------------------------------------


def _tower_spec(tower: VisionTower) -> dict[str, Any]:
    if isinstance(tower, ViT):
        return {"kind": "vit", "config": tower.cfg.to_dict()}
    if isinstance(tower, HFVisionTower):
        config = {k: v for k, v in tower.model.config.to_dict().items()
                  if k not in ("_name_or_path", "transformers_version", "architectures")}
        return {"kind": tower.kind, "config": config, "feature_layer": tower.feature_layer,
                "select_feature": tower.select_feature, "image_mean": list(tower.image_mean),
                "image_std": list(tower.image_std)}
    raise TypeError(f"cannot checkpoint a {type(tower).__name__} vision tower")


def _tower_from_spec(spec: dict[str, Any], where: str) -> VisionTower:
    """An untrained tower of the architecture a checkpoint describes (its weights come from the checkpoint)."""
    if spec["kind"] == "vit":
        return ViT(ViTConfig.from_dict(spec["config"], where))
    if spec["kind"] in ("clip", "siglip"):
        import transformers

        prefix = "CLIP" if spec["kind"] == "clip" else "Siglip"
        config = getattr(transformers, f"{prefix}VisionConfig")(**spec["config"])
        model = getattr(transformers, f"{prefix}VisionModel")(config).eval()
        return HFVisionTower(model, spec["kind"], spec["feature_layer"], spec["select_feature"],
                             tuple(spec["image_mean"]), tuple(spec["image_std"]), where)
    raise ValueError(f"{where}: unknown tower kind {spec['kind']!r}")


def build_tower(settings: VisionSettings) -> VisionTower:
    """The tower a stage-1 config names (``small`` is initialised from torch's current seed)."""
    if settings.tower is None:
        raise ConfigError("[vision] needs tower = \"small\" or a tower directory (or train.init_from = a VLM "
                          "checkpoint, whose tower is kept)")
    if settings.tower == "small":
        return ViT(ViTConfig.from_dict(settings.vit, "[vision].vit"))
    path = Path(settings.tower)
    if not path.is_dir():
        raise ConfigError(f"[vision] tower {settings.tower!r} is neither \"small\" nor a directory")
    return load_vision_tower(path, settings.feature_layer, settings.select_feature)


def build_vlm(settings: VisionSettings, language_model: Phi3, image_token_id: int,
              init_dir: Path | None = None) -> VLM:
    """The VLM of a config: its tower and projector from the VLM checkpoint ``init_dir`` when it is one (weights
    are loaded later), else from the settings."""
    if is_vlm_checkpoint(init_dir):
        if settings.tower is not None or settings.projector is not None:
            raise ConfigError(f"train.init_from {init_dir} is a VLM checkpoint: its tower and projector are kept, so "
                              "leave [vision] tower and projector out")
        saved = json.loads((init_dir / VLM_FILE).read_text())
        tower = _tower_from_spec(saved["tower"], str(init_dir / VLM_FILE))
        projector = saved["projector"]
        if saved["image_token_id"] != image_token_id:
            raise ConfigError(f"{init_dir} was trained with image token {saved['image_token_id']}, these shards use "
                              f"{image_token_id}")
    else:
        tower = build_tower(settings)
        projector = settings.projector or "mlp2x_gelu"
    tower.requires_grad_(False).eval()  # frozen in both LLaVA stages; configure_stage sets what trains
    return VLM(tower, language_model, projector, image_token_id)


def vlm_state_dict(vlm: VLM) -> dict[str, torch.Tensor]:
    """The VLM's weights for a checkpoint (a tied ``lm_head`` left out, as for text checkpoints)."""
    sd = vlm.state_dict()
    if vlm.language_model.cfg.tie_word_embeddings:
        sd.pop("language_model.lm_head.weight", None)
    return sd


def full_state_dict(sd: dict[str, torch.Tensor], vlm: VLM) -> dict[str, torch.Tensor]:
    """A checkpoint's weights with the tied ``lm_head`` put back."""
    if vlm.language_model.cfg.tie_word_embeddings:
        sd["language_model.lm_head.weight"] = sd["language_model.model.embed_tokens.weight"]
    return sd


def write_vlm_file(directory: Path, vlm: VLM) -> None:
    """``phi3data_vlm.json``: what besides the language model's config rebuilds the VLM."""
    info = {"tower": _tower_spec(vlm.vision_tower), "projector": vlm.projector.kind,
            "image_token_id": vlm.image_token_id, "n_tokens": vlm.n_tokens}
    (Path(directory) / VLM_FILE).write_text(json.dumps(info, indent=2))


def load_vlm(path: str | Path, device: str | torch.device = "cpu") -> VLM:
    """A trained VLM from a VLM checkpoint directory or a VLM run's ``out_dir`` (its newest checkpoint), in eval
    mode."""
    from phi3data.model.hf import load_config, read_weights, resolve_weights

    path = resolve_weights(path)
    if not is_vlm_checkpoint(path):
        raise ValueError(f"{path} is not a VLM checkpoint (no {VLM_FILE}); a text model loads with load_hf")
    saved = json.loads((path / VLM_FILE).read_text())
    vlm = VLM(_tower_from_spec(saved["tower"], str(path / VLM_FILE)), Phi3(load_config(path)), saved["projector"],
              saved["image_token_id"])
    vlm.load_state_dict(full_state_dict(read_weights(path), vlm))
    return vlm.to(device).eval()


# ---- data ----------------------------------------------------------------------------------------------------


def shards_image_token_id(path: str | Path) -> int:
    """The image token id the image shards in ``path`` were written with (their manifests name it)."""
    from phi3data.tokenization.shards import TokenShard, list_shards

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"data.path {path} does not exist")
    stems = list_shards(path) if path.is_dir() else [path]
    ids = {(TokenShard.open(stem).manifest.get("images") or {}).get("image_token_id") for stem in stems}
    if not stems or None in ids:
        raise ConfigError(f"data.path {path} holds no image shards: make them with phi3data tokenize --images")
    if len(ids) > 1:
        raise ConfigError(f"data.path {path} mixes image token ids {sorted(ids)}")
    return ids.pop()


class ImageBatches:
    """Image token shards as the trainer reads them: position ``p`` of the endless sample stream is a document
    drawn through the same seeded per-epoch permutation as text (:func:`epoch_permutation`), so a resumed run
    reads exactly what an uninterrupted one would.

    ``batch(start, size)`` collates documents ``start .. start+size-1`` (right-padded) into ``input_ids``,
    ``targets`` (the next token where the loss mask is on, else -100), ``images`` (pixels ``(N, 3, S, S)``, or
    the decoded images as PIL when a feature cache will encode them) and ``image_ids``. ``blind`` drops every
    image and its placeholder tokens; the documents and their text stay the same (documents are chosen by their
    length with images, so both modes train on the same set).
    """

    has_mask = True

    def __init__(self, path: str | Path, seq_len: int, vlm: VLM, *, seed: int = 0, blind: bool = False,
                 decode_pixels: bool = True) -> None:
        from phi3data.tokenization.images import ImageTokenDataset

        self.path = Path(path)
        transform = vlm.vision_tower.transform if decode_pixels else None
        self.data = ImageTokenDataset(self.path, vlm.n_tokens, transform=transform, max_tokens=seq_len)
        if self.data.image_token_id != vlm.image_token_id:
            raise ConfigError(f"{self.path}: the shards' image token is {self.data.image_token_id}, the model's "
                              f"{vlm.image_token_id}; set [vision] image_token_id to match")
        self.image_token_id = vlm.image_token_id
        self.seq_len, self.seed, self.blind, self.decode_pixels = seq_len, seed, blind, decode_pixels
        self.dropped_documents = self.data.dropped
        self.items = np.arange(len(self.data))
        if len(self.items) == 0:
            raise ValueError(f"{self.path}: no document fits seq_len = {seq_len} with its images expanded to "
                             f"{vlm.n_tokens} tokens")
        self._order_epoch, self._order = -1, np.arange(0)

    def __len__(self) -> int:
        return len(self.items)

    def check_vocab(self, vocab_size: int, sample: int = 65_536) -> None:
        """Refuse token ids (in the first ``sample`` of each shard) that a model with ``vocab_size`` cannot take."""
        for shard in self.data.shards:
            top = int(np.asarray(shard.tokens[:sample]).max(initial=0))
            if top >= vocab_size:
                raise ValueError(f"token id {top} in {shard.stem} is outside the model vocab ({vocab_size})")

    def index(self, position: int) -> int:
        """The document at ``position`` of the stream, epoch after epoch."""
        epoch, j = divmod(position, len(self))
        if epoch != self._order_epoch:
            self._order, self._order_epoch = epoch_permutation(self.seed, epoch, len(self)), epoch
        return int(self.items[self._order[j]])

    def sample(self, i: int) -> dict:
        s = self.data[i]
        if not self.decode_pixels:
            from PIL import Image

            s["images"] = [Image.fromarray(a) for a in s["images"]]
        if self.blind:
            keep = s["input_ids"] != self.image_token_id
            s = {**s, "input_ids": s["input_ids"][keep], "labels": s["labels"][keep], "images": [],
                 "image_ids": [], "image_starts": torch.zeros(0, dtype=torch.int64)}
        return s

    def collate(self, items: list[int]) -> dict[str, Any]:
        samples = [self.sample(i) for i in items]
        width = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.zeros(len(samples), width, dtype=torch.int64)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.int64)
        for row, s in enumerate(samples):
            input_ids[row, :len(s["input_ids"])] = s["input_ids"]
            labels[row, :len(s["labels"])] = s["labels"]
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
        images = [x for s in samples for x in s["images"]]
        if images and self.decode_pixels:
            images = torch.stack(images)
        return {"input_ids": input_ids, "targets": targets, "images": images,
                "image_ids": [x for s in samples for x in s["image_ids"]]}

    def batch(self, start: int, size: int) -> dict[str, Any]:
        return self.collate([self.index(p) for p in range(start, start + size)])

    def fixed_batches(self, n_batches: int, batch_size: int) -> list[dict[str, Any]]:
        """The first documents in order (no shuffle), for evaluation."""
        n = len(self)
        return [self.collate([int(self.items[(b * batch_size + r) % n]) for r in range(batch_size)])
                for b in range(n_batches)]

    def split(self, n_val: int) -> tuple[ImageBatches, ImageBatches]:
        """Hold out the last ``n_val`` documents for validation."""
        def narrow(part: ImageBatches, sl: slice) -> None:
            part.items = self.items[sl]

        return hold_out(self, n_val, "documents", narrow)


def vlm_forward(model: torch.nn.Module, batch: dict[str, Any], device: torch.device,
                cache: ImageFeatureCache | None = None) -> torch.Tensor:
    """The loss of a collated :class:`ImageBatches` batch (``model`` a VLM, or DDP around one)."""
    kw: dict[str, Any] = {}
    if cache is not None:
        kw["vision_features"] = cache.features(batch["image_ids"], batch["images"]).to(device)
    elif len(batch["images"]):
        kw["pixels"] = batch["images"].to(device, non_blocking=True)
    _, loss = model(batch["input_ids"].to(device, non_blocking=True), targets=batch["targets"].to(device), **kw)
    return loss


def feature_cache(settings: VisionSettings, vlm: VLM, out_dir: Path) -> ImageFeatureCache | None:
    """The run's feature cache (None when off or blind)."""
    if not settings.feature_cache or settings.blind:
        return None
    root = out_dir / "feature_cache" if settings.feature_cache is True else Path(settings.feature_cache)
    return ImageFeatureCache(root, vlm.vision_tower)
