"""The local engine: a pool of worker processes on this machine (the embedded default)."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterator

from phi3data.engines import default_workers


def map_local(fn: Callable[[dict], dict], items: list[dict], *, workers: int | None = None) -> Iterator[dict]:
    n = min(default_workers(workers), len(items))
    if n == 1:
        for item in items:
            yield fn(item)
        return
    # spawn, not fork: workers start clean even when the caller holds threads (Ray, Spark, torch).
    with mp.get_context("spawn").Pool(n, maxtasksperchild=None) as pool:
        yield from pool.imap_unordered(fn, items, chunksize=1)
