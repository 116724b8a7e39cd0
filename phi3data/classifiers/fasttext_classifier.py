"""A fastText classifier (word bigrams): binary (score = P(positive)) or 0-5 grades (score = expected grade).

Saved in fastText's own ``.bin`` format; the numpy-2-safe C++ binding ``multilinePredict`` does inference.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

MODEL_FILE = "model.bin"


class FastTextParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epoch: int = Field(20, gt=0)
    lr: float = Field(0.2, gt=0)
    word_ngrams: int = Field(2, ge=1)
    dim: int = Field(32, gt=0)
    min_count: int = Field(2, ge=1)
    bucket: int = Field(200_000, gt=0)
    """Hash buckets for word n-grams; the .bin is about bucket * dim * 4 bytes."""
    lowercase: bool = True
    max_chars: int = Field(20_000, gt=0)
    """Only the first max_chars characters of a document are read (bounds the cost of giant documents)."""
    threads: int = Field(2, gt=0)
    seed: int = 0


def prepare(texts: list[str], lowercase: bool, max_chars: int) -> list[str]:
    """One fastText input line per document (fastText reads whitespace tokens; newlines end a line)."""
    if lowercase:
        return [t[:max_chars].replace("\n", " ").lower() + "\n" for t in texts]
    return [t[:max_chars].replace("\n", " ") + "\n" for t in texts]


TRAIN_ATTEMPTS = 10


def _train_with_retries(train_file: str, params: dict, model_out: str) -> dict:
    """Train and save to ``model_out``, retrying when fastText stops with "Encountered NaN"; returns the
    parameters that worked.

    Runs in a fresh process (see ``FastTextClassifier.train``): in a process that has loaded onnxruntime, the
    installed fastText build can raise "Encountered NaN" on every attempt, even at small learning rates. A failed
    attempt is retried with the next seed, and the rate halves every third attempt (the documented cause of NaN:
    divergence at a high rate). The seed and rate that worked go into the manifest.
    """
    import fasttext

    config = FastTextParams(**params)
    lr = config.lr
    for attempt in range(TRAIN_ATTEMPTS):
        try:
            model = fasttext.train_supervised(input=train_file, epoch=config.epoch, lr=lr,
                                              wordNgrams=config.word_ngrams, dim=config.dim,
                                              minCount=config.min_count, bucket=config.bucket,
                                              thread=config.threads, seed=config.seed + attempt, verbose=0)
            model.save_model(model_out)
            return config.model_copy(update={"lr": lr, "seed": config.seed + attempt}).model_dump()
        except RuntimeError as exc:
            if "NaN" not in str(exc) or attempt == TRAIN_ATTEMPTS - 1:
                raise RuntimeError(f"fastText training failed after {attempt + 1} attempts: {exc}") from exc
            if attempt % 3 == 2:
                lr /= 2
    raise AssertionError("unreachable")


def label_name(label: float) -> str:
    return f"__label__{int(label)}"


class FastTextClassifier:
    """Wraps a trained fastText model; ``predict`` returns one float score per text."""

    kind = "fasttext"

    def __init__(self, model, task: str, params: FastTextParams):
        self.model = model  # fasttext's C++ object (fasttext.FastText._FastText.f)
        self.task = task
        self.params = params

    @classmethod
    def train(cls, texts: list[str], labels: list[float], task: str, params: FastTextParams) -> FastTextClassifier:
        """Train in a fresh process (isolated from onnxruntime and other native state) and load the result."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        import fasttext

        lines = prepare(texts, params.lowercase, params.max_chars)
        with tempfile.TemporaryDirectory(prefix="phi3data-fasttext-") as tmp:
            train_file, model_file = str(Path(tmp) / "train.txt"), str(Path(tmp) / MODEL_FILE)
            with open(train_file, "w", encoding="utf-8") as handle:
                for line, label in zip(lines, labels):
                    handle.write(f"{label_name(label)} {line}")
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                used = pool.submit(_train_with_retries, train_file, params.model_dump(), model_file).result()
            model = fasttext.load_model(model_file)
        return cls(model.f, task, FastTextParams(**used))

    @classmethod
    def load(cls, directory: Path, task: str, params: dict) -> FastTextClassifier:
        import fasttext

        return cls(fasttext.load_model(str(directory / MODEL_FILE)).f, task, FastTextParams(**params))

    def save(self, directory: Path) -> list[str]:
        self.model.saveModel(str(directory / MODEL_FILE))
        return [MODEL_FILE]

    def predict(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.float32)
        lines = prepare(texts, self.params.lowercase, self.params.max_chars)
        labels, probs = self.model.multilinePredict(lines, -1, 0.0, "replace")
        return scores_from(labels, probs, self.task)


def scores_from(labels: list[list[str]], probs: list, task: str) -> np.ndarray:
    """Binary: the probability of ``__label__1``. Ordinal: the expected grade sum(p_k * k)."""
    out = np.empty(len(labels), dtype=np.float32)
    for i, (names, p) in enumerate(zip(labels, probs)):
        if task == "binary":
            value = 0.0
            for name, prob in zip(names, p):
                if name == "__label__1":
                    value = prob
                    break
        else:
            value = sum(int(name[9:]) * prob for name, prob in zip(names, p))
        out[i] = min(max(value, 0.0), 1.0 if task == "binary" else 5.0)
    return out
