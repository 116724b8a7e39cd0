"""Pipeline recipes: TOML files validated into stages, with a stable config hash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from phi3data.config import ConfigError, StrictModel, format_validation_error, read_toml, validate
from phi3data.pipelines.base import Stage
from phi3data.pipelines.stages import stage_class, stage_types

EXTRACT_STAGES = ("extract", "extract_interleaved")


class RecipeError(ConfigError):
    """A recipe that cannot run, with a message that says what to fix."""


MULTIMODAL_FORMATS = ("llava", "cauldron", "webdataset", "warc_images", "urls", "records")
"""Image-text readers (:mod:`phi3data.multimodal.readers`): their records go through the stages as they are."""


class InputConfig(StrictModel):
    format: Literal["auto", "warc", "jsonl", "parquet", "arrow", "llava", "cauldron", "webdataset",
                    "warc_images", "urls", "records"] = "auto"
    """Text formats (auto, warc, jsonl, parquet, arrow) give documents; the image-text formats give records of
    their kind: llava and cauldron conversations, webdataset pairs, warc_images images, urls URL rows, and
    records any kind our writers wrote (image-text parquet)."""
    image_root: str | None = None
    """format = "llava": the folder image paths are relative to (default: the JSON file's folder)."""
    source: str | None = None
    """The ``source`` column; defaults to the input shard's path relative to the input root."""
    max_document_bytes: int = Field(10_000_000, gt=0)
    text_key: str = "text"
    id_key: str = "id"
    url_key: str = "url"


class OutputConfig(StrictModel):
    format: Literal["parquet", "jsonl"] = "parquet"
    compression: str = "zstd"
    batch_size: int = Field(256, gt=0)
    """Documents per batch pushed through the stages."""


class PipelineInfo(StrictModel):
    name: str
    description: str = ""


class Recipe(StrictModel):
    """A validated pipeline recipe."""

    pipeline: PipelineInfo
    input: InputConfig = InputConfig()
    output: OutputConfig = OutputConfig()
    stage: list[dict[str, Any]] = []

    def build_stages(self) -> list[Stage]:
        return [_build_stage(i, spec) for i, spec in enumerate(self.stage)]

    def canonical(self) -> dict:
        """Everything that decides the output, with defaults filled in, including what each stage loads (the
        content hashes of its model files), so the same recipe over a retrained model is a different recipe."""
        stages = []
        for stage in self.build_stages():
            entry = {"type": stage.type_name, "name": stage.name, "params": stage.params.model_dump(mode="json")}
            if loads := stage.identity():
                entry["loads"] = loads
            stages.append(entry)
        cfg_in = self.input.model_dump(mode="json")
        if cfg_in["image_root"] is None:  # text recipes keep the hashes they had before image inputs existed
            del cfg_in["image_root"]
        return {"input": cfg_in, "output": self.output.model_dump(mode="json"), "stages": stages}

    def extracts_html(self) -> bool:
        """True when a stage turns WARC HTML into text (a WARC input needs one)."""
        return any(spec.get("type") in EXTRACT_STAGES for spec in self.stage)

    def config_hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _build_stage(index: int, spec: dict[str, Any]) -> Stage:
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind is None:
        raise RecipeError(f"stage #{index + 1} has no 'type'; known stage types: {', '.join(stage_types())}")
    cls = stage_class(kind)
    if cls is None:
        raise RecipeError(f"stage #{index + 1}: unknown stage type {kind!r}; known: {', '.join(stage_types())}")
    name = spec.pop("name", None)
    try:
        params = cls.Params(**spec)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, f"stage #{index + 1} ({kind}): bad parameter")) from None
    return cls(params, name=name)


def load_recipe(source: str | Path | dict) -> Recipe:
    """Load and validate a recipe from a TOML path or a dict; errors name the file, the stage and the field."""
    if isinstance(source, dict):
        data, where = source, "recipe"
    else:
        where = str(source)
        try:
            data = read_toml(source, "recipe")
        except ConfigError as exc:
            raise RecipeError(str(exc)) from None
    try:
        recipe = validate(Recipe, data, where)
    except ConfigError as exc:
        raise RecipeError(str(exc)) from None
    if not recipe.stage:
        raise RecipeError(f"{where}: the recipe has no [[stage]] entries")
    if recipe.input.format == "warc" and not recipe.extracts_html():
        raise RecipeError(f"{where}: [input] format = 'warc' needs an extract stage first: WARC records are HTML "
                          f"(add [[stage]] type = \"extract\")")
    if recipe.input.image_root is not None and recipe.input.format != "llava":
        raise RecipeError(f"{where}: [input] image_root is read only with format = 'llava' (this recipe reads "
                          f"{recipe.input.format!r})")
    try:
        recipe.build_stages()  # validates every stage now, not in a worker later
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    return recipe
