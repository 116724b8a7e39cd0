"""Data roots: one module decides where the shared data, tokenizers, benchmarks and the cache live."""

from __future__ import annotations

import subprocess
import sys

from phi3data import paths


def _clean_environment(monkeypatch) -> None:
    """Unset the overrides; setenv first so the originals come back after the test (use_shared_data writes the
    environment itself)."""
    for var in ("PHI3DATA_DATA", "PHI3DATA_TOKENIZERS", "PHI3DATA_EVAL", "PHI3DATA_CACHE"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


def test_roots_follow_the_shared_data_and_their_own_overrides(tmp_path, monkeypatch):
    _clean_environment(monkeypatch)
    default = paths.shared_data()
    assert default.name == "data" and default.parent.name == "shared"
    assert paths.tokenizers_dir() == default / "tokenizers" and paths.eval_dir() == default / "eval"

    elsewhere = paths.use_shared_data(tmp_path / "mirror")
    assert paths.tokenizers_dir() == elsewhere / "tokenizers" and paths.eval_dir() == elsewhere / "eval"
    monkeypatch.setenv("PHI3DATA_EVAL", str(tmp_path / "bench"))
    assert paths.eval_dir() == tmp_path / "bench" and paths.tokenizers_dir() == elsewhere / "tokenizers"
    monkeypatch.setenv("PHI3DATA_CACHE", str(tmp_path / "cache"))
    assert paths.cache_dir() == tmp_path / "cache"


def test_a_worker_process_sees_the_data_root_its_driver_chose(tmp_path, monkeypatch):
    """quickstart --data sets the root in the environment, so spawned engine workers read the same data."""
    _clean_environment(monkeypatch)
    paths.use_shared_data(tmp_path / "mirror")
    child = subprocess.run([sys.executable, "-c", "from phi3data.tokenization.tokenizers import tokenizers_root; "
                            "print(tokenizers_root())"], capture_output=True, text=True, check=True)
    assert child.stdout.strip() == str(tmp_path / "mirror" / "tokenizers")
