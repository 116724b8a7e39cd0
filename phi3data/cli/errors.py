"""The one error handler of the ``phi3data`` command.

A user error (a bad config, a missing file, a misspelt option value, a diverged training run, a missing optional
package) prints ``error: <message>`` on stderr and exits with :data:`USER_ERROR_EXIT`; anything else is a bug and
keeps its traceback. Every command is registered through :func:`add_command`, so the rule lives here only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click
import typer
from typer.core import TyperCommand

USER_ERROR_EXIT = 2

# Errors a user causes and can fix: configs (ConfigError, RecipeError, MixError ... are ValueErrors) and paths.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                                PermissionError)

# Domain errors that are not ValueErrors, as (module, class name). They live in modules that import heavy packages,
# so they are looked up only in modules already imported: an exception of that class implies its module is loaded.
DOMAIN_ERRORS = (
    ("phi3data.training.trainer", "TrainingDiverged"),
    ("phi3data.generators.client", "LLMError"),
    ("phi3data.io.writers", "OutputLocked"),
    ("phi3data.generators.sandbox", "CodeExecutionRefused"),
    ("phi3data.export.quantize", "QuantizeError"),
)

# Optional packages and the extra that installs them, for a clear message when a command needs one.
EXTRAS = {
    "torch": "train", "safetensors": "train", "gguf": "train", "matplotlib": "train", "scipy": "train", "triton": "gpu",
    "pyspark": "spark", "ray": "ray", "datasets": "hf", "trafilatura": "trafilatura",
    "sentencepiece": "tokenize", "tokenizers": "tokenize", "tiktoken": "tokenize",
    "sklearn": "classify", "onnxruntime": "classify", "onnx": "classify", "httpx": "classify", "vllm": "vllm",
}


def _domain_errors() -> tuple[type[BaseException], ...]:
    found = []
    for module_name, class_name in DOMAIN_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, class_name):
            found.append(getattr(module, class_name))
    return tuple(found)


def user_error_message(exc: BaseException) -> str | None:
    """The message to show for a user error, or None when ``exc`` is unexpected (a bug: show the traceback)."""
    if isinstance(exc, ModuleNotFoundError):
        package = (exc.name or "").partition(".")[0]
        if package in EXTRAS:
            return f"this command needs {package}, which is not installed: pip install 'phi3data[{EXTRAS[package]}]'"
        return None
    if isinstance(exc, USER_ERRORS + _domain_errors()):
        return str(exc) or type(exc).__name__
    if isinstance(exc, RuntimeError) and isinstance(exc.__cause__ or exc.__context__, ImportError):
        return str(exc)  # the library's own "needs pip install ..." message for an optional package
    return None


class PhiCommand(TyperCommand):
    """A typer command whose user errors end as ``error: <message>`` and exit code 2, without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            message = user_error_message(exc)
            if message is None:
                raise
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(USER_ERROR_EXIT) from None


def add_command(group: typer.Typer, name: str, function: Callable[..., Any]) -> None:
    """Register ``function`` as command ``name`` of ``group`` behind the error handler."""
    group.command(name, cls=PhiCommand)(function)
