"""The local engine: a pool of worker processes on this machine (the embedded default).

Workers come from a fork server: one clean process, started by exec so it holds none of the caller's threads
(Ray, Spark, torch), imports what tasks need once and forks every worker from itself. A worker then starts in
milliseconds instead of importing pyarrow, pandas and the pipeline again, and ``warm_up`` starts the server early
so that its imports overlap the driver's own. Each worker takes the driver's environment, ``sys.path`` and
working directory as they are when its pool starts, as a freshly spawned process would.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Iterator

from phi3data.engines import default_workers

# What the server imports before forking: the pipeline, and pandas, which pyarrow imports on a worker's first
# conversion from Python objects. Stage modules are light and load in each worker, only those its recipe names.
# The main script is not run in the server: each worker runs it as a spawned process would (the `phi3data`
# script's is phi3data.launch, light on purpose).
PRELOAD = ["phi3data.pipelines.pipeline", "pandas"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read only when the server starts; later calls change nothing
    return ctx


def warm_up() -> None:
    """Start the fork server now, so its imports run while the driver plans; a no-op once it runs."""
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


def _adopt_driver_state(environ: dict[str, str], path: list[str], cwd: str) -> None:
    """Pool initializer: the server was started earlier, so take the driver's state as it is now."""
    os.environ.clear()
    os.environ.update(environ)
    sys.path[:] = path
    if os.path.isdir(cwd):
        os.chdir(cwd)


def map_local(fn: Callable[[dict], dict], items: list[dict], *, workers: int | None = None) -> Iterator[dict]:
    n = min(default_workers(workers), len(items))
    if n == 1:
        for item in items:
            yield fn(item)
        return
    with _context().Pool(n, initializer=_adopt_driver_state,
                         initargs=(dict(os.environ), list(sys.path), os.getcwd())) as pool:
        yield from pool.imap_unordered(fn, items, chunksize=1)
