"""phi3data as a library: a wheel installed with only its core dependencies runs a JSONL pipeline, and ships the
recipes and rubrics its code reads. Offline: the wheel is built from this checkout without build isolation, and
the core dependencies are exposed to a fresh virtual environment from the test environment's own installs."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import JSONL_DIR, ROOT, require_shared

CORE_ONLY_ABSENT = ("torch", "PIL", "pyspark", "ray", "sklearn", "onnxruntime", "transformers", "tiktoken", "httpx")


def _requirement_names(dist: md.Distribution, extras: bool = False) -> list[str]:
    names = []
    for req in dist.requires or []:
        if ";" in req and "extra" in req.split(";", 1)[1] and not extras:
            continue
        names.append(re.split(r"[\s\[<>=!~;(]", req, maxsplit=1)[0])
    return names


def _core_closure() -> list[md.Distribution]:
    """phi3data's core requirements and theirs, as installed here (no extras)."""
    seen: dict[str, md.Distribution] = {}
    todo = _requirement_names(md.distribution("phi3data"))
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[key] = dist
        todo += _requirement_names(dist)
    return list(seen.values())


@pytest.fixture(scope="module")
def core_env(tmp_path_factory) -> Path:
    """A venv holding the phi3data wheel and, through a .pth file, only the core dependency closure."""
    root = tmp_path_factory.mktemp("core_install")
    source = root / "src"  # a copy, so the build leaves nothing (build/, egg-info) in the checkout
    shutil.copytree(ROOT / "phi3data", source / "phi3data", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(source)], check=True, capture_output=True)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    core = root / "core-site"
    core.mkdir()
    for dist in _core_closure():
        for file in dist.files or []:
            top = Path(str(file)).parts[0]
            source = Path(dist.locate_file(top))
            target = core / top
            if top.endswith(".dist-info") or top == ".." or target.exists() or not source.exists():
                continue
            target.symlink_to(source)
    (site / "core.pth").write_text(str(core) + "\n")
    wheel = next(wheels.glob("phi3data-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    return venv


def test_core_install_runs_a_jsonl_pipeline(core_env, tmp_path):
    python = core_env / "bin" / "python"
    missing = subprocess.run([str(python), "-c", "import importlib.util as u, sys; "
                              f"print([m for m in {CORE_ONLY_ABSENT!r} if u.find_spec(m)])"],
                             capture_output=True, text=True, check=True)
    assert missing.stdout.strip() == "[]", "the core environment must not see optional packages"
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([str(core_env / "bin" / "phi3data"), "run", str(ROOT / "pipelines" / "web_quality.toml"),
                           "--input", str(require_shared(JSONL_DIR)), "--output", str(out), "--no-progress",
                           "--workers", "1"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = pq.read_table(out / "data")
    assert table.num_rows > 0 and len(set(table.column("id").to_pylist())) == table.num_rows


def test_installed_package_ships_sizes_and_rubrics(core_env):
    python = core_env / "bin" / "python"
    # looked up as files: importing phi3data.model would need torch, which a core install does not have
    code = ("import phi3data, pathlib; root = pathlib.Path(phi3data.__file__).parent; "
            "print(sorted(p.name for p in (root / 'model' / 'sizes').iterdir())); "
            "print(sorted(p.name for p in (root / 'classifiers' / 'rubrics').iterdir())); print(root)")
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd="/", check=True)
    sizes, rubrics, location = proc.stdout.splitlines()
    assert "phi-3-mini.toml" in sizes and "ladder-cpu.toml" in sizes
    assert "edu_additive.md" in rubrics
    assert str(core_env) in location, "the wheel, not the checkout, is imported"
