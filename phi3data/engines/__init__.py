"""Engines run one function over many work items (input shards) on this machine, on Ray, or on Spark.

``map_shards(fn, items, engine=...)`` is the primitive every engine provides. ``fn`` is a picklable
function (or ``functools.partial`` of one) that takes one JSON-serialisable item, does its own atomic
writes, and returns a JSON-serialisable dict; results come back in completion order. Because the unit of
work is a whole shard and its outputs are written atomically under deterministic names, a task retried by
Ray or Spark, or redone after a crash, never duplicates or loses data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

ENGINES = ("local", "ray", "spark")


def map_shards(fn: Callable[[dict], dict], items: list[dict], *, engine: str = "local", workers: int | None = None,
               ray_address: str | None = None, spark_master: str | None = None) -> Iterator[dict]:
    """Run ``fn`` on every item with the named engine, yielding each result as it completes."""
    if not items:
        return iter(())
    if engine == "local":
        from phi3data.engines.local import map_local

        return map_local(fn, items, workers=workers)
    if engine == "ray":
        from phi3data.engines.ray import map_ray

        return map_ray(fn, items, workers=workers, address=ray_address)
    if engine == "spark":
        from phi3data.engines.spark import map_spark

        return map_spark(fn, items, workers=workers, master=spark_master)
    raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")


def default_workers(workers: int | None) -> int:
    import os

    return max(1, workers or os.cpu_count() or 1)


@contextmanager
def engine_session(engine: str, *, workers: int | None = None, ray_address: str | None = None,
                   spark_master: str | None = None) -> Iterator[None]:
    """Keep Ray or Spark up across several ``map_shards`` calls (a pipeline's passes), instead of starting and
    stopping it for each; stops only what it started. A no-op for the local engine."""
    if engine == "ray":
        from phi3data.engines.ray import ray_session

        with ray_session(workers=workers, address=ray_address):
            yield
    elif engine == "spark":
        from phi3data.engines.spark import held_spark_session

        with held_spark_session(master=spark_master, workers=workers):
            yield
    else:
        yield
