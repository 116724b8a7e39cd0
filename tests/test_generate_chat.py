"""Chat SFT conversations from the shipped plan against the real llama.cpp server (SmolLM2-135M) on 127.0.0.1:
built turn by turn, resumed with nothing re-sent, and tokenized into masked shards the trainer reads. The model is
small: these check mechanics, not the quality of what it says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import MODEL, shipped_plan
from typer.testing import CliRunner

from phi3data.cli import app
from phi3data.generators.ledger import ledger_lines


def _small_chat_plan(tmp_path: Path) -> Path:
    """The shipped chat plan, cut to 2 conversations of 2 turns with short replies."""
    return shipped_plan("chat.toml", tmp_path / "plans", [
        ('topics = ["photosynthesis", "compound interest", "the French Revolution", "Python lists", '
         '"healthy sleep"]', 'topics = ["photosynthesis", "compound interest"]'),
        ('audiences = ["student", "professional"]', 'audiences = ["student"]'),
        ("quota = 2 ", "quota = 1 "), ("max_tokens = 160", "max_tokens = 40")])


def _all_ledger_lines(out: Path) -> int:
    return sum(len(list(ledger_lines(folder))) for folder in [out, *sorted((out / "chat").glob("turn-*"))])


def test_chat_plan_builds_multi_turn_conversations_resumes_and_tokenizes(llama_server, tmp_path):
    plan = _small_chat_plan(tmp_path)
    try:
        out = tmp_path / "chat"
        args = ["generate", str(plan), "--output", str(out), "--base-url", llama_server, "--model", MODEL,
                "--concurrency", "2", "--no-progress"]
        first = CliRunner().invoke(app, args, terminal_width=200)
        assert first.exit_code == 0, first.output
        assert "chat: 2 conversations of 2 turns" in first.output
        conversations = [json.loads(line) for line in
                         (out / "chat" / "data" / "conversations.jsonl").read_text().splitlines()]
        assert len(conversations) == 2
        for convo in conversations:
            roles = [m["role"] for m in convo["messages"]]
            assert roles == ["system", "user", "assistant", "user", "assistant"]
            assert all(m["content"].strip() for m in convo["messages"])
            meta = json.loads(convo["metadata"])
            assert len(meta["request_keys"]) == 4 and meta["cell"]["style"] == "question"
        # steps of a conversation: opening, assistant, follow-up, assistant — 4 requests each, sent once
        sent = _all_ledger_lines(out)
        assert sent == 8

        again = CliRunner().invoke(app, args, terminal_width=200)
        assert again.exit_code == 0, again.output
        assert _all_ledger_lines(out) == sent, "a rerun re-sent requests that were answered"
        assert [json.loads(line) for line in
                (out / "chat" / "data" / "conversations.jsonl").read_text().splitlines()] == conversations

        tokens = tmp_path / "tokens"
        tokenized = CliRunner().invoke(app, ["tokenize", str(out / "chat" / "data"), "--output", str(tokens),
                                             "--chat", "--no-progress"], terminal_width=200)
        assert tokenized.exit_code == 0, tokenized.output
        from phi3data.tokenization.dataset import PackedDataset
        from phi3data.tokenization.shards import open_shards
        from phi3data.tokenization.tokenizers import get_tokenizer

        [shard] = open_shards(tokens)
        tok = get_tokenizer("phi3-mini")
        trained = tok.decode(np.asarray(shard.tokens)[np.asarray(shard.mask) == 1])
        # the loss covers the assistant's replies and nothing the user or the system said
        for convo in conversations:
            for message in convo["messages"]:
                if message["role"] == "assistant":
                    assert message["content"][:20] in trained
        assert conversations[0]["messages"][1]["content"][:20] not in trained
        data = PackedDataset(tokens, seq_len=16, shuffle=False)
        x, y = data.batch(0, 1)
        assert data.has_mask and x.shape == (1, 16) and (y == -100).any()
    finally:
        plan.unlink(missing_ok=True)
