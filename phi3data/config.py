"""One way to load configuration: TOML files into strict pydantic models, with one error format.

Every recipe a user writes (pipelines, classifiers, mixes, training, ladders) is read with :func:`read_toml` and
validated with :func:`validate` (or both at once with :func:`load_toml`). A problem raises :class:`ConfigError`
naming the file, the field and what is wrong, e.g. ``model/train.toml: train.max_step: unknown field``.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A configuration that cannot be used, with a message naming the file and field to fix."""


class StrictModel(BaseModel):
    """Base of every user-facing config section: unknown (misspelt) fields are errors, not ignored."""

    model_config = ConfigDict(extra="forbid")


M = TypeVar("M", bound=BaseModel)


def read_toml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error is a :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None


def format_validation_error(exc: ValidationError, where: str, prefix: str = "") -> str:
    """One line per problem: ``where: section.field: message``."""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        problems.append(f"{loc or '(top level)'}: {msg}")
    return f"{where}: " + "; ".join(problems)


def validate(model: type[M], data: dict[str, Any], where: str, prefix: str = "") -> M:
    """Validate ``data`` into ``model``; errors become one :class:`ConfigError` naming ``where`` and each field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix or 'config'} must be a table, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where, prefix)) from None


def load_toml(path: str | Path, model: type[M], what: str = "config") -> M:
    """Read a TOML file and validate it into ``model``."""
    return validate(model, read_toml(path, what), str(path))


def check_keys(given: Iterable[str], known: Iterable[str], where: str) -> None:
    """Refuse keys outside ``known``, suggesting the closest known name (for configs that are not pydantic)."""
    known = sorted(set(known))
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        parts.append(f"{key} (did you mean {close[0]}?)" if close else key)
    raise ConfigError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(parts)}")
