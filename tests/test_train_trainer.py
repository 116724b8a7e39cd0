"""The trainer on real tokens: schedules, data, NaN guard, exact resume after kill -9, HF-loadable checkpoints,
loss-masked chat shards."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import metric_losses

from phi3data.tokenization.dataset import PackedDataset
from phi3data.training import TrainConfig, Trainer, TrainingDiverged, lr_at

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TEXTBOOKS = SHARED / "textbooks" / "openstax.jsonl.gz"
SP_MODEL = SHARED / "tokenizers" / "llama2" / "tokenizer.model"


def make_token_dir(out: Path, max_tokens: int = 120_000) -> Path:
    """Tokenize real OpenStax text with the Llama-2 SentencePiece model into a uint16 shard + manifest."""
    import sentencepiece as spm

    if not TEXTBOOKS.exists() or not SP_MODEL.exists():
        pytest.fail(f"missing test data: {TEXTBOOKS} / {SP_MODEL} (the ../shared/data checkout)")
    sp = spm.SentencePieceProcessor(model_file=str(SP_MODEL))
    ids: list[int] = []
    with gzip.open(TEXTBOOKS, "rt", encoding="utf-8") as f:
        for line in f:
            ids.extend(sp.encode(json.loads(line)["text"]) + [sp.eos_id()])
            if len(ids) >= max_tokens:
                break
    out.mkdir(parents=True, exist_ok=True)
    np.asarray(ids[:max_tokens], dtype="<u2").tofile(out / "openstax-00000.bin")
    (out / "manifest.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": sp.vocab_size()}))
    return out


TINY_MODEL = {
    "vocab_size": 32000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "original_max_position_embeddings": 256,
    "pad_token_id": 0,
    "eos_token_id": 2,
}


def write_config(path: Path, data_dir: Path, out_dir: Path, **train) -> Path:
    """A training config TOML with an inline [model] table."""
    opts = dict(
        seq_len=64,
        micro_batch_size=4,
        grad_accum=1,
        max_steps=20,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=3,
        eval_every=0,
        ckpt_every=5,
        log_every=5,
        seed=7,
    )
    opts.update(train)
    lines = ["[model]"] + [f"{k} = {json.dumps(v)}" for k, v in TINY_MODEL.items()]
    lines += ["", "[data]", f'path = "{data_dir}"', "", "[train]", f'out_dir = "{out_dir}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in opts.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def subprocess_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return make_token_dir(tmp_path_factory.mktemp("tokens"))


def test_schedules() -> None:
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.55)
    assert lr_at(cfg, 110) == pytest.approx(0.1)
    wsd = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=10, max_steps=100, schedule="wsd", wsd_decay_fraction=0.2)
    assert lr_at(wsd, 50) == 1.0 and lr_at(wsd, 79) == 1.0
    assert lr_at(wsd, 90) == pytest.approx(0.5)
    assert lr_at(wsd, 100) == pytest.approx(0.0)


def test_packed_dataset_windows_and_resume_position(tokens: Path, tmp_path: Path) -> None:
    data = PackedDataset(tokens, seq_len=64, seed=3)
    raw = np.fromfile(tokens / "openstax-00000.bin", dtype="<u2")
    assert data.num_tokens == len(raw) and len(data) == (len(raw) - 1) // 64 and not data.has_mask
    x, y = data.batch(0, 4)
    assert x.shape == (4, 64) and torch.equal(x[:, 1:], y[:, :-1])
    # every window is a real slice of the file, taken in the seeded order
    o = data.offsets[data.order(0)[0]]
    assert torch.equal(x[0], torch.from_numpy(raw[o : o + 64].astype(np.int64)))
    assert torch.equal(y[0], torch.from_numpy(raw[o + 1 : o + 65].astype(np.int64)))
    # the stream is a pure function of the position: a fresh reader continues identically
    again = PackedDataset(tokens, seq_len=64, seed=3)
    assert torch.equal(again.batch(len(data) - 2, 4)[0], data.batch(len(data) - 2, 4)[0])
    # a plain .bin needs its dtype, and says so
    plain = tmp_path / "plain.bin"
    plain.write_bytes((tokens / "openstax-00000.bin").read_bytes())
    with pytest.raises(ValueError, match="dtype"):
        PackedDataset(plain, 64)
    assert torch.equal(PackedDataset(plain, 64, dtype="uint16", seed=3).batch(5, 2)[0], data.batch(5, 2)[0])


def test_grad_accumulation_matches_bigger_batch(tokens: Path, tmp_path: Path) -> None:
    runs = {}
    for name, mb, acc in (("big", 4, 1), ("accum", 2, 2)):
        cfg = TrainConfig.from_toml(
            write_config(
                tmp_path / f"{name}.toml",
                tokens,
                tmp_path / name,
                micro_batch_size=mb,
                grad_accum=acc,
                max_steps=6,
                ckpt_every=0,
            )
        )
        Trainer(cfg).train()
        runs[name] = metric_losses(tmp_path / name / "metrics.jsonl")
    assert len(runs["big"]) == 6
    for step, loss in runs["big"].items():
        assert runs["accum"][step] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert runs["big"][6] < runs["big"][1]


def test_grad_accumulation_matches_bigger_batch_with_a_loss_mask(tmp_path: Path) -> None:
    """With SFT masks, micro-batches hold different numbers of trained targets; a step must still be the mean
    over all of them, so accumulation gives the bigger batch's trajectory."""
    chat = make_chat_shards(tmp_path / "chat")
    runs = {}
    for name, mb, acc in (("big", 4, 1), ("accum", 1, 4)):
        toml = write_config(tmp_path / f"{name}.toml", chat, tmp_path / name, seq_len=32, micro_batch_size=mb,
                            grad_accum=acc, max_steps=5, ckpt_every=0)
        trainer = Trainer(TrainConfig.from_toml(toml, {"model.vocab_size": 32064}))
        if name == "accum":
            counts = {int((trainer.train_data.batch(s, 1)[1] != -100).sum()) for s in range(4)}
            assert len(counts) > 1  # unequal micro-batches, so equal weighting would give another result
        trainer.train()
        runs[name] = metric_losses(tmp_path / name / "metrics.jsonl")
    assert sorted(runs["big"]) == list(range(1, 6))
    for step, loss in runs["big"].items():
        assert runs["accum"][step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step


def test_nan_guard_stops_with_clear_message(tokens: Path, tmp_path: Path) -> None:
    cfg = TrainConfig.from_toml(write_config(tmp_path / "c.toml", tokens, tmp_path / "run"))
    trainer = Trainer(cfg)
    trainer.train_step()
    with torch.no_grad():
        trainer.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingDiverged, match=r"step 1: loss=nan .*not finite.*lower lr"):
        trainer.train_step()
    for k, v in trainer.model.state_dict().items():  # no optimizer step was taken
        assert torch.allclose(v, before[k], equal_nan=True)


def test_eval_metrics_and_checkpoint_loads_in_transformers(tokens: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig.from_toml(
        write_config(
            tmp_path / "c.toml", tokens, tmp_path / "run", max_steps=10, eval_every=5, eval_batches=2, schedule="wsd"
        )
    )
    trainer = Trainer(cfg)
    last = trainer.train()
    assert "val_loss" in last and np.isfinite(last["val_loss"])
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "val_loss" in r] == [5, 10]
    assert all(r["tokens_per_s"] > 0 for r in recs if "loss" in r)
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000010"
    assert {p.name for p in ckpt.iterdir()} >= {
        "model.safetensors",
        "optimizer.pt",
        "rng.safetensors",
        "state.json",
        "config.json",
    }
    assert json.loads((ckpt / "state.json").read_text())["samples"] == 40
    torch.load(ckpt / "optimizer.pt", weights_only=True)  # loads without unpickling arbitrary objects
    hf = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    x, _ = trainer.val_data.fixed_batches(1, 2)[0]
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, trainer.model(x)[0], atol=1e-5, rtol=0)
        out = hf.generate(x[:1, :8], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13)
    assert set(load_file(str(ckpt / "model.safetensors"))) == set(trainer.model.state_dict())


def test_exact_resume_after_kill_9(tokens: Path, tmp_path: Path) -> None:
    """A run killed with SIGKILL and resumed gives the same loss at every step as an uninterrupted run."""
    steps = 30
    cmd = [sys.executable, "-m", "phi3data.training.trainer"]
    env = subprocess_env()
    full = write_config(tmp_path / "full.toml", tokens, tmp_path / "full", max_steps=steps, ckpt_every=5)
    subprocess.run(cmd + [str(full)], env=env, check=True, capture_output=True, timeout=300)
    reference = metric_losses(tmp_path / "full" / "metrics.jsonl")
    assert sorted(reference) == list(range(1, steps + 1))

    cfg = write_config(tmp_path / "killed.toml", tokens, tmp_path / "killed", max_steps=steps, ckpt_every=5)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    proc = subprocess.Popen(cmd + [str(cfg)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and max(metric_losses(metrics), default=0) >= 12:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGSTOP)  # freeze first so the step we read is the step the kill interrupts
    killed_at = max(metric_losses(metrics))
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert 12 <= killed_at < steps, "the run finished before it could be killed; make it longer"

    subprocess.run(cmd + [str(cfg)], env=env, check=True, capture_output=True, timeout=300)
    events = [json.loads(x) for x in metrics.read_text().splitlines() if '"resume"' in x]
    assert len(events) == 1 and events[0]["step"] % 5 == 0 and events[0]["step"] <= killed_at
    resumed = metric_losses(metrics)
    assert sorted(resumed) == list(range(1, steps + 1))
    assert resumed == reference  # bit-identical trajectory


def make_chat_shards(out: Path, n: int = 120) -> Path:
    """Chat shards (phi3-mini tokens + loss mask): short arithmetic conversations, trained on the replies only."""
    from phi3data.tokenization.runner import TokenizeConfig, tokenize

    rng = np.random.default_rng(0)
    src = out.with_suffix(".jsonl")
    with open(src, "w") as f:
        for _ in range(n):
            a, b = (int(v) for v in rng.integers(0, 50, 2))
            messages = [{"role": "user", "content": f"What is {a} plus {b}? Answer with the number only."},
                        {"role": "assistant", "content": str(a + b)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    tokenize([src], out, TokenizeConfig(chat=True), workers=1)
    return out


def test_trainer_on_chat_shards_skips_masked_targets(tmp_path: Path) -> None:
    chat = make_chat_shards(tmp_path / "chat")
    toml = write_config(tmp_path / "c.toml", chat, tmp_path / "run", seq_len=32, max_steps=6, eval_every=3,
                        eval_batches=2, ckpt_every=0)
    trainer = Trainer(TrainConfig.from_toml(toml, {"model.vocab_size": 32064}))  # phi3-mini's chat tokens
    data = trainer.train_data
    assert data.has_mask and trainer.val_data is not None and trainer.val_data.has_mask
    x, y = data.batch(0, 4)
    assert (y == -100).any() and (y != -100).any()
    full = torch.from_numpy(np.stack([data.window(data.index(s))[1:] for s in range(4)]))
    assert torch.equal(y[y != -100], full[y != -100])
    with torch.no_grad():
        masked_loss = float(trainer.model(x, y)[1])
        full_loss = float(trainer.model(x, full)[1])
    assert abs(masked_loss - full_loss) > 0.01  # the mask changes the loss, so the check below can tell
    # the first optimizer step's loss is the masked loss of the first micro-batch (same weights, same samples)
    assert trainer.train_step()["loss"] == pytest.approx(masked_loss, rel=1e-5)
    last = trainer.train()
    recs = metric_losses(tmp_path / "run" / "metrics.jsonl")
    assert sorted(recs) == list(range(2, 7)) and all(np.isfinite(v) for v in recs.values())
    assert np.isfinite(last["val_loss"]) and last["tokens"] == 6 * 4 * 32


def test_token_ids_beyond_the_model_vocab_are_refused(tokens: Path, tmp_path: Path) -> None:
    """Every file is checked (not only the first), and shards declare their tokenizer's size."""
    from phi3data.tokenization.runner import TokenizeConfig, tokenize

    bins = tmp_path / "bins"
    bins.mkdir()
    ids = np.fromfile(tokens / "openstax-00000.bin", dtype="<u2")[:5000]
    ids.tofile(bins / "a.bin")
    bad = ids.copy()
    bad[100] = 40_000
    bad.tofile(bins / "b.bin")
    (bins / "manifest.json").write_text(json.dumps({"dtype": "uint16"}))
    with pytest.raises(ValueError, match=r"token id 40000 in .*b\.bin is outside the model vocab \(32000\)"):
        Trainer(TrainConfig.from_toml(write_config(tmp_path / "b.toml", bins, tmp_path / "b")))
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "A short document. " * 50}) + "\n")
    cl100k = tmp_path / "cl100k"
    tokenize([text], cl100k, TokenizeConfig(tokenizer="phi3-small"), workers=1)
    with pytest.raises(ValueError, match="tokenizer with 100352 ids"):
        Trainer(TrainConfig.from_toml(write_config(tmp_path / "c.toml", cl100k, tmp_path / "c", seq_len=16)))


def test_training_config_errors_name_the_file_and_field(tokens: Path, tmp_path: Path) -> None:
    """Misspelt keys in any section or override, and values of the wrong type, are refused with the close name."""
    from phi3data.config import ConfigError

    toml = write_config(tmp_path / "t.toml", tokens, tmp_path / "run")
    cfg = TrainConfig.from_toml(toml, {"model.hidden_size": 128, "max_steps": 3})
    assert cfg.model_config().hidden_size == 128 and cfg.max_steps == 3
    cases = [
        ({"model.hiden_size": 64}, r"overrides: unknown field model\.hiden_size \(did you mean model\.hidden_size\?\)"),
        ({"max_step": 3}, r"overrides: unknown field max_step \(did you mean max_steps\?\)"),
        ({"schedule": "cos"}, r"t\.toml: override schedule: Input should be 'cosine' or 'wsd'"),
        ({"model.num_attention_heads": 5}, r"t\.toml: hidden_size 64 is not divisible by 5 heads"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_toml(toml, overrides)
    text = toml.read_text()
    edits = [
        (text.replace("hidden_size =", "hiden_size ="), r"unknown field model\.hiden_size \(did you mean model\.hidd"),
        (text.replace("max_steps =", "max_step ="), r"unknown field train\.max_step \(did you mean train\.max_steps\?"),
        (text.replace("path =", "pth ="), r"unknown field data\.pth \(did you mean data\.path\?\)"),
        (text.replace("max_steps = 20", 'max_steps = "ten"'), r"t\.toml: train\.max_steps: Input should be a valid"),
        (text + "\n[trian]\n", r"t\.toml: unknown field trian \(did you mean train\?\)"),
    ]
    for bad, message in edits:
        toml.write_text(bad)
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_toml(toml)


def test_model_recipe_fields_are_checked_where_the_training_config_finds_them(tmp_path: Path) -> None:
    """A size in a ladder beside the training config: a misspelt field names that file and the size's table."""
    from phi3data.config import ConfigError

    (tmp_path / "sizes.toml").write_text("[model]\nvocab_size = 32000\n\n[sizes.a]\nhidden_size = 64\n"
                                         "num_attention_heads = 4\nintermediate_szie = 96\n")
    (tmp_path / "t.toml").write_text('model = "sizes:a"\n\n[data]\npath = "x"\n')
    with pytest.raises(ConfigError, match=r"sizes\.toml: unknown field sizes\.a\.intermediate_szie \(did you mean"):
        TrainConfig.from_toml(tmp_path / "t.toml")
    (tmp_path / "sizes.toml").write_text((tmp_path / "sizes.toml").read_text().replace("_szie", "_size"))
    cfg = TrainConfig.from_toml(tmp_path / "t.toml", {"model.num_hidden_layers": 1})
    model = cfg.model_config()
    assert (model.intermediate_size, model.num_hidden_layers, model.name) == (96, 1, "sizes:a")
