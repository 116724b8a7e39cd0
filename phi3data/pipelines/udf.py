"""phi3data stages as an Arrow function for your own Ray Data or Spark jobs.

```python
udf = as_arrow_udf("pipelines/web_quality.toml")
ds = ds.map_batches(udf, batch_format="pyarrow")                          # Ray Data: Table in, Table out
df = df.mapInArrow(udf.map_in_arrow, udf.spark_schema(df.schema))         # Spark: RecordBatches in and out
kept = udf(table)                                                         # or any pyarrow Table, in process
```

Input rows need the core columns ``id``, ``text``, ``url`` and ``source`` (``metadata`` and ``html`` are
optional; other columns pass through). The output holds the kept rows with the columns the stages add. Rows a
stage rejects as bad input are dropped like filtered ones; run ``phi3data run`` to get them counted and written.
Stages load their models lazily, once per worker process. A recipe with a global stage (``edu_threshold``)
needs the whole dataset before it can decide, so it cannot run batch by batch and is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from phi3data.documents import CORE_SCHEMA
from phi3data.pipelines.base import GlobalStage, Stage
from phi3data.pipelines.recipe import Recipe, RecipeError, load_recipe

REQUIRED_COLUMNS = ("id", "text", "url", "source")
_STAGES: dict[tuple[str, str], list[Stage]] = {}  # per worker process: (recipe JSON, hash) -> its stages


class ArrowUDF:
    """A recipe's stages as a function over pyarrow Tables (see the module docstring for use)."""

    def __init__(self, recipe: Recipe | dict | str | Path):
        recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        global_stages = [s.name for s in recipe.build_stages() if isinstance(s, GlobalStage)]
        if global_stages:
            raise RecipeError(f"recipe {recipe.pipeline.name!r} has global stage(s) {', '.join(global_stages)}, "
                              "which need the whole dataset to decide and cannot run batch by batch; "
                              "run it with `phi3data run`, or drop those stages from the recipe")
        self.recipe_json = json.dumps(recipe.model_dump(mode="json"), sort_keys=True)
        self.recipe_hash = recipe.config_hash()
        """Includes the hashes of the model files the stages load; workers check they load the same ones."""

    def stages(self) -> list[Stage]:
        """This process's stages for the recipe (built once per process; only the recipe is pickled). A worker
        whose model files differ from the driver's (a classifier retrained meanwhile) refuses to run."""
        key = (self.recipe_json, self.recipe_hash)
        stages = _STAGES.get(key)
        if stages is None:
            recipe = load_recipe(json.loads(self.recipe_json))
            if recipe.config_hash() != self.recipe_hash:
                raise RuntimeError(f"the files recipe {recipe.pipeline.name!r} loads changed since this function was "
                                   f"made (hash {self.recipe_hash}, now {recipe.config_hash()}); make it again")
            stages = _STAGES[key] = recipe.build_stages()
        return stages

    def __call__(self, table: pa.Table) -> pa.Table:
        """Run the stages over one batch; returns the kept rows."""
        batch = _as_documents(table)
        for stage in self.stages():
            stage.ensure_setup()
            batch = stage.process(batch).batch
        return batch

    def output_schema(self, input_schema: pa.Schema = CORE_SCHEMA) -> pa.Schema:
        """The schema of the output for input of ``input_schema`` (the stages run once on an empty batch)."""
        return self(input_schema.empty_table()).schema

    def map_in_arrow(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """For Spark's ``mapInArrow``: RecordBatches in, RecordBatches out (plain, not large, strings)."""
        for record_batch in batches:
            kept = _spark_types(self(pa.Table.from_batches([record_batch])))
            yield from kept.to_batches()

    def spark_schema(self, input_schema):
        """The Spark ``StructType`` that ``map_in_arrow`` returns for a DataFrame of schema ``input_schema``."""
        from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

        arrow_schema = _spark_types(self.output_schema(to_arrow_schema(input_schema)).empty_table()).schema
        return from_arrow_schema(arrow_schema)

    def __repr__(self) -> str:
        return f"ArrowUDF({json.loads(self.recipe_json)['pipeline']['name']!r})"


def as_arrow_udf(recipe: Recipe | dict | str | Path) -> ArrowUDF:
    """A recipe (TOML path, dict or loaded ``Recipe``) as a function over pyarrow Tables."""
    return ArrowUDF(recipe)


def _as_documents(table: pa.Table) -> pa.Table:
    """Check the core columns, cast them to the core types and add a null ``metadata`` if missing."""
    missing = [name for name in REQUIRED_COLUMNS if name not in table.schema.names]
    if missing:
        raise ValueError(f"input rows need the columns {', '.join(REQUIRED_COLUMNS)}; missing: {', '.join(missing)}")
    if "metadata" not in table.schema.names:
        table = table.append_column(CORE_SCHEMA.field("metadata"), pa.nulls(table.num_rows, pa.string()))
    for field in CORE_SCHEMA:
        index = table.schema.get_field_index(field.name)
        if table.schema.field(index).type != field.type:
            table = table.set_column(index, field.name, table.column(index).cast(field.type))
    if "html" in table.schema.names and table.schema.field("html").type != pa.large_binary():
        table = table.set_column(table.schema.get_field_index("html"), "html",
                                 table.column("html").cast(pa.large_binary()))
    return table


def _spark_types(table: pa.Table) -> pa.Table:
    """Large string/binary columns as plain ones, the Arrow types Spark reads by default."""
    plain = {pa.large_string(): pa.string(), pa.large_binary(): pa.binary()}
    fields = [pa.field(f.name, plain.get(f.type, f.type), f.nullable) for f in table.schema]
    return table.cast(pa.schema(fields))

