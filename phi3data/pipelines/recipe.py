"""Pipeline recipes: TOML files validated into stages, with a stable config hash."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from phi3data.pipelines import stages as _builtin_stages  # noqa: F401  (registers the stages)
from phi3data.pipelines.base import STAGES, Stage


class RecipeError(ValueError):
    """A recipe that cannot run, with a message that says what to fix."""


class InputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["auto", "warc", "jsonl", "parquet", "arrow"] = "auto"
    source: str | None = None
    """The ``source`` column; defaults to the input shard's path relative to the input root."""
    max_document_bytes: int = Field(10_000_000, gt=0)
    text_key: str = "text"
    id_key: str = "id"
    url_key: str = "url"


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["parquet", "jsonl"] = "parquet"
    compression: str = "zstd"
    batch_size: int = Field(256, gt=0)
    """Documents per batch pushed through the stages."""


class PipelineInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""


class Recipe(BaseModel):
    """A validated pipeline recipe."""

    model_config = ConfigDict(extra="forbid")
    pipeline: PipelineInfo
    input: InputConfig = InputConfig()
    output: OutputConfig = OutputConfig()
    stage: list[dict[str, Any]] = []

    def build_stages(self) -> list[Stage]:
        return [_build_stage(i, spec) for i, spec in enumerate(self.stage)]

    def canonical(self) -> dict:
        """Everything that decides the output, with defaults filled in."""
        stages = [{"type": s.type_name, "name": s.name, "params": s.params.model_dump(mode="json")}
                  for s in self.build_stages()]
        return {"input": self.input.model_dump(mode="json"), "output": self.output.model_dump(mode="json"),
                "stages": stages}

    def config_hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _build_stage(index: int, spec: dict[str, Any]) -> Stage:
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind is None:
        raise RecipeError(f"stage #{index + 1} has no 'type'; known stage types: {', '.join(sorted(STAGES))}")
    if kind not in STAGES:
        raise RecipeError(f"stage #{index + 1}: unknown stage type {kind!r}; known: {', '.join(sorted(STAGES))}")
    name = spec.pop("name", None)
    cls = STAGES[kind]
    try:
        params = cls.Params(**spec)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or kind}: {e['msg']}" for e in exc.errors())
        raise RecipeError(f"stage #{index + 1} ({kind}): bad parameter: {problems}") from None
    return cls(params, name=name)


def load_recipe(source: str | Path | dict) -> Recipe:
    """Load and validate a recipe from a TOML path, TOML text, or a dict."""
    if isinstance(source, dict):
        data = source
        where = "recipe"
    else:
        path = Path(source)
        if not path.exists():
            raise RecipeError(f"recipe not found: {path}")
        where = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"{where}: not valid TOML: {exc}") from None
    try:
        recipe = Recipe(**data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise RecipeError(f"{where}: {problems}") from None
    if not recipe.stage:
        raise RecipeError(f"{where}: the recipe has no [[stage]] entries")
    recipe.build_stages()  # validates every stage now, not in a worker later
    return recipe
