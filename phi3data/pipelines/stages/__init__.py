"""Built-in stages. Importing this package registers them for recipes."""

from phi3data.pipelines.stages import decontaminate, dedup, edu, extract, heuristics, language, length, synthetic, urls  # noqa: F401
