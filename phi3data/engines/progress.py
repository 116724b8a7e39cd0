"""A progress bar over shard results as engines yield them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable


def drain(results: Iterable[dict], *, total: int, skipped: int, label: str, count: Callable[[dict], int],
          unit: str, progress: bool = True) -> None:
    """Consume ``results`` (one per finished shard), showing shards done and ``count(result)`` summed as a rate."""
    if not progress:
        for _ in results:
            pass
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    done = 0
    started = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
                  TimeElapsedColumn(), TextColumn("{task.fields[rate]}")) as bar:
        task = bar.add_task(label, total=total, completed=skipped, rate="")
        for result in results:
            done += count(result)
            rate = done / max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=1, rate=f"{done:,} {unit}, {rate:,.0f} {unit}/s")
