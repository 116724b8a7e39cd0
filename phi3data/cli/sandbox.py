"""``phi3data sandbox run``: one program in the sandbox, its result as JSON (for debugging a verifier)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="The sandbox that verification runs generated programs in.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _sandbox_group() -> None:
    """The sandbox that verification runs generated programs in."""


def run(
    program: Annotated[Path, typer.Argument(help="Python program to run", dir_okay=False)],
    timeout: Annotated[float, typer.Option(help="Wall-clock limit, seconds (the CPU limit is the same)")] = 10.0,
    stdin: Annotated[Path | None, typer.Option(help="File to give the program as its standard input")] = None,
    memory_mb: Annotated[int, typer.Option(help="Address-space limit, MiB")] = 1024,
    tool: Annotated[str, typer.Option(help="auto (the strongest this machine allows), unshare, unshare-user "
                                           "or none")] = "auto",
    allow_code_execution: Annotated[bool, typer.Option(
        "--allow-code-execution", help="Required: the program is run on this machine (in the sandbox)")] = False,
) -> None:
    """Run one program in the sandbox and print its result as JSON.

    The result: status (ok, error, timeout, oom, killed), exit code, stdout/stderr tails, CPU seconds, peak memory,
    wall seconds and the isolation it ran under.

    Example: phi3data sandbox run solution.py --timeout 5 --allow-code-execution

    The exit code is 0 whatever the program did (read "status"); 2 when it could not run (a missing file,
    no --allow-code-execution).
    """
    from phi3data.generators.sandbox import CodeExecutionRefused, Sandbox

    if not allow_code_execution:
        raise CodeExecutionRefused(f"phi3data sandbox run {program}")
    source = program.read_text(encoding="utf-8")
    data = stdin.read_bytes() if stdin is not None else None
    with Sandbox(allow_code_execution=True, workers=1, timeout=timeout, memory_mb=memory_mb, tool=tool) as sandbox:
        result = sandbox.run(source, stdin=data, filename=program.name)
    typer.echo(json.dumps(result.to_dict(), indent=2))
