"""VLM training benchmark (issue 17): samples/s of LLaVA's two stages on CPU, phi3data's trainer against a plain
PyTorch loop. Prints a table; asserts nothing.

    python -m bench.vlm [--tower tiny|small] [--images 200] [--rounds 5] [--steps 5]

Both sides train the same tiny VLM (the in-repo ViT: ``tiny`` 32 px, 8 px patches -> 16 image tokens, 2 layers of
64; ``small`` the ViTConfig default, 64 px -> 64 tokens, 6 layers of 192; a 2-layer phi-3 of width 64 with
phi-3-mini's vocabulary; the mlp2x_gelu projector) on the same easy-VQA image shards, batch 16, AdamW, clipping 1.0:
stage 1 the projector alone on caption pairs, stage 2 projector + language model on question-answer
conversations. The anchor is what a user writes by hand (nanoVLM is not on PyPI): a torch DataLoader over
``ImageTokenDataset`` with ``collate_images`` and the tower's transform, ``VLM(input_ids, pixels, targets)``,
backward, clip, step (torch's default AdamW; a second anchor row uses the fused AdamW the trainer uses on CPU,
to show what the optimizer accounts for). phi3data runs ``Trainer.train_step`` (its position-indexed sampler,
per-module lrs, no checkpoints), with and without the image-feature cache (warm: every image encoded once before
timing). Rounds
alternate between the sides so machine noise hits them alike; the median round is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phi3data.model.vision import ViTConfig  # noqa: E402
from phi3data.multimodal import easy_vqa  # noqa: E402
from phi3data.tokenization.images import (  # noqa: E402
    ImageTokenDataset,
    ImageTokenizeConfig,
    collate_images,
    tokenize_images,
)
from phi3data.training import TrainConfig, Trainer  # noqa: E402

MODEL = dict(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=256)
TOWERS = {"tiny": dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4),
          "small": {}}  # ViTConfig's defaults
STAGES = {"stage 1 (projector, caption pairs)": ("pairs", "caption", "pretrain"),
          "stage 2 (projector + LM, conversations)": ("conversations", "assistant",
                                                      {"projector": 1e-3, "language_model": 1e-3})}
BATCH = 16


def make_shards(work: Path, images: int) -> dict[str, Path]:
    records = easy_vqa.build(work / "records", "train", limit=images)
    out = {}
    for kind, mask in (("pairs", "caption"), ("conversations", "assistant")):
        if not (work / kind / "manifest.json").exists():
            tokenize_images([records[kind]], work / kind, ImageTokenizeConfig(mask=mask), workers=1)
        out[kind] = work / kind
    return out


def trainer(data: Path, out: Path, stage, cache: bool, vit: dict, seq: int) -> Trainer:
    cfg = TrainConfig(model=dict(MODEL), data_path=str(data), out_dir=str(out), seq_len=seq, micro_batch_size=BATCH,
                      max_steps=10**6, lr=1e-3, min_lr=1e-4, warmup_steps=2, weight_decay=0.0, eval_every=0,
                      ckpt_every=0, log_every=10**9, resume=False, val_windows=0,
                      vision={"tower": "small", "vit": vit, "projector": "mlp2x_gelu", "stage": stage,
                              "feature_cache": cache})
    with contextlib.redirect_stdout(io.StringIO()):
        return Trainer(cfg)


def plain_loop(reference: Trainer, data: Path, seq: int, fused: bool = False):
    """The anchor: the same architecture and initial weights, trained by a hand-written loop."""
    import copy

    vlm = copy.deepcopy(reference.model)  # same weights, same frozen modules
    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=fused or None)
    dataset = ImageTokenDataset(data, vlm.n_tokens, transform=vlm.vision_tower.transform, max_tokens=seq)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True,
                                         collate_fn=collate_images, generator=torch.Generator().manual_seed(0))
    batches = iter(())

    def step() -> None:
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        pixels = batch["images"] if len(batch["images"]) else None
        _, loss = vlm(batch["input_ids"], pixels, batch["targets"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def warm_cache(t: Trainer) -> None:
    """Encode every training image once (what the first epoch of a cached run does)."""
    data = t.train_data
    for start in range(0, len(data), 64):
        batch = data.collate([int(i) for i in data.items[start:start + 64]])
        t.feature_cache.features(batch["image_ids"], batch["images"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tower", choices=sorted(TOWERS), default="tiny")
    parser.add_argument("--images", type=int, default=200, help="easy-VQA training images")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-vlm-"))
    shards = make_shards(work, args.images)
    vit = TOWERS[args.tower]
    cfg = ViTConfig(**vit)
    seq = cfg.num_patches + 48  # the image's tokens and the longest easy-VQA text
    print(f"easy-VQA, {args.images} images; VLM: ViT {cfg.image_size} px / {cfg.num_patches} tokens / "
          f"{cfg.num_hidden_layers} layers of {cfg.hidden_size}, phi-3 h={MODEL['hidden_size']} "
          f"L={MODEL['num_hidden_layers']} vocab {MODEL['vocab_size']}; batch {BATCH}; {torch.get_num_threads()} "
          f"threads; median of {args.rounds} alternating rounds of {args.steps} steps")
    print(f"{'stage':<42}{'side':<34}{'samples/s':>10}{'vs plain loop':>15}")
    for title, (kind, _, stage) in STAGES.items():
        torch.manual_seed(0)
        ours = trainer(shards[kind], work / "runs" / args.tower / kind / "plain", stage, False, vit, seq)
        cached = trainer(shards[kind], work / "runs" / args.tower / kind / "cached", stage, True, vit, seq)
        warm_cache(cached)
        sides = {"plain PyTorch loop": plain_loop(ours, shards[kind], seq),
                 "plain loop + fused AdamW": plain_loop(ours, shards[kind], seq, fused=True),
                 "phi3data trainer": ours.train_step, "phi3data trainer + feature cache": cached.train_step}
        for step in sides.values():
            for _ in range(args.warmup):
                step()
        rounds: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, step in sides.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                rounds[name].append(args.steps * BATCH / (time.perf_counter() - t0))
        base = float(np.median(rounds["plain PyTorch loop"]))
        for name, values in rounds.items():
            rate = float(np.median(values))
            print(f"{title:<42}{name:<34}{rate:>10.1f}{rate / base:>14.2f}x")


if __name__ == "__main__":
    main()
