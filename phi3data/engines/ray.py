"""The Ray engine: one plain Ray task per work item, results gathered with ``ray.wait`` as tasks finish.

A work item is a whole input shard, so a task is coarse (seconds to minutes) and Ray's task API is the natural
fit: no dataset, no per-row serialisation. Tasks are spread over the cluster's nodes. Stages that load models
cache them per worker process (``run_shard_task`` keeps its Pipeline), and Ray reuses worker processes across a
job's tasks, so a model loads once per worker as it would in an actor pool, without tying shards to actors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from phi3data.engines import default_workers


@contextmanager
def ray_session(*, workers: int | None = None, address: str | None = None) -> Iterator[None]:
    """Ray initialised for the duration; shut down after only if started here.

    Joins the cluster at ``address`` (or at ``$RAY_ADDRESS``, as Ray's own tools do); otherwise starts Ray on
    this machine with ``workers`` CPUs.
    """
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("the ray engine needs `pip install 'phi3data[ray]'`") from exc
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address or os.environ.get("RAY_ADDRESS"):
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            if "auth" in repr(exc.__cause__ or exc).lower() and os.environ.get("RAY_AUTH_MODE") != "token":
                raise ConnectionError(f"{exc}; the cluster uses token authentication: set RAY_AUTH_MODE=token "
                                      "(and its token, ~/.ray/auth_token or RAY_AUTH_TOKEN_PATH)") from exc
            raise
    else:
        # "local": a new Ray of our own, even when `ray start` has left a cluster address on this machine
        ray.init(address="local", num_cpus=default_workers(workers), **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def _run_item(fn: Callable[[dict], dict], item: dict) -> dict:
    return fn(item)


def map_ray(fn: Callable[[dict], dict], items: list[dict], *, workers: int | None = None,
            address: str | None = None) -> Iterator[dict]:
    """Submit one task per item (one CPU each) and yield results in completion order.

    A failed task raises ``RuntimeError`` naming its item; the tasks still running are cancelled.
    """
    with ray_session(workers=workers, address=address):
        import ray

        task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_run_item)
        fn_ref = ray.put(fn)  # serialised once, not once per task
        pending = {task.remote(fn_ref, item): item for item in items}
        try:
            while pending:
                [ready], _ = ray.wait(list(pending), num_returns=1)
                item = pending.pop(ready)
                try:
                    result = ray.get(ready)
                except ray.exceptions.RayError as exc:
                    raise RuntimeError(f"ray task for item {json.dumps(item)} failed: {exc}") from exc
                yield result
        finally:
            for ref in pending:
                ray.cancel(ref)
