"""Built-in stages, by type name. A stage's module is imported the first time a recipe names it, so a run (and
each of its workers) loads only the stages it uses: the image and decontamination stages pull in much more than
a web-text recipe needs."""

from __future__ import annotations

import importlib

from phi3data.pipelines.base import STAGES, Stage

BUILTIN: dict[str, str] = {
    "decontaminate": "decontaminate",
    "exact_dedup": "dedup", "line_dedup": "dedup", "minhash_dedup": "dedup",
    "edu_score": "edu", "edu_threshold": "edu",
    "extract": "extract",
    "gopher_repetition": "heuristics", "gopher_quality": "heuristics", "c4_quality": "heuristics",
    "fineweb_quality": "heuristics",
    "image_decode": "image", "image_dedup": "image", "image_resize": "image", "image_size": "image",
    "image_nsfw": "image_models", "image_ocr": "image_models", "image_text_similarity": "image_models",
    "extract_interleaved": "interleaved", "image_url_frequency": "interleaved",
    "knowledge_signals": "knowledge", "knowledge_threshold": "knowledge",
    "language": "language",
    "length": "length",
    "regurgitation": "synthetic", "synthetic_cleanup": "synthetic", "truncated": "synthetic",
    "url_blocklist": "urls",
}
"""Stage type name -> the module under ``phi3data.pipelines.stages`` that registers it."""


def stage_class(kind: str) -> type[Stage] | None:
    """The stage class registered as ``kind`` (built in, or registered by the user's own code); None if unknown."""
    if kind not in STAGES and kind in BUILTIN:
        importlib.import_module(f"{__name__}.{BUILTIN[kind]}")
    return STAGES.get(kind)


def stage_types() -> list[str]:
    """Every stage type a recipe can name."""
    return sorted(set(BUILTIN) | set(STAGES))
