"""LLaVA's two stages on the trainer, on real easy-VQA images: stage 1 trains the projector alone, modules keep
their own learning rates, stage 2 starts from stage 1 and its loss falls, a killed run resumes exactly, and the
blind mode drops the images and their tokens but keeps the text."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import metric_losses

from phi3data.config import ConfigError
from phi3data.multimodal import easy_vqa
from phi3data.tokenization.dataset import IGNORE_INDEX
from phi3data.tokenization.images import ImageTokenizeConfig, tokenize_images
from phi3data.training import TrainConfig, Trainer, lr_at
from phi3data.training.vlm import ImageBatches, load_vlm

ROOT = Path(__file__).resolve().parents[1]
IMAGE_TOKEN_ID = 32002  # <|placeholder1|>, what tokenize --images writes

MODEL = {"vocab_size": 32064, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
         "original_max_position_embeddings": 128}
VIT = {"image_size": 32, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
       "num_attention_heads": 2}  # 4 image tokens
TRAIN = {"seq_len": 48, "micro_batch_size": 8, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "weight_decay": 0.0,
         "eval_every": 0, "log_every": 100, "seed": 5}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """easy-VQA pairs (caption mask) and conversations (assistant mask) as image token shards."""
    root = tmp_path_factory.mktemp("easy-vqa")
    records = easy_vqa.build(root / "records", "train", limit=48)
    out = {}
    for kind, mask in (("pairs", "caption"), ("conversations", "assistant")):
        tokenize_images([records[kind]], root / kind, ImageTokenizeConfig(mask=mask), workers=1)
        out[kind] = root / kind
    return out


def config(data: Path, out_dir: Path, vision: dict, **train) -> TrainConfig:
    kw = {**TRAIN, "data_path": str(data), "out_dir": str(out_dir), "vision": vision, **train}
    if "init_from" not in kw:
        kw.setdefault("model", MODEL)
    return TrainConfig(**kw)


STAGE1 = {"tower": "small", "vit": VIT, "projector": "mlp2x_gelu", "stage": "pretrain"}


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def stage1(shards, tmp_path_factory) -> dict:
    """A short stage-1 run: the weights before and after, and the trainer."""
    out = tmp_path_factory.mktemp("stage1")
    torch.set_num_threads(1)
    trainer = Trainer(config(shards["pairs"], out, STAGE1, max_steps=6, ckpt_every=6))
    before = {m: weights(getattr(trainer.model, m)) for m in ("vision_tower", "projector", "language_model")}
    trainer.train()
    return {"out": out, "trainer": trainer, "before": before}


def test_stage1_trains_the_projector_alone(stage1) -> None:
    model, before = stage1["trainer"].model, stage1["before"]
    assert same(weights(model.vision_tower), before["vision_tower"])  # bit for bit
    assert same(weights(model.language_model), before["language_model"])
    assert not same(weights(model.projector), before["projector"])
    groups = stage1["trainer"].optimizer.param_groups
    assert {g["name"] for g in groups} == {"projector", "projector.no_decay"}
    assert all(g["base_lr"] == 1e-3 for g in groups)
    ckpt = stage1["out"] / "checkpoints" / "step_0000006"
    assert (ckpt / "phi3data_vlm.json").exists() and not (ckpt / "config.json").exists()  # not a Phi3ForCausalLM
    loaded = load_vlm(stage1["out"])
    assert same(weights(loaded), weights(model))


def test_modules_train_at_their_own_learning_rates(shards, tmp_path) -> None:
    stage = {"projector": 1e-3, "language_model": 2e-5}
    trainer = Trainer(config(shards["conversations"], tmp_path / "run", {**STAGE1, "stage": stage}, max_steps=4,
                             ckpt_every=0))
    for step in range(3):
        record = trainer.train_step()
        schedule = lr_at(trainer.cfg, step)
        for group in trainer.optimizer.param_groups:
            module = group["name"].removesuffix(".no_decay")
            assert group["lr"] == pytest.approx(stage[module] * schedule / 1e-3, rel=1e-12)
        assert record["lr/language_model"] == pytest.approx(2e-5 * schedule / 1e-3)
    assert not any(p.requires_grad for p in trainer.model.vision_tower.parameters())


def test_stage2_starts_from_stage1_and_its_loss_falls(stage1, shards, tmp_path) -> None:
    stage2 = {"stage": {"projector": 3e-3, "language_model": 3e-3}, "feature_cache": True}
    trainer = Trainer(config(shards["conversations"], tmp_path / "s2", stage2, init_from=str(stage1["out"]),
                             lr=3e-3, min_lr=3e-4, max_steps=30, ckpt_every=0))
    assert same(weights(trainer.model), weights(stage1["trainer"].model))  # tower, projector and LM of stage 1
    tower = weights(trainer.model.vision_tower)
    trainer.train()
    log = metric_losses(tmp_path / "s2" / "metrics.jsonl")
    first, last = sum(log[s] for s in (1, 2, 3)) / 3, sum(log[s] for s in (28, 29, 30)) / 3
    assert last < first - 1.0, (first, last)
    assert same(weights(trainer.model.vision_tower), tower)
    cache = trainer.feature_cache  # one image per conversation; each encoded once, then read back
    assert cache.hits + cache.misses == 30 * 8 and 0 < cache.misses <= 48 and cache.hits > 0
    with pytest.raises(ConfigError, match="tower and projector are kept"):
        Trainer(config(shards["conversations"], tmp_path / "bad", {"tower": "small"}, init_from=str(stage1["out"])))


def write_toml(path: Path, data: Path, out_dir: Path, init_from: Path, **train) -> Path:
    lines = ["[vision]", 'stage = "finetune"', "", "[data]", f'path = "{data}"', "", "[train]",
             f'init_from = "{init_from}"', f'out_dir = "{out_dir}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in {**TRAIN, **train}.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_exact_resume_after_kill_9(stage1, shards, tmp_path) -> None:
    """A stage-2 run killed with SIGKILL after a checkpoint and rerun gives the uninterrupted run's losses and
    weights."""
    steps, every = 24, 4
    full = Trainer(TrainConfig.from_toml(write_toml(tmp_path / "full.toml", shards["conversations"],
                                                    tmp_path / "full", stage1["out"], max_steps=steps,
                                                    ckpt_every=steps)))
    full.train()
    reference = metric_losses(tmp_path / "full" / "metrics.jsonl")

    cfg = write_toml(tmp_path / "killed.toml", shards["conversations"], tmp_path / "killed", stage1["out"],
                     max_steps=steps, ckpt_every=every)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen([sys.executable, "-m", "phi3data.training.trainer", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and max(metric_losses(metrics), default=0) >= every + 2:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGSTOP)  # freeze first so the step we read is the step the kill interrupts
    killed_at = max(metric_losses(metrics))
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert every + 2 <= killed_at < steps, "the run finished before it could be killed; make it longer"

    resumed = Trainer(TrainConfig.from_toml(cfg))
    assert resumed.step % every == 0 and 0 < resumed.step <= killed_at
    resumed.train()
    assert metric_losses(metrics) == reference  # bit-identical trajectory
    assert same(weights(resumed.model), weights(full.model))


def test_blind_drops_the_images_and_keeps_the_text(stage1, shards, tmp_path) -> None:
    vlm = stage1["trainer"].model
    seeing = ImageBatches(shards["conversations"], 48, vlm, seed=3)
    blind = ImageBatches(shards["conversations"], 48, vlm, seed=3, blind=True)
    a, b = seeing.batch(0, 4), blind.batch(0, 4)
    assert len(a["images"]) == 4 and b["images"] == [] and b["image_ids"] == []
    for row in range(4):
        ids = a["input_ids"][row][a["input_ids"][row] != 0]  # unpadded (0 is never a real token here)
        assert (ids == IMAGE_TOKEN_ID).sum() == vlm.n_tokens
        text = ids[ids != IMAGE_TOKEN_ID]
        assert torch.equal(b["input_ids"][row][:len(text)], text)
        assert not (b["input_ids"][row] == IMAGE_TOKEN_ID).any()
    trained = lambda batch: [t[t != IGNORE_INDEX].tolist() for t in batch["targets"]]  # noqa: E731
    assert trained(a) == trained(b)  # the same answers to learn

    trainer = Trainer(config(shards["conversations"], tmp_path / "blind", {"stage": "finetune", "blind": True},
                             init_from=str(stage1["out"]), max_steps=3, ckpt_every=0))
    projector = weights(trainer.model.projector)
    trainer.train()
    assert {g["name"].removesuffix(".no_decay") for g in trainer.optimizer.param_groups} == {"language_model"}
    assert same(weights(trainer.model.projector), projector)
    with pytest.raises(ConfigError, match="trains nothing"):
        Trainer(config(shards["pairs"], tmp_path / "b1", {**STAGE1, "blind": True}))


def test_recipes_and_vision_keys_are_checked(stage1, tmp_path) -> None:
    first = TrainConfig.from_toml(ROOT / "model" / "vlm-stage1-tiny-cpu.toml")
    assert first.vision["stage"] == {"projector": 1e-3, "language_model": 1e-3}  # its language model is random
    blind = TrainConfig.from_toml(ROOT / "model" / "vlm-stage2-tiny-cpu.toml",
                                  {"init_from": str(stage1["out"]), "vision.blind": True})
    assert blind.vision["blind"] is True
    bad = tmp_path / "bad.toml"
    bad.write_text('[vision]\ntower = "small"\nstages = "pretrain"\n')
    with pytest.raises(ConfigError, match="stages"):
        TrainConfig.from_toml(bad)


def test_token_ids_outside_the_vocabulary_are_refused(shards, tmp_path) -> None:
    small = config(shards["conversations"], tmp_path / "run", STAGE1, model={**MODEL, "vocab_size": 32005})
    with pytest.raises(ValueError, match="outside the model vocab"):  # <|end|> is 32007
        Trainer(small)


def test_a_frozen_lm_head_skips_its_gradient_but_not_the_inputs() -> None:
    """Stage 1 freezes the language model: the chunked loss then skips the head's weight gradient, and the gradient
    reaching the projector is the one a trainable head would pass back."""
    from phi3data.model.model import ChunkedLinearCrossEntropy

    torch.manual_seed(0)
    x = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 300, (40,))
    targets[::3] = IGNORE_INDEX
    grads = []
    for trainable in (True, False):
        torch.manual_seed(1)
        w = torch.randn(300, 16).requires_grad_(trainable)
        loss = ChunkedLinearCrossEntropy.apply(x, w, targets, 1.0, IGNORE_INDEX, 16)
        (gx,) = torch.autograd.grad(loss, x)
        grads.append((loss.detach(), gx))
        assert (w.grad is None) and loss.requires_grad
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    plain = torch.nn.functional.cross_entropy(x @ w.t(), targets, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(torch.autograd.grad(plain, x)[0], grads[1][1], rtol=1e-5, atol=1e-6)


def test_two_ddp_processes_match_one(stage1, shards, tmp_path) -> None:
    """Stage 2 under torchrun (2 gloo processes, half the micro-batch each) trains as one process does: the same
    samples through the shared position-indexed sampler, so the same losses and final weights up to rounding."""
    from safetensors.torch import load_file

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    steps = 4
    one = write_toml(tmp_path / "one.toml", shards["conversations"], tmp_path / "one", stage1["out"],
                     micro_batch_size=8, max_steps=steps, ckpt_every=steps, lr=3e-3)
    two = write_toml(tmp_path / "two.toml", shards["conversations"], tmp_path / "two", stage1["out"],
                     micro_batch_size=4, max_steps=steps, ckpt_every=steps, lr=3e-3)
    subprocess.run([sys.executable, "-m", "phi3data.training.trainer", str(one)], env=env, check=True,
                   capture_output=True, timeout=300)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "phi3data.training.trainer", str(two)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = metric_losses(tmp_path / "one" / "metrics.jsonl"), metric_losses(tmp_path / "two" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    final = load_file(str(tmp_path / "two" / "checkpoints" / f"step_{steps:07d}" / "model.safetensors"))
    reference = load_file(str(tmp_path / "one" / "checkpoints" / f"step_{steps:07d}" / "model.safetensors"))
    assert final.keys() == reference.keys()
    moved = 0
    for name, tensor in reference.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-4, atol=1e-4, msg=name)
        moved += not torch.equal(tensor, stage1["trainer"].model.state_dict()[name])
    assert moved > 0


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_a_transformers_tower_trains_and_reloads(shards, tmp_path, kind) -> None:
    """[vision] tower = a local CLIP / SigLIP directory: the checkpoint rebuilds the same VLM without that
    directory."""
    from test_vlm_model import saved_transformers_tower

    saved_transformers_tower(tmp_path / kind, kind)
    trainer = Trainer(config(shards["pairs"], tmp_path / "run", {"tower": str(tmp_path / kind),
                                                                 "projector": "linear"}, max_steps=2, ckpt_every=2))
    trainer.train()
    (tmp_path / kind).rename(tmp_path / "gone")  # the checkpoint alone rebuilds the tower
    loaded = load_vlm(tmp_path / "run")
    assert type(loaded.vision_tower) is type(trainer.model.vision_tower) and loaded.n_tokens == 16
    assert same(weights(loaded), weights(trainer.model))
    batch = trainer.train_data.fixed_batches(1, 4)[0]
    with torch.no_grad():
        expected = trainer.model.eval()(batch["input_ids"], batch["images"], batch["targets"])[1]
        torch.testing.assert_close(loaded(batch["input_ids"], batch["images"], batch["targets"])[1], expected)
