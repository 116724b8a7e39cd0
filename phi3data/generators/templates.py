"""Prompt templates kept as files: Jinja2 text with an id (the file's stem) and a content hash.

A template is parsed when a plan loads, so a syntax error or a variable that the plan's seeds do not provide is a
:class:`~phi3data.config.ConfigError` naming the template file and line before anything is sent. Rendering is
strict: an undefined variable is an error, and so is printing a value that is ``None`` (guard optional values with
``{% if title %}``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta

from phi3data.config import ConfigError


def _refuse_none(value: Any) -> Any:
    if value is None:
        raise ValueError("a variable printed by the template is empty (None); guard it with {% if ... %}")
    return value


ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                         keep_trailing_newline=False, autoescape=False, finalize=_refuse_none)


@dataclass(frozen=True)
class PromptTemplate:
    """A parsed template file."""

    id: str
    path: Path
    hash: str
    """SHA-256 of the file's bytes: any edit changes it (and so every request rendered from it)."""
    source: str = field(repr=False)
    variables: frozenset[str]
    """Names the template reads from its context."""
    compiled: jinja2.Template = field(repr=False)

    def line_of(self, name: str) -> int:
        """The first line where the template uses the variable ``name`` (1 if it cannot be found)."""
        for lineno, kind, value in ENV.lex(self.source):
            if kind == "name" and value == name:
                return lineno
        return 1

    def render(self, **context: Any) -> str:
        """The prompt for one seed; an error names the template file and line."""
        try:
            return self.compiled.render(**context).strip()
        except jinja2.TemplateError as exc:
            raise ConfigError(f"{self.path}: cannot render: {exc}") from None
        except ValueError as exc:
            raise ConfigError(f"{self.path}:{_error_line(exc, self.path)}: cannot render: {exc}") from None


def _error_line(exc: BaseException, path: Path) -> int:
    """The template line a render error happened on, from the traceback Jinja rewrites to the template file."""
    line = 1
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == str(path):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def load_template(path: Path, field: str) -> PromptTemplate:
    """Read and parse a template file; ``field`` (e.g. ``styles.wikihow``) is named in errors."""
    if not path.is_file():
        raise ConfigError(f"{path}: {field}: template file not found")
    data = path.read_bytes()
    try:
        source = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {field}: template is not UTF-8 text: {exc}") from None
    try:
        tree = ENV.parse(source, name=path.name, filename=str(path))
        code = ENV.compile(tree, name=path.name, filename=str(path))
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: {field}: template does not parse: {exc.message}") from None
    compiled = ENV.template_class.from_code(ENV, code, ENV.make_globals(None))
    return PromptTemplate(id=path.stem, path=path, hash=hashlib.sha256(data).hexdigest(), source=source,
                          variables=frozenset(meta.find_undeclared_variables(tree)), compiled=compiled)


def check_variables(template: PromptTemplate, provided: set[str], field: str, who: str) -> None:
    """Refuse a template that reads a variable ``who`` (a seed source) does not provide, naming its line."""
    missing = sorted(template.variables - provided)
    if missing:
        name = missing[0]
        raise ConfigError(f"{template.path}:{template.line_of(name)}: {field}: template variable {name!r} is not "
                          f"provided by {who} (it provides: {', '.join(sorted(provided))})")
