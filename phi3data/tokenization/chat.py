"""Phi-3's chat format with a loss mask that covers only what the assistant says.

A conversation renders as ``<|system|>\\n{s}<|end|>\\n<|user|>\\n{q}<|end|>\\n<|assistant|>\\n{a}<|end|>\\n`` ... and
ends with the end-of-document token. The mask is 1 on each assistant reply and the ``<|end|>`` that closes it
(and on the final end-of-document token when the last turn is the assistant's), 0 everywhere else.

Tokenizers split text on special tokens before anything else, so encoding the conversation piece by piece at
special-token boundaries gives exactly the ids of encoding the rendered string in one go (tests check this
against the reference tokenizers); the pieces tell which ids are the assistant's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from phi3data.tokenization.tokenizers import Tokenizer

ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered (unknown role, non-string content, no messages)."""


def render(messages: Sequence[dict], eos: str = "<|endoftext|>") -> str:
    """The conversation as one string in phi-3's template, ending with ``eos``."""
    return "".join(text for text, _ in _pieces(messages, eos))


def _pieces(messages: Sequence[dict], eos: str) -> list[tuple[str, bool]]:
    if not messages:
        raise ChatFormatError("a conversation needs at least one message")
    pieces: list[tuple[str, bool]] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatFormatError(f"message {i}: content must be a string, got {type(content).__name__}")
        trained = role == "assistant"
        pieces += [(f"<|{role}|>", False), ("\n" + content, trained), ("<|end|>", trained), ("\n", False)]
    pieces.append((eos, messages[-1].get("role") == "assistant"))
    return pieces


def encode_chat(messages: Sequence[dict], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and the assistant-only loss mask (uint8) of one conversation."""
    eos_name = next((k for k, v in tokenizer.special_tokens.items() if v == tokenizer.eos_id), None)
    if eos_name is None:
        raise ChatFormatError(f"tokenizer {tokenizer.name} has no name for its end token {tokenizer.eos_id}")
    for role in ("<|user|>", "<|assistant|>", "<|end|>"):
        if role not in tokenizer.special_tokens:
            raise ChatFormatError(f"tokenizer {tokenizer.name} has no {role} token; it cannot encode phi-3 chat")
    ids: list[int] = []
    mask: list[int] = []
    strip_next = False
    for text, trained in _pieces(messages, eos_name):
        special = tokenizer.special_tokens.get(text)
        if special is not None:
            piece_ids = [special]
            strip_next = text in tokenizer.rstrip_tokens
        else:
            if strip_next:
                text = text.lstrip()
                strip_next = False
            # Content may itself contain special-token strings; they are encoded as the template would.
            piece_ids = tokenizer.encode_special(text) if text else []
        ids += piece_ids
        mask += [int(trained)] * len(piece_ids)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)
