"""Post-training with the built-in trainer: SFT on packed conversations from a pretrained checkpoint, and DPO on
preference pairs (the loss checked against an independent computation in transformers, exact resume, two
processes, bad pairs counted) ending with held-out pairs from the verified-reasoning checks ranked better."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import metric_losses
from preference_pairs import verified_pairs
from test_train_ddp import run_two_processes
from test_train_trainer import make_chat_shards
from typer.testing import CliRunner

from phi3data.cli import app
from phi3data.config import ConfigError
from phi3data.model.hf import save_hf
from phi3data.model.model import Phi3, Phi3Config
from phi3data.tokenization.dataset import IGNORE_INDEX, PackedDataset
from phi3data.training import TrainConfig, Trainer

TINY = dict(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, original_max_position_embeddings=512, tie_word_embeddings=True)


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_hf(Phi3(Phi3Config(**TINY)), path)


def write(path: Path, data: Path, out: Path, *, init_from: Path | None, dpo: dict | None = None, **train) -> Path:
    opts = dict(seq_len=128, micro_batch_size=4, max_steps=8, lr=1e-3, min_lr=1e-4, warmup_steps=2, eval_every=0,
                ckpt_every=4, log_every=4, seed=3, weight_decay=0.0)
    opts.update(train)
    lines = ["[data]", f'path = "{data}"', "", "[train]", f'out_dir = "{out}"']
    if init_from is not None:
        lines.append(f'init_from = "{init_from}"')
    lines += [f"{k} = {json.dumps(v)}" for k, v in opts.items()]
    if dpo is not None:
        lines += ["", "[dpo]"] + [f"{k} = {json.dumps(v)}" for k, v in dpo.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def tokenize_pairs(source: Path, out: Path, *extra: str):
    result = CliRunner().invoke(app, ["tokenize", str(source), "--output", str(out), "--preferences",
                                      "--no-progress", *extra], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """48 hand-made arithmetic pairs (a right and a wrong sum), tokenized with phi-3's chat format."""
    tmp = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(48):
        a, b = (int(v) for v in rng.integers(1, 90, 2))
        rows.append({"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}.",
                     "rejected": f"{a} + {b} = {a + b + int(rng.integers(1, 9))}."})
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenize_pairs(tmp / "pairs.jsonl", tmp / "tok")
    return tmp / "tok"


# --- SFT ----------------------------------------------------------------------------------------------------

def test_packed_conversations_never_see_each_other(tmp_path: Path) -> None:
    chat = make_chat_shards(tmp_path / "chat", n=60)
    data = PackedDataset(chat, seq_len=64, pack="documents", shuffle=False)
    ends = set(np.asarray(data.ends[0]).tolist())
    assert all(int(o) == 0 or int(o) in ends for o in data.offsets)  # windows start and stop at conversations
    assert all(int(s) in ends for s in data.stops) and data.dropped_documents == 0
    x, y, docs = data.batch(0, 2)
    first = docs[0]
    assert int(first.max()) >= 1, "the window should hold several conversations"
    torch.manual_seed(0)
    model = Phi3(Phi3Config(**TINY)).eval()
    with torch.no_grad():
        packed = model(x[:1], documents=docs[:1])[0][0]
        for d in range(int(first.max()) + 1):
            at = (first == d).nonzero().flatten()
            if d == int(first.max()) and int(data.stops[0] - data.offsets[0]) <= int(at[0]):
                break  # padding
            alone = model(x[:1, at[0]:at[-1] + 1])[0][0]  # the conversation by itself, from position 0
            torch.testing.assert_close(packed[at], alone, rtol=1e-4, atol=1e-4)
    # no target crosses a boundary, padding is never trained, and the mask still keeps prompts out
    boundary = docs[:, 1:] != docs[:, :-1]
    assert (y[:, :-1][boundary] == IGNORE_INDEX).all()
    assert (y != IGNORE_INDEX).any()


def test_long_conversations_are_left_out_and_counted(tmp_path: Path) -> None:
    chat = make_chat_shards(tmp_path / "chat", n=30)
    lengths = np.diff(np.concatenate([[0], np.asarray(PackedDataset(chat, 64, pack="documents").ends[0])]))
    seq_len = int(np.median(lengths)) - 2  # the longer ones (sums with more digits) do not fit
    data = PackedDataset(chat, seq_len=seq_len, pack="documents")
    assert data.dropped_documents == int((lengths > seq_len + 1).sum()) > 0


def test_sft_starts_from_a_pretrained_checkpoint(tmp_path: Path) -> None:
    chat = make_chat_shards(tmp_path / "chat", n=60)
    base = tiny_checkpoint(tmp_path / "base", seed=5)
    toml = write(tmp_path / "sft.toml", chat, tmp_path / "run", init_from=base, seq_len=64,
                 max_steps=4, ckpt_every=2)
    text = toml.read_text().replace("[data]", '[data]\npack = "documents"')
    toml.write_text(text)
    trainer = Trainer(TrainConfig.from_toml(toml))
    assert trainer.model_cfg.hidden_size == TINY["hidden_size"]  # the config came from the checkpoint
    from phi3data.model.hf import load_hf

    for name, tensor in load_hf(base).state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), name
    x, y, docs = trainer.train_data.batch(0, 4)
    with torch.no_grad():
        expected = float(trainer.model(x, y, documents=docs)[1])
    assert trainer.train_step()["loss"] == pytest.approx(expected, rel=1e-5)
    trainer.train()
    # a rerun resumes from its own checkpoint, not from init_from
    again = Trainer(TrainConfig.from_toml(toml, {"max_steps": 6}))
    assert again.step == 4 and again.resumed_from is not None
    # a recipe reference beside init_from is refused, naming the file
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "ladder-cpu:s1"\n' + text)
    with pytest.raises(ConfigError, match="bad.toml.*init_from"):
        TrainConfig.from_toml(bad)


# --- preference data --------------------------------------------------------------------------------------

def test_bad_preference_records_are_counted(tmp_path: Path) -> None:
    rows = [{"prompt": "Name a prime.", "chosen": "7", "rejected": "8"},
            {"prompt": "Name a prime.", "chosen": "", "rejected": "8"},                  # empty side
            {"prompt": "Name a prime.", "chosen": "7 ", "rejected": "7"},                # identical
            {"prompt": "word " * 400, "chosen": "7", "rejected": "9"}]                  # prompt over the limit
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = tokenize_pairs(tmp_path / "p.jsonl", tmp_path / "tok", "--max-document-tokens", "200")
    out = " ".join(result.output.split())
    assert "empty_side=1" in out and "identical_sides=1" in out and "too_many_tokens=1" in out
    for side in ("chosen", "rejected"):
        manifest = json.loads((tmp_path / "tok" / side / "manifest.json").read_text())
        assert manifest["documents"] == 1


# --- DPO ----------------------------------------------------------------------------------------------------

def _independent_logps(model_dir: Path, ids: list[int], mask: list[int]) -> tuple[float, int]:
    """Sum of log p(token) over the trained tokens, with transformers' Phi3ForCausalLM and float64 numpy."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].double().numpy()
    total, count = 0.0, 0
    for t in range(len(ids) - 1):
        if mask[t + 1]:
            row = logits[t]
            total += row[ids[t + 1]] - (row.max() + math.log(np.exp(row - row.max()).sum()))
            count += 1
    return total, count


@pytest.mark.parametrize("kind,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_loss_matches_an_independent_computation(pairs: Path, tmp_path: Path, kind: str,
                                                     smoothing: float) -> None:
    policy, reference = tiny_checkpoint(tmp_path / "policy", 1), tiny_checkpoint(tmp_path / "reference", 2)
    beta = 0.3
    toml = write(tmp_path / "dpo.toml", pairs, tmp_path / "run", init_from=policy, objective="dpo",
                 dpo={"beta": beta, "loss": kind, "label_smoothing": smoothing,
                      "reference_from": str(reference)})
    trainer = Trainer(TrainConfig.from_toml(toml))
    batch = trainer.train_data.batch(0, 3)
    with torch.no_grad():
        loss, metrics = trainer._dpo_loss(batch, trainer.train_data)
    expected, margins = [], []
    for p in batch["pairs"].tolist():
        logps = {}
        for side in ("chosen", "rejected"):
            ids, mask = trainer.train_data.sequence(side, p)
            for name, d in (("policy", policy), ("reference", reference)):
                s, n = _independent_logps(d, ids.tolist(), mask.tolist())
                logps[side, name] = s / n if kind == "ipo" else s
        h = (logps["chosen", "policy"] - logps["chosen", "reference"]) - \
            (logps["rejected", "policy"] - logps["rejected", "reference"])
        if kind == "ipo":
            expected.append((h - 1 / (2 * beta)) ** 2)
        else:
            sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
            expected.append(-(1 - smoothing) * math.log(sig(beta * h)) - smoothing * math.log(sig(-beta * h)))
        margins.append(beta * h)
    assert float(loss) == pytest.approx(np.mean(expected), rel=1e-4, abs=1e-6)
    assert float(metrics["reward_margin"]) == pytest.approx(np.mean(margins), rel=1e-4, abs=1e-6)
    # the stored reference log-probabilities equal scoring the reference model on the fly
    trainer.cfg.dpo_reference = "on_the_fly"
    from phi3data.model.hf import load_hf

    trainer.reference_model = load_hf(reference).eval()
    with torch.no_grad():
        fly, _ = trainer._dpo_loss(batch, trainer.train_data)
    assert float(fly) == pytest.approx(float(loss), rel=1e-5, abs=1e-7)


def test_dpo_starts_at_log2_and_resumes_exactly(pairs: Path, tmp_path: Path) -> None:
    sft = tiny_checkpoint(tmp_path / "sft", 4)
    opts = dict(init_from=sft, objective="dpo", max_steps=8, ckpt_every=4, eval_every=8, val_windows=8,
                eval_batches=0, dpo={"beta": 0.5})
    full = write(tmp_path / "full.toml", pairs, tmp_path / "full", **opts)
    result = Trainer(TrainConfig.from_toml(full)).train()
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("step") == 0)
    assert start["val_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    assert start["val_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert "reward_accuracy" in records[1] and "val_policy_ranking" in result
    stored = list((pairs / "reference").glob("*.npy"))
    assert stored, "the reference log-probabilities were not stored beside the pairs"
    # a run stopped after its step-4 checkpoint and started again continues exactly
    parted_dir = tmp_path / "parted"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_0000004", parted_dir / "checkpoints" / "step_0000004")
    parted = write(tmp_path / "parted.toml", pairs, parted_dir, **opts)
    mtimes = {p: p.stat().st_mtime_ns for p in stored}
    Trainer(TrainConfig.from_toml(parted)).train()
    assert {p: p.stat().st_mtime_ns for p in (pairs / "reference").glob("*.npy")} == mtimes  # computed once
    reference, resumed = metric_losses(tmp_path / "full" / "metrics.jsonl"), metric_losses(parted_dir / "metrics.jsonl")
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[s] == reference[s] for s in resumed)


def test_dpo_two_processes_match_one(pairs: Path, tmp_path: Path) -> None:
    sft = tiny_checkpoint(tmp_path / "sft", 6)
    opts = dict(init_from=sft, objective="dpo", max_steps=4, ckpt_every=4, dpo={"beta": 0.2})
    one = write(tmp_path / "one.toml", pairs, tmp_path / "one", micro_batch_size=4, **opts)
    Trainer(TrainConfig.from_toml(one)).train()
    two = write(tmp_path / "two.toml", pairs, tmp_path / "two", micro_batch_size=2, **opts)
    run_two_processes(two)
    a, b = metric_losses(tmp_path / "one" / "metrics.jsonl"), metric_losses(tmp_path / "two" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-6), (step, a[step], b[step])


@pytest.mark.slow
def test_dpo_on_verified_pairs_ranks_held_out_pairs_better(tmp_path: Path) -> None:
    """GSM8K problems' program replies sorted by the verifier (sandbox + gold answer) into chosen and rejected;
    SFT on the chosen replies, then DPO: on held-out pairs the policy moves towards the verified program (reward
    accuracy) and ranks it above the failing one, by log-likelihood per token, more often than before."""
    prefs = verified_pairs(tmp_path / "math", n_problems=600)
    tokens = tmp_path / "tokens"
    tokenize_pairs(prefs, tokens)
    sft = write(tmp_path / "sft.toml", tokens / "chosen", tmp_path / "sft", init_from=None, seq_len=256,
                micro_batch_size=8, max_steps=30, lr=3e-3, min_lr=3e-4, ckpt_every=30, val_windows=8)
    sft.write_text('model = "ladder-cpu:s1"\n' + sft.read_text().replace("[data]", '[data]\npack = "documents"'))
    Trainer(TrainConfig.from_toml(sft)).train()
    dpo = write(tmp_path / "dpo.toml", tokens, tmp_path / "dpo", init_from=tmp_path / "sft", objective="dpo",
                seq_len=256, micro_batch_size=8, max_steps=40, lr=1e-3, min_lr=1e-4, ckpt_every=40, eval_every=40,
                eval_batches=0, val_windows=100, dpo={"beta": 0.1})
    Trainer(TrainConfig.from_toml(dpo)).train()
    evals = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()
             if "val_policy_ranking" in line]
    before, after = evals[0], evals[-1]
    print({k: (round(before[k], 3), round(after[k], 3)) for k in before if k.startswith("val_")})
    assert before["step"] == 0 and after["step"] == 40
    assert after["val_policy_ranking_per_token"] > before["val_policy_ranking_per_token"] + 0.05
    assert after["val_policy_ranking"] >= before["val_policy_ranking"]
    assert after["val_reward_accuracy"] > 0.6 and after["val_loss"] < math.log(2)


# --- long context -------------------------------------------------------------------------------------------

def test_long_context_stage_trains_from_a_checkpoint_and_exports_its_longrope_factors(tmp_path: Path) -> None:
    """model/longctx-tiny-cpu-1.toml on a pretrained ladder-cpu:s2: LongRoPE switched on by the recipe's [model]
    table, windows longer than the original context, and the GGUF carries the factors llama.cpp reads."""
    import gguf
    from test_train_trainer import make_token_dir

    from phi3data.export.gguf import export_gguf
    from phi3data.model.recipes import load_model_config

    torch.manual_seed(0)
    base = save_hf(Phi3(load_model_config("ladder-cpu:s2")), tmp_path / "base")
    tokens = make_token_dir(tmp_path / "tokens", max_tokens=20_000)
    recipe = Path(__file__).resolve().parents[1] / "model" / "longctx-tiny-cpu-1.toml"
    cfg = TrainConfig.from_toml(recipe, {"init_from": str(base), "data_path": str(tokens), "max_steps": 2,
                                         "micro_batch_size": 1, "out_dir": str(tmp_path / "long"), "eval_every": 0})
    trainer = Trainer(cfg)
    model_cfg = trainer.model_cfg
    assert model_cfg.rope_scaling["type"] == "longrope" and cfg.seq_len > model_cfg.original_max_position_embeddings
    assert len(model_cfg.rope_scaling["long_factor"]) == model_cfg.head_dim // 2
    trainer.train()
    out = export_gguf(tmp_path / "long", tmp_path / "long.gguf", "f16")
    reader = gguf.GGUFReader(out.path)
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    np.testing.assert_allclose(tensors["rope_factors_long.weight"], model_cfg.rope_scaling["long_factor"], rtol=1e-6)
    np.testing.assert_allclose(tensors["rope_factors_short.weight"], model_cfg.rope_scaling["short_factor"],
                               rtol=1e-6)
    fields = {f.name: f for f in reader.fields.values()}
    original = fields["phi3.rope.scaling.original_context_length"]
    assert int(original.parts[original.data[0]][0]) == model_cfg.original_max_position_embeddings
