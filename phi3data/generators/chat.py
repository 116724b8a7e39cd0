"""Multi-turn chat SFT conversations in phi-3's format, built one turn at a time through ``generate``.

A plan with a ``[chat]`` section generates, per request of the plan, one conversation:

- step 0 is the plan's own requests: each reply is the conversation's opening user message (the style template
  asks the model for a question a given audience would ask about the topic);
- then, for each turn, the model answers as the assistant (system + the conversation so far), and, except after
  the last turn, writes the user's next message from ``followup_template``.

Every step is an ordinary ``generate`` call into its own folder under ``chat/`` with its own ledger, and every
request is keyed by its content (which includes the conversation so far), so a killed run resumes with nothing
re-sent and nothing lost. Conversations land in ``chat/data`` as records with ``messages`` (system, user,
assistant ...) that ``phi3data tokenize --chat`` turns into masked shards; a conversation whose step failed is
listed in ``chat/failures`` with the step.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from phi3data.generators.plan import GenerationPlan
from phi3data.generators.requests import GenRequest
from phi3data.io.writers import write_json_atomic, write_jsonl_atomic

CHAT_DIR = "chat"
GenerateStep = Callable[[str, list[GenRequest]], tuple[list[str], dict[str, dict]]]
"""Sends one step's requests exactly once into ``chat/<step>`` and returns their keys and ledger rows."""


def _seed_of(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:4], "big") % (2 ** 31)


def _transcript(messages: list[dict]) -> str:
    return "\n\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages if m["role"] != "system")


def build_conversations(plan: GenerationPlan, requests: Sequence[GenRequest], keys: Sequence[str],
                        rows: dict[str, dict], output: Path, generate_step: GenerateStep) -> dict:
    """Run the assistant and follow-up steps of a chat plan and write the conversations; returns a summary."""
    chat = plan.chat
    system = [{"role": "system", "content": chat.assistant_system}] if chat.assistant_system else []
    convos: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for request, key in zip(requests, keys):
        row = rows.get(key)
        if row is None or row.get("status") != "ok" or not row["text"].strip():
            failed[key] = "opening:" + (row or {}).get("error_class", "no_reply" if row is None else "empty")
            continue
        convos[key] = {"request": request, "messages": system + [{"role": "user", "content": row["text"].strip()}],
                       "keys": [key]}
    max_tokens = chat.max_tokens or plan.sampling.max_tokens
    for turn in range(1, chat.turns + 1):
        for role in ("assistant", "user"):
            if role == "user" and turn == chat.turns:
                break
            step = f"turn-{turn}-{role}"
            live = [k for k in convos if k not in failed]
            step_requests = []
            for i, conv_key in enumerate(live):
                convo = convos[conv_key]
                if role == "assistant":
                    messages = tuple(convo["messages"])
                else:
                    cell = convo["request"].cell
                    prompt = plan.followup_template.render(conversation=_transcript(convo["messages"]),
                                                           topic=cell["topic"],
                                                           audience=plan.audiences[cell["audience"]])
                    messages = ({"role": "user", "content": prompt},)
                params = {"max_tokens": max_tokens, "temperature": plan.sampling.temperature,
                          "top_p": plan.sampling.top_p, "seed": _seed_of(conv_key, step)}
                template = plan.followup_template if role == "user" else None
                step_requests.append(GenRequest(
                    index=i, messages=messages, params=params, cell=dict(convo["request"].cell),
                    template_id=template.id if template else "chat-assistant",
                    template_hash=template.hash if template else "", seed_id=conv_key,
                    extra={"conversation": conv_key, "step": step}))
            if not step_requests:
                break
            step_keys, step_rows = generate_step(step, step_requests)
            for conv_key, step_key in zip(live, step_keys):
                row = step_rows.get(step_key)
                if row is None or row.get("status") != "ok" or not row["text"].strip():
                    failed[conv_key] = f"{step}:" + ((row or {}).get("error_class") or "empty")
                    continue
                convos[conv_key]["messages"].append({"role": role, "content": row["text"].strip()})
                convos[conv_key]["keys"].append(step_key)
    records, failures = [], []
    for request, key in zip(requests, keys):
        if key in failed:
            failures.append({"id": f"{plan.name}-{key[:24]}", "step": failed[key].split(":")[0],
                             "error_class": failed[key].split(":", 1)[1],
                             "cell": json.dumps(request.cell, sort_keys=True)})
            continue
        convo = convos[key]
        meta = {"plan": plan.name, "cell": request.cell, "template_id": request.template_id,
                "template_hash": request.template_hash, "seed_id": request.seed_id, "request_keys": convo["keys"],
                "turns": plan.chat.turns}
        records.append({"id": f"{plan.name}-{key[:24]}", "messages": convo["messages"],
                        "source": f"synthetic/{plan.name}", "metadata": json.dumps(meta, sort_keys=True)})
    write_jsonl_atomic(output / CHAT_DIR / "data" / "conversations.jsonl", records)
    write_jsonl_atomic(output / CHAT_DIR / "failures" / "failures.jsonl", failures)
    summary = {"conversations": len(records), "failed": len(failures),
               "failed_by_step": dict(Counter(f["step"] for f in failures)), "turns": plan.chat.turns}
    write_json_atomic(output / CHAT_DIR / "summary.json", summary)
    return summary

