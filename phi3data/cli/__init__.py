"""The ``phi3data`` command: every command is listed here; each plane's commands live in their own module.

The modules import their libraries inside the commands, so ``phi3data run`` never loads torch, Spark or Ray, and
every command goes through one error handler (:mod:`phi3data.cli.errors`): a user error prints ``error: ...`` and
exits with code 2.
"""

from __future__ import annotations

import typer

from phi3data.cli import classify, curate, export, fetch, generate, images, model, report, sandbox, tokens
from phi3data.cli.errors import add_command


def _group(help: str) -> typer.Typer:
    return typer.Typer(help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


app = _group("phi3data: curate web data, tokenize it, and train compact phi-3 models on it. "
             "Each subcommand has its own --help with examples.")
classify_app = _group("Educational-value classifiers: annotate with an LLM, train, evaluate.")
model_app = _group("phi-3 model sizes and checkpoints.")
export_app = _group("Export checkpoints to other runtimes (GGUF for llama.cpp).")


@app.callback()
def main() -> None:
    """phi3data: curate web data, tokenize it, and train compact phi-3 models on it."""


@model_app.callback()
def _model_group() -> None:
    """phi-3 model sizes and checkpoints."""


@export_app.callback()
def _export_group() -> None:
    """Export checkpoints to other runtimes (GGUF for llama.cpp)."""


# Every command, in the order `phi3data --help` lists them: (group, name, function).
COMMANDS = [
    (app, "run", curate.run),
    (classify_app, "annotate", classify.annotate),
    (classify_app, "train", classify.train),
    (classify_app, "evaluate", classify.evaluate),
    (app, "generate", generate.generate),
    (app, "fetch", fetch.fetch),
    (app, "synth-images", images.synth_images),
    (app, "tokenize", tokens.tokenize),
    (app, "mix", tokens.mix),
    (model_app, "info", model.info),
    (app, "train", model.train),
    (app, "eval", model.eval_checkpoint),
    (app, "ablate", model.ablate),
    (export_app, "gguf", export.gguf),
    (app, "report", report.report),
    (app, "quickstart", curate.quickstart),
    (sandbox.app, "run", sandbox.run),
]

for _group_app, _name, _function in COMMANDS:
    add_command(_group_app, _name, _function)
app.add_typer(classify_app, name="classify")
app.add_typer(model_app, name="model")
app.add_typer(export_app, name="export")
app.add_typer(sandbox.app, name="sandbox")
