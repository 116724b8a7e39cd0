"""Where data lives: the shared sample data, tokenizer files, evaluation sets and the build cache.

Each root has an environment override, read at call time so a worker process inherits what its driver set:

* ``$PHI3DATA_DATA``       the shared data folder (default: ``../shared/data`` beside the working directory or the
                            repository);
* ``$PHI3DATA_TOKENIZERS`` tokenizer files (default: ``<data>/tokenizers``);
* ``$PHI3DATA_EVAL``       benchmark files (default: ``<data>/eval``);
* ``$PHI3DATA_CACHE``      built artefacts such as the int8 encoder (default: ``~/.cache/phi3data``).

``phi3data quickstart --data DIR`` calls :func:`use_shared_data`, so every step (and every worker) reads from DIR.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    """The shared data folder: ``$PHI3DATA_DATA``, else the first ``../shared/data`` that exists."""
    env = os.environ.get("PHI3DATA_DATA")
    if env:
        return Path(env)
    for base in (Path.cwd(), _REPO):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate.resolve()
    return (Path.cwd().parent / "shared" / "data").resolve()


def use_shared_data(path: str | Path) -> Path:
    """Point every later lookup (in this process and the workers it starts) at ``path``."""
    resolved = Path(path).resolve()
    os.environ["PHI3DATA_DATA"] = str(resolved)
    return resolved


def tokenizers_dir() -> Path:
    env = os.environ.get("PHI3DATA_TOKENIZERS")
    return Path(env) if env else shared_data() / "tokenizers"


def eval_dir() -> Path:
    env = os.environ.get("PHI3DATA_EVAL")
    return Path(env) if env else shared_data() / "eval"


def cache_dir() -> Path:
    env = os.environ.get("PHI3DATA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "phi3data"
