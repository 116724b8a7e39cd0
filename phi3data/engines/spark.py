"""The Spark engine: an RDD map over the work items, one item per partition, each partition its own job."""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager

from phi3data.engines import default_workers


def spark_session(master: str | None = None, workers: int | None = None):
    """A SparkSession for phi3data: local[N] by default, or a cluster master such as spark://host:7077.

    A session already running in this process is reused (Spark allows one per process); asking for another
    master than the running one's is an error rather than a silent run on the wrong cluster.
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise RuntimeError("the spark engine needs `pip install 'phi3data[spark]'`") from exc
    running = _running_context()
    if running is not None and master is not None and running.master != master:
        raise RuntimeError(f"this process already runs a Spark session on {running.master}; Spark allows one per "
                           f"process, so stop it before running on {master}")
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
    if master and master.startswith("spark://"):
        # wait for every executor before the first task, or the first to register takes all the work
        builder = builder.config("spark.scheduler.minRegisteredResourcesRatio", "1.0") \
                         .config("spark.scheduler.maxRegisteredResourcesWaitingTime", "60s")
    spark = builder.getOrCreate()
    if running is None:
        spark.sparkContext.setLogLevel("ERROR")
    return spark


def _running_context():
    """The SparkContext running in this process, if any."""
    try:
        from pyspark import SparkContext
    except ImportError:
        return None
    return SparkContext._active_spark_context


@contextmanager
def held_spark_session(*, master: str | None = None, workers: int | None = None) -> Iterator[None]:
    """One SparkSession for the duration: a running one is joined and left running; one started here (local, or
    an application on a cluster master) is stopped at the end."""
    started = _running_context() is None
    spark = spark_session(master, workers)
    try:
        yield
    finally:
        if started:
            spark.stop()


def map_spark(fn: Callable[[dict], dict], items: list[dict], *, workers: int | None = None,
              master: str | None = None) -> Iterator[dict]:
    """Map ``fn`` over an RDD with one partition per item; yield results in completion order.

    Each partition is computed by its own Spark job, submitted from a driver thread (as many at once as the
    cluster has cores), so results stream back as tasks finish; ``toLocalIterator`` would return them in
    partition order, running at most two at a time. A failed task raises ``RuntimeError`` naming its item.
    """
    with held_spark_session(master=master, workers=workers):
        context = spark_session(master, workers).sparkContext
        payload = [json.dumps(item) for item in items]
        rdd = context.parallelize(payload, numSlices=len(payload)).map(lambda line: json.dumps(fn(json.loads(line))))
        group = f"phi3data-{uuid.uuid4().hex}"

        def run(index: int) -> dict:
            context.setJobGroup(group, f"phi3data item {index}", interruptOnCancel=True)
            [line] = context.runJob(rdd, lambda rows: rows, [index])
            return json.loads(line)

        pool = ThreadPoolExecutor(max_workers=min(len(items), max(1, context.defaultParallelism)))
        futures = {pool.submit(run, i): item for i, item in enumerate(items)}
        try:
            for future in as_completed(futures):
                try:
                    result = future.result()
                except Exception as exc:
                    raise RuntimeError(f"spark task for item {json.dumps(futures[future])} failed: "
                                       f"{_python_error(exc)}") from exc
                yield result
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            if not all(f.done() for f in futures):
                context.cancelJobGroup(group)
            pool.shutdown(wait=True)


def _python_error(exc: Exception) -> str:
    """The last line of the Python traceback inside a Spark task failure (the whole message is very long)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith((" ", "\t")) and "Error" in line.split(":")[0]]
    return errors[-1] if errors else (lines[0] if lines else type(exc).__name__)
