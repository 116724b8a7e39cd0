"""Preference pairs from an LLM judge, against the real llama.cpp server (SmolLM2-135M) on 127.0.0.1: second
answers and verdicts in both orders are each sent once, verdicts map back to the right answer, and a judge that
contradicts itself when the answers swap places yields no pair. The model is small: mechanics, not quality."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import MODEL, ROOT, shipped_plan
from typer.testing import CliRunner

from phi3data.cli import app
from phi3data.generators.judge import judge_pairs, parse_verdict
from phi3data.generators.ledger import LedgerWriter, ledger_lines, read_ledger
from phi3data.generators.plan import expand, load_plan


def test_verdicts_are_read_and_mapped_back_through_the_swap(tmp_path):
    assert parse_verdict("A is vaguer. Verdict: B") == "B"
    assert parse_verdict("**Verdict:** a") == "A"
    assert parse_verdict("Verdict: A ... on reflection, Verdict: B") == "B"
    assert parse_verdict("I prefer the first one") is None
    plan = load_plan(ROOT / "generators" / "preferences.toml")
    requests = expand(plan).requests[:3]
    keys = [f"k{i}" for i in range(3)]
    with LedgerWriter(tmp_path) as ledger:
        for key, text in zip(keys, ["short answer", "another", "third"]):
            ledger.append({"key": key, "status": "ok", "text": text})
    # the judge: request 0 prefers the longer answer in both orders (consistent), request 1 always says "A"
    # (position bias: inconsistent), request 2 gives no verdict

    def step(name, reqs):
        folder = tmp_path / name
        out_keys = [f"{name}-{i}" for i in range(len(reqs))]
        with LedgerWriter(folder) as ledger:
            for key, req in zip(out_keys, reqs):
                if name == "answers-b":
                    text = {"k0": "a much longer and better answer", "k1": "other", "k2": "yet another"}[req.seed_id]
                else:
                    content = req.messages[0]["content"]
                    a = content.split("Answer A:\n", 1)[1].split("\n\nAnswer B:")[0]
                    text = {"k0": "Verdict: A" if "longer" in a else "Verdict: B", "k1": "Verdict: A",
                            "k2": "no idea"}[req.seed_id]
                ledger.append({"key": key, "status": "ok", "text": text})
        return out_keys, read_ledger(folder).rows

    summary = judge_pairs(plan, requests, keys, read_ledger(tmp_path).rows, tmp_path, step)
    assert summary["outcomes"] == {"inconsistent_verdicts": 1, "no_verdict": 1, "pair": 1}
    [pair] = [json.loads(line) for line in (tmp_path / "judge" / "preferences.jsonl").read_text().splitlines()]
    assert pair["chosen"] == "a much longer and better answer" and pair["rejected"] == "short answer"
    assert pair["verdicts"] == {"ab": "second", "ba": "second"}


def test_judge_plan_runs_against_the_real_server_and_resumes(llama_server, tmp_path):
    plan = shipped_plan("preferences.toml", tmp_path / "plans", [
        ('topics = ["why the sky is blue", "how vaccines work", "what inflation is", "how a bill becomes law"]',
         'topics = ["why the sky is blue", "how vaccines work"]'),
        ('audiences = ["child", "adult"]', 'audiences = ["child"]'), ("quota = 2 ", "quota = 1 "),
        ("max_tokens = 120", "max_tokens = 40"), ("max_tokens = 160", "max_tokens = 48")])
    try:
        out = tmp_path / "prefs"
        args = ["generate", str(plan), "--output", str(out), "--base-url", llama_server, "--model", MODEL,
                "--no-progress"]
        first = CliRunner().invoke(app, args, terminal_width=200)
        assert first.exit_code == 0, first.output
        summary = json.loads((out / "judge" / "summary.json").read_text())
        assert summary["prompts"] == 2 and sum(summary["outcomes"].values()) == 2
        folders = [out, *sorted((out / "judge").glob("*/"))]
        sent = sum(len(list(ledger_lines(f))) for f in folders)
        # 2 first answers, 2 second answers and 2 verdicts per order for the pairs of distinct answers
        assert 4 <= sent <= 8
        again = CliRunner().invoke(app, args, terminal_width=200)
        assert again.exit_code == 0, again.output
        assert sum(len(list(ledger_lines(f))) for f in folders) == sent
        assert json.loads((out / "judge" / "summary.json").read_text()) == summary
        for line in (out / "judge" / "preferences.jsonl").read_text().splitlines():
            pair = json.loads(line)
            assert pair["chosen"] != pair["rejected"] and len(set(pair["verdicts"].values())) == 1
    finally:
        Path(plan).unlink(missing_ok=True)


def test_preference_pairs_tokenize_into_aligned_masked_shards(tmp_path):
    import numpy as np

    from phi3data.tokenization.dataset import PackedDataset
    from phi3data.tokenization.shards import open_shards
    from phi3data.tokenization.tokenizers import get_tokenizer

    pairs = [{"prompt": f"Explain topic {i}.", "chosen": f"A clear answer number {i}.", "rejected": f"Meh {i}."}
             for i in range(3)]
    pairs.append({"prompt": "Missing its rejected side", "chosen": "fine"})  # rejected on both sides
    source = tmp_path / "preferences.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    result = CliRunner().invoke(app, ["tokenize", str(source), "--output", str(tmp_path / "tok"), "--preferences",
                                      "--no-progress"], terminal_width=200)
    assert result.exit_code == 0, result.output
    tok = get_tokenizer("phi3-mini")
    for side, expected in (("chosen", "A clear answer number"), ("rejected", "Meh")):
        [shard] = open_shards(tmp_path / "tok" / side)
        assert len(shard) == 3, side  # the same three pairs on both sides
        trained = tok.decode(np.asarray(shard.tokens)[np.asarray(shard.mask) == 1])
        assert trained.count(expected) == 3 and "Explain topic" not in trained
        assert PackedDataset(tmp_path / "tok" / side, seq_len=8, shuffle=False).has_mask
    assert "rejects: bad_chat_record=1" in result.output
