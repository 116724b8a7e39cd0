"""Render a report: pick the builder for the directory's kind, fill its Jinja2 template (autoescaped), write one
self-contained HTML file atomically."""

from __future__ import annotations

import base64
import datetime
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from phi3data import __version__
from phi3data.io.writers import write_text_atomic
from phi3data.report.detect import ReportError, detect_kind

REPORT_NAME = "report.html"
COMPARE_NAME = "report-compare.html"


def environment() -> Environment:
    env = Environment(loader=PackageLoader("phi3data.report", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True), trim_blocks=True,
                      lstrip_blocks=True)
    env.filters["num"] = lambda v: "–" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:,.4g}")
    env.filters["pct"] = lambda v: "–" if v is None else f"{v:.1f}%"
    return env


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render(template: str, context: dict) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return environment().get_template(template).render(version=__version__, generated=stamp, **context)


def build_context(directory: Path, input_path: Path | None = None) -> dict:
    kind = detect_kind(directory)
    if kind == "curation":
        from phi3data.report import curation

        return curation.build(directory, input_path)
    if kind == "generation":
        from phi3data.report import generation

        return generation.build(directory)
    if kind == "tokens":
        from phi3data.report import tokens

        return tokens.build(directory)
    from phi3data.report import ladder

    return ladder.build(directory)


def write_report(directory: Path, *, output: Path | None = None, input_path: Path | None = None) -> Path:
    """Write the report of ``directory`` (default ``directory/report.html``) and return its path."""
    directory = Path(directory)
    context = build_context(directory, input_path)
    return write_text_atomic(Path(output) if output else directory / REPORT_NAME,
                  render(f"{context['kind']}.html.j2", context))


def write_compare(directories: list[Path], *, output: Path | None = None) -> Path:
    """Several curation runs on one page (default: ``report-compare.html`` beside the first directory)."""
    from phi3data.report import compare

    directories = [Path(d) for d in directories]
    if len(directories) < 2:
        raise ReportError("--compare needs at least two directories")
    context = compare.build(directories)
    target = Path(output) if output else directories[0].resolve().parent / COMPARE_NAME
    return write_text_atomic(target, render("compare.html.j2", context))
