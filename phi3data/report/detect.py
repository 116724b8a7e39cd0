"""Which kind of output a directory holds, from its files alone."""

from __future__ import annotations

import json
from pathlib import Path

KINDS = ("curation", "generation", "tokens", "ladder")


class ReportError(ValueError):
    """A directory the report cannot describe (a user error: the message says what was expected)."""


def _manifest(directory: Path) -> dict | None:
    path = directory / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path} is not readable JSON ({exc})") from None


def detect_kind(directory: Path) -> str:
    """``curation`` | ``generation`` | ``tokens`` | ``ladder``; a ReportError names what was looked for."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ReportError(f"{directory} is not a directory: give the output directory of a phi3data command")
    if (directory / "plan.json").is_file() and (directory / "runs").is_dir():
        return "ladder"
    manifest = _manifest(directory)
    if manifest is not None:
        if "recipe_hash" in manifest and "pipeline" in manifest and (directory / "stats.json").is_file():
            return "curation"
        if "plan" in manifest and "requests" in manifest:
            return "generation"
        if manifest.get("format") == "phi3data-tokens":
            return "tokens"
    # a mix output: one sub-directory of token shards per phase
    if any(_is_mix_phase(sub) for sub in sorted(directory.iterdir()) if sub.is_dir()):
        return "tokens"
    raise ReportError(
        f"{directory} holds no phi3data output the report knows: expected a curation run (manifest.json + "
        f"stats.json from `phi3data run`), a generation run (manifest.json + ledger from `phi3data generate`), token "
        f"shards (manifest.json from `phi3data tokenize` / `phi3data mix`) or an ablation ladder (plan.json + runs/ "
        f"from `phi3data ablate`)")


def _is_mix_phase(directory: Path) -> bool:
    try:
        manifest = _manifest(directory)
    except ReportError:
        return False
    return manifest is not None and manifest.get("format") == "phi3data-tokens"
