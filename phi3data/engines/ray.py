"""The Ray engine: Ray Data ``map_batches`` over the work items, one item per task."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from phi3data.engines import default_workers


@contextmanager
def ray_session(*, workers: int | None = None, address: str | None = None) -> Iterator[None]:
    """Ray initialised for the duration (joined if ``address`` is given); shut down after only if started here."""
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("the ray engine needs `pip install 'phi3data[ray]'`") from exc
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=default_workers(workers), **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def map_ray(fn: Callable[[dict], dict], items: list[dict], *, workers: int | None = None,
            address: str | None = None) -> Iterator[dict]:
    with ray_session(workers=workers, address=address):
        import ray

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = False
        payload = [{"item": json.dumps(item)} for item in items]
        dataset = ray.data.from_items(payload, override_num_blocks=len(payload))

        def apply(batch):
            return {"result": [json.dumps(fn(json.loads(x))) for x in batch["item"]]}

        results = dataset.map_batches(apply, batch_size=1, num_cpus=1, batch_format="numpy")
        for row in results.iter_rows():
            yield json.loads(row["result"])
