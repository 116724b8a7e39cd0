"""Recipes on real multi-process clusters, started and stopped by these tests (tests/clusters.py): a Spark standalone
master with two one-core workers (a run submitted with ``spark-submit``, and the ``phi3data run`` CLI as its own
driver), and a two-node Ray cluster (``phi3data run --ray-address``). Each run must give the local engine's output,
and every worker / node must have run some of its tasks."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from clusters import (
    BIN,
    RayCluster,
    SparkCluster,
    package_zip,
    ray_nodes,
    run_logged,
    spark_standalone,
    spark_task_executors,
)
from conftest import JSONL_DIR, ROOT, output_files, read_output, require_shared

from phi3data.pipelines.recipe import load_recipe
from phi3data.pipelines.runner import run_pipeline

pytestmark = pytest.mark.cluster


# The recipes each cluster runs, over the shared JSONL sample (7 shards, so every worker / node gets some). Adding
# a recipe is one line; a recipe file not written yet is skipped.
RECIPES = {
    "web_quality": JSONL_DIR,
    "dedup": JSONL_DIR,
    "decontaminate": JSONL_DIR,
}
SUBMIT_RECIPES = ["web_quality"]  # also submitted with spark-submit (each Spark application costs 15-40 s here)

RUN_TIMEOUT = 600  # seconds for one run, far above what it takes; a hang fails instead of blocking the suite


def cases(engine: str, names: list[str] | None = None) -> list:
    """pytest params (recipe path, input dir) for ``engine``, id'd by recipe name."""
    params = []
    for name in names or list(RECIPES):
        path = ROOT / "pipelines" / f"{name}.toml"
        marks = [pytest.mark.skipif(not path.exists(), reason=f"{path.name} not written yet")]
        params.append(pytest.param(path, RECIPES[name], id=name, marks=marks))
    return params


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory) -> Callable[[Path, Path], Path]:
    """The local engine's output of each (recipe, input), run once, on demand."""
    runs: dict[tuple[Path, Path], Path] = {}
    base = tmp_path_factory.mktemp("local")

    def get(recipe_path: Path, input_dir: Path) -> Path:
        key = (recipe_path, input_dir)
        if key not in runs:
            out = base / f"{recipe_path.stem}-{len(runs)}"
            run_pipeline(load_recipe(recipe_path), require_shared(input_dir), out, engine="local", workers=2,
                         progress=False)
            runs[key] = out
        return runs[key]

    return get


def phi3data_run(recipe_path: Path | str, input_dir: Path | str, out: Path | str, *engine_args: str) -> list[str]:
    return ["run", str(recipe_path), "--input", str(input_dir), "--output", str(out), "--no-progress", *engine_args]


def assert_same_output(out: Path, local: Path, engine: str) -> None:
    stats = json.loads((out / "stats.json").read_text())
    expected = json.loads((local / "stats.json").read_text())
    assert stats["engine"] == engine
    assert stats["documents_out"] == expected["documents_out"]
    assert stats["shards"] == expected["shards"] >= 4
    assert output_files(out) == output_files(local)
    assert read_output(out) == read_output(local) and read_output(local)


def run_with_relative_paths(engine_args: list[str], env: dict[str, str], local_runs: Callable[[Path, Path], Path],
                            tmp_path: Path, engine: str) -> None:
    """``phi3data run`` with a relative --input and --output, as the README shows: the output must land where the
    driver's working directory says, whatever the workers' working directories are. (The driver runs in tmp_path,
    so a worker that resolves ``out`` in its own working directory writes inside its cluster's directory.)"""
    recipe_path, input_dir = ROOT / "pipelines" / "web_quality.toml", RECIPES["web_quality"]
    done = run_logged([BIN / "phi3data", *phi3data_run(recipe_path, os.path.relpath(input_dir, tmp_path), "out",
                                                      *engine_args)],
                      env=env, log=tmp_path / "run.log", cwd=tmp_path, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stdout
    assert_same_output(tmp_path / "out", local_runs(recipe_path, input_dir), engine)


def assert_both_workers_ran_tasks(cluster: SparkCluster, events: Path) -> str:
    """Exactly one application ran; each worker launched an executor for it that finished tasks. Returns its id."""
    [(app, ran)] = spark_task_executors(events).items()
    per_worker = cluster.executors(app)
    assert all(per_worker), f"not every worker launched an executor for {app}: {per_worker}"
    assert all(executors & ran for executors in per_worker), \
        f"executors that finished tasks: {sorted(ran)}; per worker: {per_worker}"
    return app


@pytest.fixture(scope="class")
def spark_cluster(tmp_path_factory) -> Iterator[SparkCluster]:
    """A Spark master and two one-core, 1 GiB workers on 127.0.0.1, up for one test class."""
    with spark_standalone(tmp_path_factory.mktemp("spark"), workers=2, cores=1, memory="1g") as cluster:
        yield cluster


@pytest.fixture(scope="class")
def ray_two_nodes(tmp_path_factory) -> Iterator[RayCluster]:
    """A Ray head and a second node, one CPU each, on this machine, up for one test class."""
    with ray_nodes(tmp_path_factory.mktemp("ray"), nodes=2, cpus=1) as cluster:
        yield cluster


class TestSparkStandalone:
    """Runs on a Spark standalone cluster (``spark_cluster``)."""

    @pytest.mark.parametrize("recipe_path, input_dir", cases("spark", SUBMIT_RECIPES))
    def test_spark_submit(self, spark_cluster, local_runs, recipe_path, input_dir, tmp_path):
        """``spark-submit --master spark://... --py-files phi3data.zip phi3data/cli/__main__.py run ...``: the
        driver runs the CLI; the executors get phi3data as a zip and the venv's Python (PYSPARK_PYTHON)."""
        env, events = spark_cluster.driver_env(tmp_path)
        archive = package_zip(ROOT / "phi3data", tmp_path / "phi3data.zip")
        out = tmp_path / "out"
        done = run_logged([BIN / "spark-submit", "--master", spark_cluster.master, "--py-files", archive,
                           ROOT / "phi3data" / "cli" / "__main__.py",
                           *phi3data_run(recipe_path, input_dir, out, "--engine", "spark",
                                         "--spark-master", spark_cluster.master)],
                          env=env, log=tmp_path / "spark-submit.log", cwd=ROOT, timeout=RUN_TIMEOUT)
        assert done.returncode == 0, done.stdout
        app = assert_both_workers_ran_tasks(spark_cluster, events)
        for work_dir in spark_cluster.work_dirs:  # the zip went to every executor
            assert list((work_dir / app).glob("*/phi3data.zip")), f"no phi3data.zip under {work_dir / app}"
        assert_same_output(out, local_runs(recipe_path, input_dir), "spark")

    @pytest.mark.parametrize("recipe_path, input_dir", cases("spark"))
    def test_cli(self, spark_cluster, local_runs, recipe_path, input_dir, tmp_path):
        """``phi3data run --engine spark --spark-master spark://...``: the CLI process is the driver."""
        env, events = spark_cluster.driver_env(tmp_path)
        out = tmp_path / "out"
        done = run_logged([BIN / "phi3data", *phi3data_run(recipe_path, input_dir, out, "--engine", "spark",
                                                          "--spark-master", spark_cluster.master)],
                          env=env, log=tmp_path / "run.log", cwd=ROOT, timeout=RUN_TIMEOUT)
        assert done.returncode == 0, done.stdout
        assert_both_workers_ran_tasks(spark_cluster, events)
        assert_same_output(out, local_runs(recipe_path, input_dir), "spark")

    def test_relative_paths(self, spark_cluster, local_runs, tmp_path):
        env, _ = spark_cluster.driver_env(tmp_path)
        run_with_relative_paths(["--engine", "spark", "--spark-master", spark_cluster.master], env, local_runs,
                                tmp_path, "spark")


class TestRay:
    """Runs on a two-node Ray cluster (``ray_two_nodes``)."""

    @pytest.mark.parametrize("recipe_path, input_dir", cases("ray"))
    def test_cli(self, ray_two_nodes, local_runs, recipe_path, input_dir, tmp_path):
        """``phi3data run --engine ray --ray-address 127.0.0.1:PORT``."""
        assert len(ray_two_nodes.node_ids) == 2
        jobs_before = set(ray_two_nodes.task_nodes("_run_item"))
        out = tmp_path / "out"
        done = run_logged([BIN / "phi3data", *phi3data_run(recipe_path, input_dir, out, "--engine", "ray",
                                                          "--ray-address", ray_two_nodes.address)],
                          env=ray_two_nodes.env, log=tmp_path / "run.log", cwd=ROOT, timeout=RUN_TIMEOUT)
        assert done.returncode == 0, done.stdout
        # Export events are flushed about once a second: wait for this run's job to show tasks on both nodes.
        nodes = ray_two_nodes.node_ids
        deadline = time.monotonic() + 180  # a wait for the events to be flushed, generous under load
        while True:
            jobs = {job: ran for job, ran in ray_two_nodes.task_nodes("_run_item").items() if job not in jobs_before}
            if list(jobs.values()) == [nodes] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(jobs) == 1, f"expected one new Ray job with finished tasks, got {jobs}"
        assert list(jobs.values()) == [nodes], f"tasks finished on {jobs}; the cluster's nodes: {nodes}"
        assert_same_output(out, local_runs(recipe_path, input_dir), "ray")

    def test_relative_paths(self, ray_two_nodes, local_runs, tmp_path):
        run_with_relative_paths(["--engine", "ray", "--ray-address", ray_two_nodes.address], ray_two_nodes.env,
                                local_runs, tmp_path, "ray")
