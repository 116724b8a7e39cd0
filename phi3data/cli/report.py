"""``phi3data report``: the HTML report of any output directory (or several curation runs side by side)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def report(
    directories: Annotated[list[Path], typer.Argument(help="Output directory of phi3data run / generate / tokenize / "
                                                          "mix / ablate (several with --compare)")],
    compare: Annotated[bool, typer.Option("--compare", help="Put two or more curation runs on one page")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where the HTML goes (default: DIR/report.html; "
                                                "with --compare, report-compare.html beside the first DIR)")] = None,
    input: Annotated[Path | None, typer.Option("--input", "-i", help="A curation run's input: replays a sample of it "
                                               "to show dropped documents by reason")] = None,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the report in the default browser")] = False,
) -> None:
    """Write one self-contained HTML report (no network, charts inline) for what DIR holds.

    Example: phi3data report out/web --input ../shared/data/web/warc

    Also: phi3data report out/tokens; phi3data report out/ablate --open;
    phi3data report out/web out/edu --compare --output out/web-vs-edu.html (default: report-compare.html beside
    out/web). A curation run's dropped documents are not stored: --input replays a sample of its input (the
    documents with the smallest id hashes) to show examples of each drop reason.
    """
    from phi3data.report import write_compare, write_report

    if compare:
        path = write_compare(directories, output=output)
    else:
        if len(directories) != 1:
            raise ValueError("give one directory (or several with --compare)")
        path = write_report(directories[0], output=output, input_path=input)
    typer.echo(f"report: {path}")
    if open_browser:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


def write_and_print(directory: Path, echo, *, input: Path | None = None, compare_with: Path | None = None) -> None:
    """What a long command does at its end: write the directory's HTML report (and a comparison page) and print
    where. The run's outputs are already complete, so a report that fails is a warning, not a failed command."""
    from phi3data.report import write_compare, write_report

    try:
        echo(f"report: {write_report(directory, input_path=input)}")
        if compare_with is not None:
            echo(f"report: {write_compare([compare_with, directory], output=directory.parent / 'report-compare.html')}")
    except Exception as exc:  # noqa: BLE001 - the run succeeded; say why its report did not
        echo(f"warning: no HTML report for {directory}: {type(exc).__name__}: {exc}")
