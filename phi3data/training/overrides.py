"""``key=value`` command-line overrides for training configs (values parsed as TOML scalars)."""

from __future__ import annotations

import tomllib
from typing import Any


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["max_steps=10", "out_dir=runs/x", "model.hidden_size=128"]`` -> dict; bare words stay strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out
