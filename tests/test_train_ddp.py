"""Distributed training: 2 gloo processes under torchrun (DDP, and FSDP2's fully_shard) give the same losses and
final weights as 1 process at the same global batch (and the same samples, by construction of the data split)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_trainer import losses, make_token_dir, subprocess_env, write_config


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_processes_match_a_single_process(tmp_path: Path, distributed: str) -> None:
    tokens = make_token_dir(tmp_path / "tokens", max_tokens=40_000)
    env = subprocess_env()
    steps = 6
    single = write_config(
        tmp_path / "one.toml", tokens, tmp_path / "one", micro_batch_size=4, max_steps=steps, ckpt_every=3
    )
    subprocess.run(
        [sys.executable, "-m", "phi3data.training.trainer", str(single)],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    ddp = write_config(
        tmp_path / "ddp.toml", tokens, tmp_path / "ddp", micro_batch_size=2, max_steps=steps, ckpt_every=3,
        distributed=distributed,
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
    # rank 0 wrote the checkpoints (FSDP: gathered to full tensors), with the same weights as one process
    final = load_file(str(tmp_path / "ddp" / "checkpoints" / "step_0000006" / "model.safetensors"))
    reference = load_file(str(tmp_path / "one" / "checkpoints" / "step_0000006" / "model.safetensors"))
    assert final.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
