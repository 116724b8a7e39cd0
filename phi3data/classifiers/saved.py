"""Saved classifiers: a directory with the model files and ``manifest.json`` (kind, task, parameters,
training-data hash, metrics, threshold, file hashes). Loading reads only fastText ``.bin``, safetensors and
JSON — never pickle — and refuses files whose hash does not match the manifest."""

from __future__ import annotations

import json
from pathlib import Path

from phi3data import __version__
from phi3data.classifiers.embedding_classifier import EmbeddingClassifier
from phi3data.classifiers.fasttext_classifier import FastTextClassifier
from phi3data.io.inputs import file_sha256
from phi3data.io.writers import write_json_atomic

MANIFEST = "manifest.json"
FORMAT = "phi3data-classifier/1"
KINDS = {"fasttext": FastTextClassifier, "embedding": EmbeddingClassifier}
Classifier = FastTextClassifier | EmbeddingClassifier


def save_classifier(classifier: Classifier, directory: Path, *, name: str, threshold: float, data_hash: str,
                    metrics: dict, extra: dict | None = None) -> dict:
    """Write the model files and the manifest; returns the manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    files = classifier.save(directory)
    manifest = {
        "format": FORMAT, "name": name, "kind": classifier.kind, "task": classifier.task,
        "params": classifier.params.model_dump(mode="json"), "threshold": float(threshold),
        "data_hash": data_hash, "metrics": metrics, "files": {f: file_sha256(directory / f) for f in files},
        "phi3data_version": __version__, **(extra or {}),
    }
    write_json_atomic(directory / MANIFEST, manifest, default=float)
    return manifest


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no classifier at {directory}: {MANIFEST} is missing (train one with "
                                f"`phi3data classify train classifiers/<recipe>.toml`)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown classifier format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def load_classifier(directory: str | Path, verify: bool = True) -> tuple[Classifier, dict]:
    """Load a saved classifier and its manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest["kind"] not in KINDS:
        raise ValueError(f"{directory}: unknown classifier kind {manifest['kind']!r}; known: {', '.join(KINDS)}")
    if verify:
        for name, expected in manifest["files"].items():
            actual = file_sha256(directory / name)
            if actual != expected:
                raise ValueError(f"{directory / name} does not match its manifest hash (changed after training?)")
    classifier = KINDS[manifest["kind"]].load(directory, manifest["task"], manifest["params"])
    return classifier, manifest
