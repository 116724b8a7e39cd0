"""Pipelines: stages that map a document batch to a batch, and the Pipeline that chains them.

``as_arrow_udf(recipe)`` turns a recipe into a function for your own Ray Data / Spark jobs (see ``udf``).
"""

__all__ = ["ArrowUDF", "as_arrow_udf"]


def __getattr__(name: str):
    # imported on first use: the stages (and pydantic) load only when asked for
    if name in __all__:
        from phi3data.pipelines import udf

        return getattr(udf, name)
    raise AttributeError(f"module 'phi3data.pipelines' has no attribute {name!r}")
