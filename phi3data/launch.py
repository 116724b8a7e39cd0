"""The ``phi3data`` command's entry point. It stays light to import: every local worker imports the main script
again, as a spawned process does.

``phi3data run`` on the local engine starts the workers' fork server here, before the CLI itself is imported, so
the server's imports overlap the driver's (:mod:`phi3data.engines.local`).
"""

from __future__ import annotations

import sys


def main() -> None:
    if _runs_local_workers(sys.argv[1:]):
        from phi3data.engines.local import warm_up

        warm_up()
    from phi3data.cli import app

    app(prog_name="phi3data")


def _runs_local_workers(args: list[str]) -> bool:
    """``phi3data run`` on the default engine with more than one worker. Only a head start: anything this
    misses (``--engine local``, say) still starts the server when the run begins."""
    if args[:1] != ["run"]:
        return False
    return not any(a == "--engine" or a.startswith("--engine=") or a in ("--workers=1", "--help") for a in args) \
        and "1" not in [b for a, b in zip(args, args[1:]) if a == "--workers"]
