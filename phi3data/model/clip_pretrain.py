"""Contrastive (CLIP) pretraining of a vision tower against a frozen sentence encoder.

No pretrained CLIP weights install offline, so the small in-repo ViT learns its features here: image embeddings
(the tower's pooled output through ``visual_projection``) are pulled towards the embeddings of their captions and
away from the batch's other captions by the symmetric InfoNCE loss with a learnable temperature. The text side is
the packaged all-MiniLM-L6-v2 sentence encoder, frozen (captions are encoded once), with a trainable linear
``text_projection``. Captions that are equal are all positives of each other's images (soft targets), so repeated
captions are not pushed apart. The same code fine-tunes any tower with a ``pooled`` output (CLIP / SigLIP ones
loaded from a local directory too).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from phi3data.model.vision import VisionTower

TEXT_DIM = 384  # all-MiniLM-L6-v2
HEADS_FILE = "contrastive_heads.safetensors"
RUN_FILE = "contrastive.json"


@dataclass
class ContrastiveConfig:
    steps: int = 500
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 20  # linear warm-up, then cosine decay to 0
    embed_dim: int = 128  # the shared image-text space (CLIP's projection_dim)
    init_temperature: float = 0.07  # CLIP's; logit scale = 1 / temperature, learned
    max_logit_scale: float = 100.0
    seed: int = 0
    text_backend: str = "onnx"  # MiniLM backend: onnx (float32), onnx-int8 or torch


class ContrastiveModel(nn.Module):
    """Tower + ``visual_projection`` on the image side, ``text_projection`` on frozen sentence embeddings."""

    def __init__(self, tower: VisionTower, embed_dim: int = 128, init_temperature: float = 0.07) -> None:
        super().__init__()
        self.vision_tower = tower
        self.visual_projection = nn.Linear(tower.hidden_size, embed_dim, bias=False)
        self.text_projection = nn.Linear(TEXT_DIM, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        for head in (self.visual_projection, self.text_projection):
            nn.init.normal_(head.weight, std=head.in_features**-0.5)

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual_projection(self.vision_tower.pooled(pixels)), dim=-1)

    def text_embeddings(self, text_vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(text_vectors), dim=-1)

    def forward(self, pixels: torch.Tensor, text_vectors: torch.Tensor, groups: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The CLIP loss of a batch of aligned (image, caption) pairs."""
        return clip_loss(self.image_embeddings(pixels), self.text_embeddings(text_vectors), self.logit_scale.exp(),
                         groups)

    @torch.no_grad()
    def similarity(self, pixels: torch.Tensor, text_vectors: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each image with its own caption (a per-pair image-text score)."""
        return (self.image_embeddings(pixels) * self.text_embeddings(text_vectors)).sum(-1)


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
              groups: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over normalised embeddings: image->text and text->image cross-entropy, averaged. ``groups``
    (B,) marks pairs with equal captions; a row's target is then spread evenly over its group."""
    logits = logit_scale * image @ text.t()
    if groups is None:
        targets = torch.arange(len(image), device=image.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    same = (groups[:, None] == groups[None, :]).float()
    targets = same / same.sum(1, keepdim=True)  # symmetric, so the same targets serve both directions
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def encode_captions(captions: list[str], backend: str = "onnx") -> torch.Tensor:
    """Frozen MiniLM sentence embeddings ``(N, 384)`` of the captions (the packaged model, no download)."""
    from phi3data.classifiers.embedding_classifier import MiniLMEncoder

    unique = list(dict.fromkeys(captions))  # captions repeat (one per image of a class): encode each once
    vectors = torch.from_numpy(MiniLMEncoder(backend=backend).encode(unique))
    return vectors[caption_groups(captions)]


def caption_groups(captions: list[str]) -> torch.Tensor:
    """One integer per caption, equal for equal captions (in order of first appearance)."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(c, len(ids)) for c in captions])


@torch.no_grad()
def retrieval_accuracy(model: ContrastiveModel, pixels: torch.Tensor, text_vectors: torch.Tensor,
                       captions: list[str]) -> float:
    """Image->text top-1 accuracy among the given pairs: an image's nearest caption must be its own (or one equal
    to it)."""
    was_training = model.training
    model.eval()
    scores = model.image_embeddings(pixels) @ model.text_embeddings(text_vectors).t()
    model.train(was_training)
    best = scores.argmax(1).tolist()
    return sum(captions[j] == captions[i] for i, j in enumerate(best)) / max(len(captions), 1)


@torch.no_grad()
def contrastive_loss(model: ContrastiveModel, pixels: torch.Tensor, text_vectors: torch.Tensor,
                     captions: list[str]) -> float:
    """The CLIP loss over all the given pairs at once (evaluation)."""
    was_training = model.training
    model.eval()
    loss = model(pixels, text_vectors, caption_groups(captions))
    model.train(was_training)
    return float(loss)


def _lr_at(cfg: ContrastiveConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class ContrastiveRun:
    model: ContrastiveModel
    losses: list[float] = field(default_factory=list)  # training loss per step


def train_contrastive(tower: VisionTower, pixels: torch.Tensor, captions: list[str],
                      cfg: ContrastiveConfig | None = None, text_vectors: torch.Tensor | None = None,
                      out_dir: str | Path | None = None) -> ContrastiveRun:
    """Train the tower (and both projections) for ``cfg.steps`` steps on aligned ``pixels`` (N, 3, S, S) and
    ``captions``; with ``out_dir``, save the tower and the heads there. Deterministic for a seed: batches are
    drawn from seeded per-epoch permutations."""
    cfg = cfg or ContrastiveConfig()
    if len(pixels) != len(captions):
        raise ValueError(f"{len(pixels)} images but {len(captions)} captions")
    if len(captions) < 2:
        raise ValueError("contrastive training needs at least two image-caption pairs")
    if text_vectors is None:
        text_vectors = encode_captions(captions, cfg.text_backend)
    groups = caption_groups(captions)
    torch.manual_seed(cfg.seed)
    model = ContrastiveModel(tower, cfg.embed_dim, cfg.init_temperature).train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(cfg.seed)
    batch = min(cfg.batch_size, len(captions))
    order, cursor = torch.randperm(len(captions), generator=generator), 0
    run = ContrastiveRun(model)
    for step in range(cfg.steps):
        if cursor + batch > len(order):  # drop the ragged tail of an epoch, start the next permutation
            order, cursor = torch.randperm(len(captions), generator=generator), 0
        rows = order[cursor:cursor + batch]
        cursor += batch
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(cfg, step)
        loss = model(pixels[rows], text_vectors[rows], groups[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(cfg.max_logit_scale))
        run.losses.append(float(loss.detach()))
    model.eval()
    if out_dir is not None:
        save_contrastive(run, cfg, out_dir)
    return run


def save_contrastive(run: ContrastiveRun, cfg: ContrastiveConfig, out_dir: str | Path,
                     extra: dict[str, Any] | None = None) -> Path:
    """The tower (a ViT as a CLIPVisionModel directory, a transformers tower by ``save_pretrained``), the heads and
    the run's config, losses and ``extra``; each file written atomically, the run record last."""
    from safetensors.torch import save_file

    from phi3data.io.writers import commit, tmp_path_for, write_text_atomic
    from phi3data.model.vision import HFVisionTower, ViT, save_vit

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = run.model
    tower = model.vision_tower
    if isinstance(tower, ViT):
        save_vit(tower, out)
    elif isinstance(tower, HFVisionTower):
        tower.model.save_pretrained(out)
    else:
        raise TypeError(f"cannot save a {type(tower).__name__} tower")
    heads = {"visual_projection.weight": model.visual_projection.weight, "logit_scale": model.logit_scale,
             "text_projection.weight": model.text_projection.weight}
    tmp = tmp_path_for(out / HEADS_FILE)
    save_file({k: v.detach().contiguous() for k, v in heads.items()}, str(tmp))
    commit(tmp, out / HEADS_FILE)
    record: dict[str, Any] = {"config": asdict(cfg), **(extra or {}), "losses": run.losses}
    write_text_atomic(out / RUN_FILE, json.dumps(record, indent=2))
    return out


def load_contrastive(path: str | Path) -> ContrastiveModel:
    """A saved tower with its heads (to score image-text pairs or continue training)."""
    from safetensors.torch import load_file

    from phi3data.model.vision import load_vision_tower

    path = Path(path)
    heads = load_file(str(path / HEADS_FILE))
    model = ContrastiveModel(load_vision_tower(path), heads["visual_projection.weight"].shape[0])
    model.load_state_dict({f"vision_tower.{k}": v for k, v in model.vision_tower.state_dict().items()} | heads)
    return model.eval()


class ContrastiveScorer:
    """A tower saved by :func:`train_contrastive` as an image-text scorer: ``embed_images`` / ``embed_texts`` return
    L2-normalised float32 rows in the shared space (the scorer protocol of the ``image_text_similarity`` stage)."""

    def __init__(self, path: str | Path, backend: str = "onnx", device: str = "cpu") -> None:
        from phi3data.classifiers.embedding_classifier import MiniLMEncoder

        self.model = load_contrastive(path).to(device)
        self.device = device
        self.encoder = MiniLMEncoder(backend=backend)

    @torch.no_grad()
    def embed_images(self, images: list) -> Any:
        pixels = self.model.vision_tower.preprocess(images).to(self.device)
        return self.model.image_embeddings(pixels).float().cpu().numpy()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> Any:
        vectors = torch.from_numpy(self.encoder.encode(list(texts))).to(self.device)
        return self.model.text_embeddings(vectors).float().cpu().numpy()


def pair_images_and_captions(sources: list[str | Path]) -> tuple[list[bytes], list[str]]:
    """The image bytes and captions of image-text pair parquet (files or directories), in file order; pairs
    without an image or a caption are skipped."""
    from phi3data.multimodal.readers import read_record_sources

    images, captions = [], []
    for path, tables in read_record_sources(sources, "image-text pairs"):
        for table in tables:
            if "text" not in table.column_names or "image" not in table.column_names:
                raise ValueError(f"{path}: not image-text pairs (no image and text columns)")
            for image, text in zip(table.column("image").to_pylist(), table.column("text").to_pylist(), strict=True):
                if image and text:
                    images.append(image)
                    captions.append(text)
    return images, captions


def pretrain_tower_on_pairs(sources: list[str | Path], out_dir: str | Path, vit: dict[str, Any],
                            cfg: ContrastiveConfig) -> Path:
    """Train a new small ViT (``vit``: ViTConfig fields) contrastively on the pairs of ``sources`` and save it to
    ``out_dir``, a tower directory for ``[vision] tower``. A finished run with the same settings is kept; one with
    other settings is refused."""
    from phi3data.model.vision import ViT, ViTConfig

    out = Path(out_dir)
    settings = {"config": asdict(cfg), "vit": vit, "sources": [str(Path(s).resolve()) for s in sources]}
    if (out / RUN_FILE).exists():
        done = json.loads((out / RUN_FILE).read_text())
        if {k: done.get(k) for k in settings} == settings:
            return out
        raise ValueError(f"{out} holds a tower trained with other settings; choose a new output directory")
    images, captions = pair_images_and_captions(sources)
    torch.manual_seed(cfg.seed)
    tower = ViT(ViTConfig.from_dict(vit, "vit"))
    pixels = tower.preprocess(images)
    distinct = sorted(set(captions))  # encode each caption once (easy-VQA has 24 for 4,000 images)
    index = {c: i for i, c in enumerate(distinct)}
    vectors = encode_captions(distinct, cfg.text_backend)[[index[c] for c in captions]]
    run = train_contrastive(tower, pixels, captions, cfg, text_vectors=vectors)
    save_contrastive(run, cfg, out, extra={"vit": vit, "sources": settings["sources"], "pairs": len(captions)})
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m phi3data.model.clip_pretrain PAIRS... --out DIR [--vit-from TOML] [--steps N] [--seed N]``."""
    import argparse
    import tomllib

    parser = argparse.ArgumentParser(prog="python -m phi3data.model.clip_pretrain",
                                     description="Pretrain a small ViT contrastively (CLIP loss against the frozen "
                                                 "MiniLM) on image-text pair parquet; the output directory is a "
                                                 "[vision] tower.")
    parser.add_argument("pairs", nargs="+", help="pair parquet files or directories, e.g. out/easy-vqa/pairs")
    parser.add_argument("--out", required=True, help="the tower directory to write")
    parser.add_argument("--vit-from", help="a training or ladder TOML whose [vision.vit] table sets the ViT "
                                           "(default: ViTConfig's defaults)")
    parser.add_argument("--steps", type=int, default=ContrastiveConfig.steps)
    parser.add_argument("--batch-size", type=int, default=ContrastiveConfig.batch_size)
    parser.add_argument("--lr", type=float, default=ContrastiveConfig.lr)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    vit = {}
    if args.vit_from:
        vit = tomllib.loads(Path(args.vit_from).read_text()).get("vision", {}).get("vit", {})
    cfg = ContrastiveConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    out = pretrain_tower_on_pairs(args.pairs, args.out, vit, cfg)
    run = json.loads((out / RUN_FILE).read_text())
    print(f"tower: {out} ({run.get('pairs', '?')} pairs, {cfg.steps} steps, CLIP loss {run['losses'][0]:.3f} -> "
          f"{run['losses'][-1]:.3f})")


if __name__ == "__main__":
    main()
