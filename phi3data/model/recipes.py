"""Model size recipes: TOML files of :class:`Phi3Config` fields, shipped with the package.

A model recipe is a TOML file with a ``[model]`` table of :class:`Phi3Config` fields, or a ladder file with
``[sizes.<name>]`` tables (shared fields in ``[model]``). References:

* ``"phi-3-mini"`` or ``"phi-3-mini.toml"`` — a single-size recipe;
* ``"ladder-cpu:s2"`` — size ``s2`` of the ladder file ``ladder-cpu.toml``;
* a path to any such file, e.g. ``"my/sizes.toml:big"``.

A name is looked up as an explicit path, then in ``base_dir`` (a training config's folder), then in ``./model``
of the working directory, then among the sizes shipped in ``phi3data/model/sizes`` (phi-3-mini, -mini-128k,
-small, -medium, ladder-cpu, ladder-gpu). ``model/<name>.toml`` also finds a shipped size, as it did when the
sizes lived in the repository's ``model/`` folder.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from phi3data.config import ConfigError, read_toml
from phi3data.model.model import Phi3Config


def packaged_sizes() -> Path:
    """The folder of model sizes shipped with phi3data."""
    return Path(str(resources.files("phi3data.model") / "sizes"))


def _find(name: str, base_dir: Path | None) -> Path:
    shipped = packaged_sizes()
    dirs = [d for d in (base_dir, Path.cwd() / "model") if d is not None]
    candidates = [Path(name)] + [d / n for d in dirs for n in (name, f"{name}.toml")]
    if Path(name).parent in (Path("."), Path("model")):  # a bare name, or model/<name> as before the move
        candidates += [shipped / Path(name).name, shipped / f"{Path(name).name}.toml"]
    for c in candidates:
        if c.is_file():
            return c
    looked = ", ".join(str(d) for d in [*dirs, shipped])
    raise FileNotFoundError(f"model recipe {name!r} not found (looked in {looked})")


def load_model_dict(ref: str, base_dir: Path | None = None) -> dict[str, Any]:
    """Resolve a recipe reference to a dict of config fields; a field Phi3Config lacks is a ConfigError."""
    name, _, size = ref.partition(":")
    path = _find(name, base_dir)
    data = read_toml(path, "model recipe")
    fields = dict(data.get("model", {}))
    Phi3Config.check_names(fields, str(path), "model.")
    if size:
        sizes = data.get("sizes", {})
        if size not in sizes:
            raise ConfigError(f"{path}: size {size!r} not in {name}; available: {', '.join(sizes)}")
        Phi3Config.check_names(sizes[size], str(path), f"sizes.{size}.")
        fields.update(sizes[size])
        fields.setdefault("name", f"{Path(name).stem}:{size}")
    elif "sizes" in data and not data.get("model"):
        raise ValueError(f"{name} is a ladder; name a size: {', '.join(f'{name}:{s}' for s in data['sizes'])}")
    fields.setdefault("name", Path(name).stem)
    return fields


def load_model_config(ref: str, base_dir: Path | None = None, **overrides: Any) -> Phi3Config:
    fields = load_model_dict(ref, base_dir)
    fields.update(overrides)
    return Phi3Config.from_dict(fields, f"model {ref!r} with overrides" if overrides else f"model {ref!r}")


def ladder_sizes(ref: str, base_dir: Path | None = None) -> list[str]:
    """The size names of a ladder file, in file order."""
    return list(read_toml(_find(ref, base_dir), "model recipe").get("sizes", {}))
