"""Distributed training: 2 gloo processes under torchrun give the same losses as 1 process at the same global
batch (and the same samples, by construction of the data split)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_train_trainer import losses, make_token_dir, subprocess_env, write_config


def test_two_process_ddp_matches_single_process(tmp_path: Path) -> None:
    tokens = make_token_dir(tmp_path / "tokens", max_tokens=40_000)
    env = subprocess_env()
    steps = 6
    single = write_config(
        tmp_path / "one.toml", tokens, tmp_path / "one", micro_batch_size=4, max_steps=steps, ckpt_every=0
    )
    subprocess.run(
        [sys.executable, "-m", "phi3data.training.trainer", str(single)],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    ddp = write_config(
        tmp_path / "ddp.toml", tokens, tmp_path / "ddp", micro_batch_size=2, max_steps=steps, ckpt_every=3
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "phi3data.training.trainer",
            str(ddp),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = losses(tmp_path / "one" / "metrics.jsonl"), losses(tmp_path / "ddp" / "metrics.jsonl")
    assert sorted(one) == sorted(two) == list(range(1, steps + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), (step, one[step], two[step])
    # rank 0 wrote the checkpoints, with the global data position
    assert (tmp_path / "ddp" / "checkpoints" / "step_0000006" / "model.safetensors").exists()
