"""Exactly once: kill -9 a run in the middle, rerun, and get exactly the uninterrupted output.

Each run is its own process (that is what gets killed), so these start their own Ray / Spark.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import RECIPE, ROOT, WARC_DIR, output_files, read_output


def _start(out, engine):
    cmd = [sys.executable, "-m", "phi3data.cli", "run", str(RECIPE), "--input", str(WARC_DIR), "--output", str(out),
           "--engine", engine, "--workers", "1", "--no-progress"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["local", pytest.param("ray", marks=pytest.mark.cluster),
                                    pytest.param("spark", marks=pytest.mark.cluster)])
def test_kill_and_resume_gives_exactly_the_uninterrupted_output(engine, reference_run, tmp_path):
    out = tmp_path / "out"
    proc = _start(out, engine)
    progress = out / "_progress"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and len(list(progress.glob("*.json"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGSTOP)  # freeze, so what we count is what the kill interrupts
    done_before = len(list(progress.glob("*.json")))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= done_before < 9, "kill should land mid-run"
    if engine == "ray":
        time.sleep(2)  # let orphaned Ray workers notice their driver is gone
    rerun = subprocess.run([sys.executable, "-m", "phi3data.cli", "run", str(RECIPE), "--input", str(WARC_DIR),
                            "--output", str(out), "--engine", engine, "--workers", "2", "--no-progress"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "already done" in rerun.stdout
    assert output_files(out) == output_files(reference_run)
    assert read_output(out) == read_output(reference_run)
    ids = [i for i, _ in read_output(out)]
    assert len(ids) == len(set(ids))
    assert not list(out.rglob(".tmp-*"))
