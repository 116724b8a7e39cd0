"""The engines: the same recipe on the same input gives identical output on local, Ray (a two-node cluster on
loopback) and Spark (local, and a standalone master + worker on loopback); results stream back in completion
order; a failed task names its item; sessions are joined and stopped only by whoever started them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import JSONL_DIR, RECIPE, ROOT, WARC_DIR, output_files, read_output, require_shared

from phi3data.engines import engine_session, map_shards
from phi3data.pipelines import as_arrow_udf
from phi3data.pipelines.recipe import RecipeError, load_recipe
from phi3data.pipelines.runner import run_pipeline


# Work functions for the engines' workers (module level, so workers import them by name).
def node_of(item: dict) -> dict:
    """Item n creates its marker and waits for the other's, so both must hold a CPU at the same time."""
    import ray

    Path(item["dir"], str(item["n"])).write_text("here")
    other = Path(item["dir"], str(1 - item["n"]))
    deadline = time.monotonic() + 120
    while not other.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{other} never appeared: the two items did not run at the same time")
        time.sleep(0.05)
    return {"n": item["n"], "node": ray.get_runtime_context().get_node_id()}


def wait_for_file(item: dict) -> dict:
    """Item ``wait`` finishes only once its file exists; item ``quick`` returns at once."""
    if item["role"] == "wait":
        path = Path(item["path"])
        deadline = time.monotonic() + 60
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} never appeared: the driver got no result while this task ran")
            time.sleep(0.05)
    return {"role": item["role"]}


def fail_on_three(item: dict) -> dict:
    if item["n"] == 3:
        raise ValueError(f"bad item {item['n']}")
    return item


@pytest.mark.cluster
@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_engines_give_identical_output(engine, engine_up, reference_run, tmp_path):
    out = tmp_path / engine
    summary = run_pipeline(load_recipe(RECIPE), WARC_DIR, out, engine=engine, workers=2, progress=False)
    assert summary.stats["engine"] == engine
    assert output_files(out) == output_files(reference_run)
    assert read_output(out) == read_output(reference_run)


@pytest.mark.cluster
@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_results_stream_back_in_completion_order(engine, engine_up, tmp_path):
    """The first item finishes only after the driver has received the second's result: results are yielded as
    tasks complete, not in submission (or partition) order, while other tasks still run."""
    go = tmp_path / "go"
    results = map_shards(wait_for_file, [{"role": "wait", "path": str(go)}, {"role": "quick"}], engine=engine,
                         workers=2)
    assert next(results) == {"role": "quick"}
    go.write_text("go")
    assert list(results) == [{"role": "wait"}]


@pytest.mark.cluster
@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_failed_task_names_its_item(engine, engine_up):
    items = [{"n": i} for i in range(5)]
    with pytest.raises(RuntimeError, match=r'item \{"n": 3\} failed') as raised:
        list(map_shards(fail_on_three, items, engine=engine, workers=2))
    assert "bad item 3" in str(raised.value)
    # the session survives a failed task and runs the next map
    assert sorted(r["n"] for r in map_shards(fail_on_three, items[:3], engine=engine, workers=2)) == [0, 1, 2]


@pytest.mark.cluster
def test_ray_tasks_run_on_both_nodes(ray_cluster, tmp_path):
    """Two one-CPU tasks that must run at once on a cluster of two one-CPU nodes: one on each node."""
    results = list(map_shards(node_of, [{"n": i, "dir": str(tmp_path)} for i in range(2)], engine="ray"))
    assert sorted(r["n"] for r in results) == [0, 1]
    assert len({r["node"] for r in results}) == 2


@pytest.mark.cluster
@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_global_stage_decides_the_same_on_every_engine(engine, engine_up, tmp_path):
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


def _cluster_id(engine: str) -> str:
    if engine == "ray":
        import ray

        return ray.get_runtime_context().get_job_id() if ray.is_initialized() else ""
    from pyspark import SparkContext

    context = SparkContext._active_spark_context
    return context.applicationId if context is not None else ""


@pytest.mark.cluster
@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_engine_session_joins_a_running_cluster_and_leaves_it_running(engine, engine_up):
    """A pipeline's passes share one Ray / Spark (engine_session); one it did not start, it does not stop."""
    items = [{"n": i} for i in range(3)]
    before = _cluster_id(engine)
    assert before
    with engine_session(engine, workers=2):
        for _ in range(2):  # two passes
            assert sorted(r["n"] for r in map_shards(dict, items, engine=engine, workers=2)) == [0, 1, 2]
            assert _cluster_id(engine) == before
    assert _cluster_id(engine) == before


STARTS_AND_STOPS = """
import sys
from phi3data.engines import engine_session, map_shards
from phi3data.pipelines import as_arrow_udf
from test_engines import _cluster_id

engine = sys.argv[1]
assert _cluster_id(engine) == ""
with engine_session(engine, workers=1):
    first = _cluster_id(engine)
    assert first, "engine_session started nothing"
    for _ in range(2):
        assert sorted(r["n"] for r in map_shards(dict, [{"n": 0}, {"n": 1}], engine=engine)) == [0, 1]
        assert _cluster_id(engine) == first, "a pass started its own cluster"
assert _cluster_id(engine) == "", "engine_session left running what it started"
print("ok", engine)
"""


@pytest.mark.cluster
@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_engine_session_stops_what_it_started(engine):
    """In a fresh process (this one holds the session's Ray and Spark): started once, kept across passes,
    stopped at the end."""
    done = subprocess.run([sys.executable, "-c", STARTS_AND_STOPS, engine], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ok {engine}" in done.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spark_class() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent / "bin" / "spark-class"


RUN_ON_MASTER = """
import sys
from pathlib import Path
from phi3data.pipelines.recipe import RecipeError, load_recipe
from phi3data.pipelines.runner import run_pipeline

recipe, inp, out, master = sys.argv[1:]
run_pipeline(load_recipe(recipe), Path(inp), Path(out), engine="spark", spark_master=master, progress=False)
"""


@pytest.mark.cluster
def test_spark_standalone_cluster_on_loopback(reference_run, tmp_path):
    """A real standalone master and worker on 127.0.0.1; a driver process connects with its master URL."""
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
        done = subprocess.run([sys.executable, "-c", RUN_ON_MASTER, str(RECIPE), str(inp), str(out),
                               f"spark://127.0.0.1:{port}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads((out / "stats.json").read_text())["engine"] == "spark"
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


@pytest.mark.cluster
def test_spark_refuses_a_second_master_in_one_process(spark_local):
    from phi3data.engines.spark import spark_session

    with pytest.raises(RuntimeError, match="already runs a Spark session on local"):
        spark_session("spark://127.0.0.1:1")
    assert spark_session().sparkContext.master == spark_local.sparkContext.master == "local[2]"


@pytest.fixture(scope="module")
def jsonl_documents(tmp_path_factory) -> tuple[pa.Table, list[tuple[str, str]]]:
    """The shared JSONL web documents as one document table, and what phi3data's own local run of
    web_quality.toml keeps from them (id, text)."""
    from phi3data.documents import make_batch
    from phi3data.io.inputs import plan_shards
    from phi3data.io.readers import read_records

    recipe = load_recipe(RECIPE)
    records = []
    for shard in plan_shards(require_shared(JSONL_DIR)):
        records.extend(r for r in read_records(Path(shard.path), source=shard.relpath,
                                               max_document_bytes=recipe.input.max_document_bytes)
                       if not r.get("reject"))
    out = tmp_path_factory.mktemp("udf-reference")
    run_pipeline(recipe, JSONL_DIR, out, engine="local", workers=1, progress=False)
    kept = read_output(out)
    assert 0 < len(kept) < len(records)  # the recipe keeps some documents and drops others
    return make_batch(records), kept


def _kept(table: pa.Table) -> list[tuple[str, str]]:
    return sorted(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))


def test_arrow_udf_in_process_keeps_what_a_run_keeps(jsonl_documents):
    documents, expected = jsonl_documents
    udf = as_arrow_udf(RECIPE)
    kept = pa.concat_tables(udf(documents.slice(start, 50)) for start in range(0, documents.num_rows, 50))
    assert _kept(kept) == expected
    assert kept.schema == udf.output_schema()
    assert {"language", "language_score"} <= set(kept.schema.names)
    # metadata is optional and other columns pass through
    extra = documents.drop_columns(["metadata"]).append_column("mine", pa.array(range(documents.num_rows)))
    passed = udf(extra)
    assert _kept(passed) == expected and "mine" in passed.schema.names and "metadata" in passed.schema.names


def test_arrow_udf_refuses_global_stages_and_missing_columns(jsonl_documents):
    from test_pipeline import _threshold_recipe

    with pytest.raises(RecipeError, match="global stage.*edu_threshold.*cannot run batch by batch"):
        as_arrow_udf(_threshold_recipe("percentile", 30))
    with pytest.raises(ValueError, match="missing: url, source"):
        as_arrow_udf(load_recipe(RECIPE))(jsonl_documents[0].select(["id", "text"]))


@pytest.mark.cluster
def test_arrow_udf_in_ray_data_map_batches(ray_cluster, jsonl_documents):
    import ray

    documents, expected = jsonl_documents
    dataset = ray.data.from_arrow(documents).repartition(4)
    kept = dataset.map_batches(as_arrow_udf(RECIPE), batch_format="pyarrow", batch_size=64)
    assert _kept(pa.Table.from_pylist(kept.take_all())) == expected


@pytest.mark.cluster
def test_arrow_udf_in_spark_map_in_arrow(spark_local, jsonl_documents):
    documents, expected = jsonl_documents
    udf = as_arrow_udf(load_recipe(RECIPE))
    frame = spark_local.createDataFrame(documents).repartition(4)
    kept = frame.mapInArrow(udf.map_in_arrow, udf.spark_schema(frame.schema))
    assert "language_score" in kept.columns
    assert _kept(kept.toArrow()) == expected
