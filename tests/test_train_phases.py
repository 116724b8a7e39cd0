"""Phased training on real tokens: phases consumed in order and never mixed, the schedule's decay placed in a
phase, metrics per phase, kill -9 at the phase boundary resumed with bit-identical batches, and bad phases refused
before the first step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_train_trainer import SHARED, TINY_MODEL, subprocess_env

from phi3data.config import ConfigError
from phi3data.tokenization.runner import TokenizeConfig, tokenize
from phi3data.training import TrainConfig, Trainer

SEQ, MB = 32, 4


@pytest.fixture(scope="module")
def phase_dirs(tmp_path_factory) -> dict[str, Path]:
    """Two phases of real tokens (phi3-mini): web pages, then textbook sections."""
    root = tmp_path_factory.mktemp("phases")
    web = sorted((SHARED / "web" / "jsonl").glob("cc_en_head-*.jsonl"))
    textbooks = SHARED / "textbooks" / "openstax.jsonl.gz"
    out = {"web": root / "web", "textbooks": root / "textbooks"}
    tokenize(web, out["web"], TokenizeConfig(), workers=1, progress=False)
    tokenize([textbooks], out["textbooks"], TokenizeConfig(max_document_chars=20_000), workers=1, progress=False)
    return out


def write_phased(path: Path, phase_dirs: dict[str, Path], out_dir: Path, budgets=(2048, 1536), repeat=False,
                 **train) -> Path:
    opts = dict(seq_len=SEQ, micro_batch_size=MB, lr=3e-3, min_lr=3e-4, warmup_steps=2, schedule="wsd",
                decay_phase="textbooks", eval_every=4, val_windows=4, eval_batches=1, ckpt_every=1, log_every=4,
                seed=5)
    opts.update(train)
    model = dict(TINY_MODEL, vocab_size=32064)
    lines = ["[model]"] + [f"{k} = {json.dumps(v)}" for k, v in model.items()]
    lines += ["", "[train]", f'out_dir = "{out_dir}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in opts.items() if v is not None]
    for (name, folder), tokens in zip(phase_dirs.items(), budgets):
        lines += ["", "[[data.phases]]", f'name = "{name}"', f'path = "{folder}"', f"tokens = {tokens}"]
        if repeat and name == "web":
            lines.append("allow_repeat = true")
    path.write_text("\n".join(lines) + "\n")
    return path


def records(metrics: Path) -> dict[int, dict]:
    """step -> the last training record of that step."""
    out = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec
    return out


def test_phases_run_in_order_never_mixed_with_the_decay_in_the_last(phase_dirs, tmp_path):
    cfg = TrainConfig.from_toml(write_phased(tmp_path / "p.toml", phase_dirs, tmp_path / "run"))
    trainer = Trainer(cfg)
    # budgets: 2048 / 32 = 64 windows (16 steps of 4), then 1536 / 32 = 48 windows (12 steps)
    assert cfg.max_steps == 28 and trainer.decay == (16, 28)
    web = {tuple(trainer.phases.phases[0].data.window(i)) for i in range(len(trainer.phases.phases[0].data))}
    books = {tuple(trainer.phases.phases[1].data.window(i)) for i in range(len(trainer.phases.phases[1].data))}
    for step in range(cfg.max_steps):
        x, y = trainer.phases.batch(step * MB, MB)
        rows = {tuple(np.append(xr.numpy(), yr.numpy()[-1])) for xr, yr in zip(x, y)}
        assert rows <= (web if step < 16 else books), f"step {step} mixes phases"
    trainer.train()
    recs = records(tmp_path / "run" / "metrics.jsonl")
    assert [recs[s]["phase"] for s in range(1, 29)] == ["web"] * 16 + ["textbooks"] * 12
    lrs = [recs[s]["lr"] for s in range(1, 29)]
    assert lrs[2:16] == [cfg.lr] * 14, "stable until the decay phase"
    assert all(a > b for a, b in zip(lrs[16:], lrs[17:])), "decaying through the textbook phase"
    assert lrs[-1] == pytest.approx(cfg.lr + (cfg.min_lr - cfg.lr) * 11 / 12)  # step 28 of a decay over 16..28
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "val_loss" in line]
    assert {"val_loss/web", "val_loss/textbooks"} <= set(evals[-1]) and evals[-1]["phase"] == "textbooks"
    assert evals[-1]["val_loss"] == evals[-1]["val_loss/textbooks"]


def test_kill_at_the_phase_boundary_resumes_with_bit_identical_batches(phase_dirs, tmp_path):
    cmd = [sys.executable, "-m", "phi3data.training.trainer"]
    env = subprocess_env()
    full = write_phased(tmp_path / "full.toml", phase_dirs, tmp_path / "full")
    subprocess.run(cmd + [str(full)], env=env, check=True, capture_output=True, timeout=300)
    reference = records(tmp_path / "full" / "metrics.jsonl")

    cfg = write_phased(tmp_path / "killed.toml", phase_dirs, tmp_path / "killed")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    proc = subprocess.Popen(cmd + [str(cfg)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and max(records(metrics), default=0) >= 16:  # the last web step
            break
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGSTOP)
    killed_at = max(records(metrics))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert 16 <= killed_at < 28, "the kill should land at the boundary, before the end"
    subprocess.run(cmd + [str(cfg)], env=env, check=True, capture_output=True, timeout=300)
    resumed = records(metrics)
    assert sorted(resumed) == list(range(1, 29))
    for step in range(1, 29):
        for key in ("batch_digest", "loss", "lr", "phase"):
            assert resumed[step][key] == reference[step][key], (step, key)


def test_bad_phases_are_refused_before_training(phase_dirs, tmp_path):
    def refused(match: str, budgets=(2048, 1536), dirs=None, **train) -> None:
        path = write_phased(tmp_path / "bad.toml", dirs or phase_dirs, tmp_path / "bad", budgets=budgets, **train)
        with pytest.raises(ConfigError, match=match):
            Trainer(TrainConfig.from_toml(path))

    refused("does not exist", dirs={"web": tmp_path / "missing", "textbooks": phase_dirs["textbooks"]})
    refused("allow_repeat", budgets=(10_000_000, 1536))
    refused("outside the run", max_steps=10)  # the decay phase starts at step 16
    refused("is not a phase", decay_phase="phase9")
    other = tmp_path / "small-vocab"
    tokenize(sorted((SHARED / "web" / "jsonl").glob("cc_en_head-*.jsonl")), other,
             TokenizeConfig(tokenizer="phi3-small"), workers=1, progress=False)
    refused("different tokenizers", dirs={"web": phase_dirs["web"], "textbooks": other})
    # repetition is allowed when asked for: the phase's windows come round again, epoch after epoch
    path = write_phased(tmp_path / "repeat.toml", phase_dirs, tmp_path / "repeat", budgets=(10_000_000, 1536),
                        repeat=True, max_steps=3, schedule="cosine", decay_phase=None)
    trainer = Trainer(TrainConfig.from_toml(path))
    web = trainer.phases.phases[0]
    assert web.samples > len(web.data) and trainer.cfg.max_steps == 3
