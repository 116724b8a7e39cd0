"""Shared fixtures: paths to the real data in ../shared/data and one reference pipeline run."""

from __future__ import annotations

import os
import sys
import tempfile
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
# Built artefacts (the int8 MiniLM build) go to a fresh cache per test session, never the user's own cache.
os.environ["PHI3DATA_CACHE"] = tempfile.mkdtemp(prefix="phi3data-test-cache-")


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"missing shared data {path}: tests read the real data in ../shared/data next to the repo")
    return path


def read_output(out_dir: Path) -> list[tuple[str, str]]:
    """All (id, text) pairs of a run's data shards, sorted."""
    rows = []
    for shard in sorted((out_dir / "data").glob("*.parquet")):
        table = pq.read_table(shard, columns=["id", "text"])
        rows.extend(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))
    return sorted(rows)


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
