"""Built-in stages. Importing this package registers them for recipes."""

from phi3data.pipelines.stages import (  # noqa: F401
    decontaminate,
    dedup,
    edu,
    extract,
    heuristics,
    image,
    image_models,
    interleaved,
    knowledge,
    language,
    length,
    synthetic,
    urls,
)
