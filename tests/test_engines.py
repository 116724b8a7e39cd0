"""The same recipe on the same input gives identical output on local, Ray and Spark (and a Spark
standalone cluster on loopback)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import RECIPE, WARC_DIR, output_files, read_output

from phi3data.pipelines.recipe import load_recipe
from phi3data.pipelines.runner import run_pipeline


@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_engines_give_identical_output(engine, reference_run, tmp_path):
    out = tmp_path / engine
    summary = run_pipeline(load_recipe(RECIPE), WARC_DIR, out, engine=engine, workers=2, progress=False)
    assert summary.stats["engine"] == engine
    assert output_files(out) == output_files(reference_run)
    assert read_output(out) == read_output(reference_run)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spark_class() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent / "bin" / "spark-class"


def test_spark_standalone_cluster_on_loopback(reference_run, tmp_path):
    """A real standalone master and worker on 127.0.0.1; the driver connects with --spark-master."""
    port = _free_port()
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
               SPARK_HOME=str(_spark_class().parent.parent), SPARK_NO_DAEMONIZE="1")
    master = subprocess.Popen([str(_spark_class()), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(port), "--webui-port", str(_free_port())], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    worker = subprocess.Popen([str(_spark_class()), "org.apache.spark.deploy.worker.Worker",
                               f"spark://127.0.0.1:{port}", "--cores", "2", "--memory", "2g",
                               "--webui-port", str(_free_port()), "--host", "127.0.0.1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        inp = tmp_path / "in"
        inp.mkdir()
        for name in ("web-sample-00000.warc.gz", "web-sample-00008.warc.gz"):
            (inp / name).symlink_to(WARC_DIR / name)
        out = tmp_path / "out"
        run_pipeline(load_recipe(RECIPE), inp, out, engine="spark", spark_master=f"spark://127.0.0.1:{port}",
                     progress=False)
        from pyspark.sql import SparkSession

        active = SparkSession.getActiveSession()
        if active is not None:
            active.stop()
        expected_files = [f for f in output_files(reference_run)
                          if f.split("/")[1].startswith(("web-sample-00000", "web-sample-00008"))]
        assert output_files(out) == expected_files
        expected = []
        for name in expected_files:
            if name.startswith("data/"):
                table = pq.read_table(reference_run / name, columns=["id", "text"])
                expected.extend(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))
        assert read_output(out) == sorted(expected) and expected
    finally:
        for proc in (worker, master):
            os.killpg(proc.pid, 9)
            proc.wait()


@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_global_stage_decides_the_same_on_every_engine(engine, tmp_path):
    from test_pipeline import _threshold_recipe

    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("web-sample-00002.warc.gz", "web-sample-00008.warc.gz"):
        (inp / name).symlink_to(WARC_DIR / name)
    recipe = load_recipe(_threshold_recipe("percentile", 30))
    local = run_pipeline(recipe, inp, tmp_path / "local", engine="local", workers=2, progress=False)
    other = run_pipeline(recipe, inp, tmp_path / engine, engine=engine, workers=2, progress=False)
    assert other.stats["decisions"] == local.stats["decisions"]
    assert read_output(tmp_path / engine) == read_output(tmp_path / "local")


@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_engine_session_keeps_one_cluster_across_passes(engine):
    """A pipeline's passes share one Ray / Spark start (engine_session); it is stopped when the session ends."""
    from phi3data.engines import engine_session, map_shards

    items = [{"n": i} for i in range(3)]

    def cluster_id() -> str:
        if engine == "ray":
            import ray

            return ray.get_runtime_context().get_job_id() if ray.is_initialized() else ""
        from pyspark import SparkContext

        context = SparkContext._active_spark_context
        return context.applicationId if context is not None else ""

    with engine_session(engine, workers=2):
        first = cluster_id()
        assert first
        for _ in range(2):  # two passes
            assert sorted(r["n"] for r in map_shards(dict, items, engine=engine, workers=2)) == [0, 1, 2]
            assert cluster_id() == first
    assert cluster_id() == ""
