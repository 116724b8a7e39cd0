"""Distributed training: 2 gloo processes under torchrun (DDP, and FSDP2's fully_shard) give the same losses and
final weights as 1 process at the same global batch (and the same samples, by construction of the data split); an
FSDP run resumes exactly (weights and AdamW state)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import metric_losses
from safetensors.torch import load_file
from test_train_trainer import make_token_dir, subprocess_env, write_config

from phi3data.config import ConfigError
from phi3data.training import TrainConfig, Trainer


def run_two_processes(config: Path, *overrides: str) -> None:
    """``torchrun --nproc_per_node 2 -m phi3data.training.trainer CONFIG [overrides]`` on gloo (CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "phi3data.training.trainer", str(config), *overrides]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


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
    run_two_processes(ddp)
    one, two = metric_losses(tmp_path / "one" / "metrics.jsonl"), metric_losses(tmp_path / "ddp" / "metrics.jsonl")
    assert sorted(one) == sorted(two) == list(range(1, steps + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), (step, one[step], two[step])
    # rank 0 wrote the checkpoints (FSDP: gathered to full tensors), with the same weights as one process, up to
    # rounding: gradients summed in another order (two half batches reduced across ranks) differ by ~1e-7, which
    # AdamW's m / sqrt(v) can turn into ~4e-5 (about 1% of one update at lr 3e-3) for rare tokens' embedding rows
    final = load_file(str(tmp_path / "ddp" / "checkpoints" / "step_0000006" / "model.safetensors"))
    reference = load_file(str(tmp_path / "one" / "checkpoints" / "step_0000006" / "model.safetensors"))
    assert final.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-4, atol=1e-4, msg=name)


def test_fsdp_run_resumes_exactly(tmp_path: Path) -> None:
    """A 2-process FSDP run stopped at a checkpoint and resumed ends with the uninterrupted run's losses, weights
    and AdamW moments (saved sharded through torch.distributed.checkpoint, not reset on resume)."""
    tokens = make_token_dir(tmp_path / "tokens", max_tokens=40_000)
    steps = 6
    # the warmup covers the first run, so its learning rates do not depend on max_steps
    opts = dict(micro_batch_size=2, max_steps=steps, ckpt_every=3, warmup_steps=3, distributed="fsdp")
    full = write_config(tmp_path / "full.toml", tokens, tmp_path / "full", **opts)
    run_two_processes(full)
    parted = write_config(tmp_path / "parted.toml", tokens, tmp_path / "parted", **opts)
    run_two_processes(parted, "max_steps=3")
    first = tmp_path / "parted" / "checkpoints" / "step_0000003"
    assert (first / "optimizer").is_dir() and not (first / "optimizer.pt").exists()
    run_two_processes(parted)

    metrics = (tmp_path / "parted" / "metrics.jsonl").read_text().splitlines()
    resumes = [json.loads(line) for line in metrics if '"resume"' in line]
    assert [r["step"] for r in resumes] == [3]
    reference = metric_losses(tmp_path / "full" / "metrics.jsonl")
    assert sorted(reference) == list(range(1, steps + 1))
    assert metric_losses(tmp_path / "parted" / "metrics.jsonl") == reference
    final = load_file(str(tmp_path / "parted" / "checkpoints" / "step_0000006" / "model.safetensors"))
    expected = load_file(str(tmp_path / "full" / "checkpoints" / "step_0000006" / "model.safetensors"))
    assert final.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name
    # its checkpoints hold sharded optimizer state: a run without FSDP refuses them rather than reset AdamW
    with pytest.raises(ConfigError, match="written by an FSDP run; resume it with distributed=fsdp"):
        Trainer(TrainConfig.from_toml(parted, {"max_steps": 8, "distributed": "ddp"}))
    with pytest.raises(ConfigError, match="written by an FSDP run; run it under torchrun with more than one process"):
        Trainer(TrainConfig.from_toml(parted, {"max_steps": 8}))
