"""The Spark engine: ``mapInArrow`` over a DataFrame of work items, one item per partition."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from phi3data.engines import default_workers


def spark_session(master: str | None = None, workers: int | None = None):
    """A SparkSession for phi3data: local[N] by default, or a cluster master such as spark://host:7077."""
    try:
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise RuntimeError("the spark engine needs `pip install 'phi3data[spark]'`") from exc
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = (SparkSession.builder.appName("phi3data")
               .master(master or f"local[{default_workers(workers)}]")
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.python.worker.reuse", "true")
               .config("spark.driver.host", "127.0.0.1")
               .config("spark.driver.bindAddress", "127.0.0.1"))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


_held = 0  # nesting depth of held_spark_session: the outermost one stops a local session


@contextmanager
def held_spark_session(*, master: str | None = None, workers: int | None = None) -> Iterator[None]:
    """One SparkSession for the duration; a local one is stopped at the end (a cluster's is left running)."""
    global _held
    spark = spark_session(master, workers)
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if master is None and _held == 0:
            spark.stop()


def map_spark(fn: Callable[[dict], dict], items: list[dict], *, workers: int | None = None,
              master: str | None = None) -> Iterator[dict]:
    import pyarrow as pa

    with held_spark_session(master=master, workers=workers):
        spark = spark_session(master, workers)
        rows = [(json.dumps(item),) for item in items]
        frame = spark.sparkContext.parallelize(rows, numSlices=len(rows)).toDF("item string")

        def apply(batches):
            for batch in batches:
                results = [json.dumps(fn(json.loads(x))) for x in batch.column("item").to_pylist()]
                yield pa.RecordBatch.from_pydict({"result": results})

        for row in frame.mapInArrow(apply, "result string").toLocalIterator(prefetchPartitions=True):
            yield json.loads(row["result"])
