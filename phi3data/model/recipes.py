"""Model size recipes: TOML files under the project's ``model/`` folder.

A model recipe is a TOML file with a ``[model]`` table of :class:`Phi3Config` fields, or a ladder file with
``[sizes.<name>]`` tables (shared fields in ``[model]``). References:

* ``"phi-3-mini"`` or ``"model/phi-3-mini.toml"`` — a single-size recipe;
* ``"ladder-cpu:s2"`` — size ``s2`` of the ladder file ``ladder-cpu.toml``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from phi3data.model.model import Phi3Config

RECIPE_DIR = Path(__file__).resolve().parents[2] / "model"


def _find(name: str, base_dir: Path | None) -> Path:
    candidates = [Path(name)]
    for d in (base_dir, Path.cwd() / "model", RECIPE_DIR):
        if d is not None:
            candidates += [d / name, d / f"{name}.toml"]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"model recipe {name!r} not found (looked in {base_dir}, ./model and {RECIPE_DIR})")


def load_model_dict(ref: str, base_dir: Path | None = None) -> dict[str, Any]:
    """Resolve a recipe reference to a dict of config fields."""
    name, _, size = ref.partition(":")
    data = tomllib.loads(_find(name, base_dir).read_text())
    fields = dict(data.get("model", {}))
    if size:
        sizes = data.get("sizes", {})
        if size not in sizes:
            raise KeyError(f"size {size!r} not in {name}; available: {', '.join(sizes)}")
        fields.update(sizes[size])
        fields.setdefault("name", f"{Path(name).stem}:{size}")
    elif "sizes" in data and not data.get("model"):
        raise ValueError(f"{name} is a ladder; name a size: {', '.join(f'{name}:{s}' for s in data['sizes'])}")
    fields.setdefault("name", Path(name).stem)
    return fields


def load_model_config(ref: str, base_dir: Path | None = None, **overrides: Any) -> Phi3Config:
    fields = load_model_dict(ref, base_dir)
    fields.update(overrides)
    return Phi3Config.from_dict(fields)


def ladder_sizes(ref: str, base_dir: Path | None = None) -> list[str]:
    """The size names of a ladder file, in file order."""
    data = tomllib.loads(_find(ref, base_dir).read_text())
    return list(data.get("sizes", {}))
