"""A LLaVA-style vision-language model: vision tower + projector + the built-in phi-3 decoder.

Text reaches the model as ``input_ids`` in which every image already stands as ``n_tokens`` copies of a
placeholder id (the image loader expands phi-3's one placeholder per image). The tower's features for the batch's
images, projected to the decoder's width, replace the token embeddings at those positions, in order: the first
image of the first sample fills the first ``n_tokens`` placeholder positions, and so on.

LLaVA trains in two stages with the tower frozen in both: stage 1 ("pretrain") trains the projector alone at
lr 1e-3 on caption pairs, stage 2 ("finetune") the projector and the language model at 2e-5 on conversations.
:func:`configure_stage` freezes the rest and returns per-module parameter groups; :class:`ImageFeatureCache` keeps
the frozen tower's features on disk so each image is encoded once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from phi3data.model.model import Phi3
from phi3data.model.vision import VisionTower, tower_identity

PROJECTORS = ("linear", "mlp2x_gelu")
MODULES = ("vision_tower", "projector", "language_model")
DEFAULT_IMAGE_TOKEN_ID = 32002  # phi-3's unused <|placeholder1|>; any id below vocab_size works
# LLaVA-1.5 / LLaVA-Phi learning rates per stage; a module missing from a stage is frozen
LLAVA_STAGES: dict[str, dict[str, float]] = {
    "pretrain": {"projector": 1e-3},
    "finetune": {"projector": 2e-5, "language_model": 2e-5},
}


class Projector(nn.Module):
    """Vision features -> decoder embeddings. ``linear``: one layer; ``mlp2x_gelu``: linear, GELU, linear (LLaVA-1.5).
    Layer names follow transformers' ``LlavaMultiModalProjector``."""

    def __init__(self, kind: str, vision_hidden: int, text_hidden: int) -> None:
        super().__init__()
        if kind not in PROJECTORS:
            raise ValueError(f"projector must be one of {', '.join(PROJECTORS)}, got {kind!r}")
        self.kind = kind
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)
        self.linear_2 = nn.Linear(text_hidden, text_hidden) if kind == "mlp2x_gelu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        return x if self.linear_2 is None else self.linear_2(F.gelu(x))


class VLM(nn.Module):
    """``forward(idx, pixels, targets)`` returns what :class:`Phi3` returns: ``(logits, None)`` or ``(None, loss)``."""

    def __init__(self, vision_tower: VisionTower, language_model: Phi3, projector: str = "mlp2x_gelu",
                 image_token_id: int = DEFAULT_IMAGE_TOKEN_ID) -> None:
        super().__init__()
        if not 0 <= image_token_id < language_model.cfg.vocab_size:
            raise ValueError(f"image_token_id {image_token_id} is outside the vocabulary "
                             f"(0..{language_model.cfg.vocab_size - 1})")
        self.vision_tower = vision_tower
        self.projector = Projector(projector, vision_tower.hidden_size, language_model.cfg.hidden_size)
        self.language_model = language_model
        self.image_token_id = image_token_id

    @property
    def n_tokens(self) -> int:
        """Placeholder positions per image."""
        return self.vision_tower.n_tokens

    def vision_features(self, pixels: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Tower features ``(N, n_tokens, d_vision)`` of the images (a ``(N, 3, S, S)`` tensor, or a list of
        ``(3, S, S)`` images or ``(n, 3, S, S)`` per-sample tensors), with gradients only when some tower parameter
        trains."""
        if not isinstance(pixels, torch.Tensor):
            pixels = [p if p.ndim == 4 else p[None] for p in pixels]
            if not pixels:
                return torch.zeros(0, self.n_tokens, self.vision_tower.hidden_size,
                                   device=next(self.vision_tower.parameters()).device)
            pixels = torch.cat(pixels)
        trains = any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
            return self.vision_tower(pixels)

    def embed(self, idx: torch.Tensor, features: torch.Tensor, image_mask: torch.Tensor | None = None
              ) -> torch.Tensor:
        """Token embeddings with the projected image ``features`` scattered into the image positions."""
        mask = idx == self.image_token_id if image_mask is None else image_mask.bool()
        n_images, n_tokens = features.shape[0], features.shape[1]
        positions = int(mask.sum())
        if positions != n_images * n_tokens:
            raise ValueError(f"the batch has {positions} image positions but {n_images} images x {n_tokens} tokens "
                             f"= {n_images * n_tokens}: expand each image placeholder to {n_tokens} tokens")
        x = self.language_model.model.embed_tokens(idx)
        if n_images == 0:
            return x
        projected = self.projector(features.to(self.projector.linear_1.weight.dtype)).to(x.dtype)
        return x.masked_scatter(mask[..., None], projected)

    def forward(
        self, idx: torch.Tensor, pixels: torch.Tensor | Sequence[torch.Tensor] | None = None,
        targets: torch.Tensor | None = None, *, image_mask: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None, ignore_index: int = -100, documents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``idx`` (B, T) with each image expanded to ``n_tokens`` placeholder ids (or any ids where ``image_mask``
        is true); ``pixels`` (N, 3, S, S) for the N images in order of appearance, or ``vision_features``
        (N, n_tokens, d_vision) from an :class:`ImageFeatureCache` instead. ``targets`` as for :class:`Phi3` (image
        positions should hold ``ignore_index``)."""
        if pixels is not None and vision_features is not None:
            raise ValueError("give pixels or vision_features, not both")
        if vision_features is None:
            if pixels is None:
                vision_features = torch.zeros(0, self.n_tokens, self.vision_tower.hidden_size, device=idx.device)
            else:
                vision_features = self.vision_features(pixels)
        x = self.embed(idx, vision_features, image_mask)
        return self.language_model(None, targets, ignore_index=ignore_index, documents=documents, inputs_embeds=x)


# ---- stages: freezing and per-module learning rates ----------------------------------------------------------


def set_trainable(vlm: VLM, modules: Iterable[str]) -> None:
    """Train exactly ``modules`` (names from :data:`MODULES`); freeze the others."""
    modules = set(modules)
    unknown = modules - set(MODULES)
    if unknown:
        raise ValueError(f"unknown modules {sorted(unknown)}: use {', '.join(MODULES)}")
    for name in MODULES:
        getattr(vlm, name).requires_grad_(name in modules)


def param_groups(vlm: VLM, lrs: dict[str, float], weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """AdamW parameter groups, two per trained module (matrices with ``weight_decay``, biases / norms / embeddings
    without), each with its module's ``lr`` and ``base_lr`` (a schedule scales ``lr`` by its factor of ``base_lr``)
    and a ``name``. Frozen parameters are left out."""
    groups = []
    for module, lr in lrs.items():
        decay, no_decay = [], []
        for name, p in getattr(vlm, module).named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
        for suffix, params, wd in (("", decay, weight_decay), (".no_decay", no_decay, 0.0)):
            if params:
                groups.append({"name": module + suffix, "params": params, "lr": lr, "base_lr": lr,
                               "weight_decay": wd})
    return groups


def configure_stage(vlm: VLM, stage: str | dict[str, float], weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Freeze all but the stage's modules and return their parameter groups. ``stage`` is a name from
    :data:`LLAVA_STAGES` or a ``{module: lr}`` dict."""
    if isinstance(stage, str):
        if stage not in LLAVA_STAGES:
            raise ValueError(f"unknown stage {stage!r}: use {', '.join(LLAVA_STAGES)} or a {{module: lr}} dict")
        stage = LLAVA_STAGES[stage]
    set_trainable(vlm, stage)
    return param_groups(vlm, stage, weight_decay)


# ---- image-feature cache -------------------------------------------------------------------------------------

_IMAGE_ID = re.compile(r"[0-9A-Za-z_-]{1,128}")


class ImageFeatureCache:
    """A frozen tower's features on disk, one safetensors file per image under ``root/<tower identity>/``.

    Keys are the image id (the sha256 of its bytes, see :mod:`phi3data.multimodal.records`) and the tower's
    identity (its description and weights), so a different tower, feature layer or selection never reads stale
    features. Files are written atomically; concurrent writers of one image write equal bytes.
    """

    def __init__(self, root: str | Path, tower: VisionTower, batch_size: int = 32) -> None:
        self.tower = tower
        self.dir = Path(root) / tower_identity(tower)[:32]
        self.batch_size = batch_size
        self.hits = self.misses = 0

    def path(self, image_id: str) -> Path:
        if not _IMAGE_ID.fullmatch(image_id):
            raise ValueError(f"image id {image_id!r} is not a content id (letters, digits, '-', '_')")
        return self.dir / image_id[:2] / f"{image_id}.safetensors"

    def features(self, image_ids: Sequence[str], images: Sequence[Any]) -> torch.Tensor:
        """Features ``(N, n_tokens, d)`` of the images, computing (and storing) only the missing ones. ``images``
        are aligned with ``image_ids``: encoded bytes, PIL images or preprocessed pixel tensors ``(3, S, S)``."""
        from safetensors.torch import load_file

        out: list[torch.Tensor | None] = [None] * len(image_ids)
        missing: dict[str, list[int]] = {}  # image id -> its positions (an image repeated in a batch is one miss)
        for i, image_id in enumerate(image_ids):
            path = self.path(image_id)
            if image_id in missing:
                missing[image_id].append(i)
            elif path.exists():
                out[i] = load_file(str(path))["features"]
                self.hits += 1
            else:
                missing[image_id] = [i]
        todo = list(missing.values())
        for start in range(0, len(todo), self.batch_size):
            rows = todo[start:start + self.batch_size]
            computed = self._compute([images[r[0]] for r in rows], [image_ids[r[0]] for r in rows])
            for positions, feats in zip(rows, computed, strict=True):
                self._store(image_ids[positions[0]], feats)
                for i in positions:
                    out[i] = feats
            self.misses += len(rows)
            self.hits += sum(len(r) - 1 for r in rows)
        if not out:
            return torch.zeros(0, self.tower.n_tokens, self.tower.hidden_size)
        return torch.stack(out)

    @torch.no_grad()
    def _compute(self, images: list[Any], image_ids: list[str]) -> torch.Tensor:
        pixels = []
        for image, image_id in zip(images, image_ids, strict=True):
            if isinstance(image, torch.Tensor):
                pixels.append(image)
                continue
            try:
                pixels.append(self.tower.transform(image))
            except ValueError as exc:
                raise ValueError(f"image {image_id}: {exc}") from None
        pixels = torch.stack(pixels)
        device = next(self.tower.parameters()).device
        return self.tower(pixels.to(device)).cpu()

    def _store(self, image_id: str, features: torch.Tensor) -> None:
        from safetensors.torch import save_file

        from phi3data.io.writers import commit, tmp_path_for

        final = self.path(image_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path_for(final)
        save_file({"features": features.contiguous()}, str(tmp))
        commit(tmp, final)
