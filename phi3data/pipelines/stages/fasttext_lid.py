"""Fast prediction for fastText language-ID models (lid.176): the model file read into flat tables, and the top
label computed by the C helper ``_fasttext_c``.

fastText's own ``predict`` spends most of its time per character n-gram (a string built, hashed from its start,
then two hash-map lookups to find the pruned row). The helper hashes each n-gram incrementally, finds its row in a
dense table and adds a pre-decoded row, with the same float operations in the same order, so labels and
probabilities are bit-identical to fastText's (tests/test_fasttext_lid.py checks real pages and corner cases).
For models this reader does not cover (word n-grams, softmax or one-vs-all losses) :func:`load` returns None, and
the language stage then uses fastText's binding, which stays the reference.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    from phi3data.pipelines.stages import _fasttext_c
except ImportError:  # pragma: no cover - a build without a C compiler
    _fasttext_c = None

MAGIC, VERSION = 793712314, 12
LOSS_HS, MODEL_SUPERVISED = 1, 3  # fastText's loss_name::hs and model_name::sup
KSUB = 256  # centroids per product-quantizer subspace
MAX_DIM = 512  # the C helper's limit (lid.176: 16)
EOS, LABEL_PREFIX = b"</s>", b"__label__"


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def take(self, dtype, count: int = 1) -> np.ndarray:
        values = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.at)
        self.at += values.nbytes
        return values

    def one(self, fmt: str):
        """One little-endian scalar, as a struct format ("i" int32, "q" int64, "d" double, "B"/"b" bytes)."""
        (value,) = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return value

    def word(self) -> bytes:
        end = self.data.index(b"\0", self.at)
        word, self.at = self.data[self.at:end], end + 1
        return word


def _quantizer(r: _Reader) -> tuple[int, int, int, np.ndarray]:
    dim, nsubq, dsub, lastdsub = (r.one("i") for _ in range(4))
    return nsubq, dsub, lastdsub, r.take("<f4", dim * KSUB)


def _decode(codes: np.ndarray, pq: tuple[int, int, int, np.ndarray]) -> np.ndarray:
    """Rows of a product-quantized matrix, centroid by centroid (fastText's ``get_centroids``)."""
    nsubq, dsub, lastdsub, centroids = pq
    rows = np.empty((codes.shape[0], (nsubq - 1) * dsub + lastdsub), np.float32)
    for m in range(nsubq):
        width, base = lastdsub if m == nsubq - 1 else dsub, m * KSUB * dsub
        table = centroids[base:base + KSUB * width].reshape(KSUB, width)
        rows[:, m * dsub:m * dsub + width] = table[codes[:, m]]
    return rows


def _matrix(r: _Reader, quantized: bool) -> tuple[np.ndarray, np.ndarray]:
    """A matrix as (rows, per-row scale): dense rows have scale 1; quantized rows are their decoded centroids and
    the scale is the row's quantized norm (1 without ``qnorm``)."""
    if not quantized:
        m, n = r.one("q"), r.one("q")
        return r.take("<f4", m * n).reshape(m, n), np.ones(m, np.float32)
    qnorm = bool(r.one("B"))
    m, n = r.one("q"), r.one("q")
    codesize = r.one("i")
    codes = r.take("u1", codesize)
    pq = _quantizer(r)
    rows = _decode(codes.reshape(m, pq[0]), pq)
    scale = np.ones(m, np.float32)
    if qnorm:
        norm_codes = r.take("u1", m)
        scale = _quantizer(r)[3][norm_codes].astype(np.float32)
    return rows, scale


def _huffman(counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """fastText's hierarchical-softmax tree over the label counts (``buildTree``): left and right children."""
    n = len(counts)
    count = counts + [10**15] * (n - 1)
    left, right = [-1] * (2 * n - 1), [-1] * (2 * n - 1)
    leaf, node = n - 1, n
    for i in range(n, 2 * n - 1):
        pair = []
        for _ in range(2):
            if leaf >= 0 and count[leaf] < count[node]:
                pair.append(leaf)
                leaf -= 1
            else:
                pair.append(node)
                node += 1
        left[i], right[i] = pair
        count[i] = count[pair[0]] + count[pair[1]]
    return np.array(left, np.int32), np.array(right, np.int32)


def _word_table(words: list[bytes]) -> tuple[bytes, np.ndarray, np.ndarray]:
    """The vocabulary as one blob with offsets, and an open-addressing table (fastText's FNV-1a hash, linear
    probing) from a word to its id."""
    starts = np.zeros(len(words) + 1, np.int32)
    starts[1:] = np.cumsum([len(w) for w in words])
    size = 1 << max(4, (4 * len(words)).bit_length())
    slots = np.full(size, -1, np.int32)
    for wid, word in enumerate(words):
        at = fnv1a(word) & (size - 1)
        while slots[at] >= 0:
            at = (at + 1) & (size - 1)
        slots[at] = wid
    return b"".join(words), starts, slots


def fnv1a(data: bytes) -> int:
    """fastText's word hash: 32-bit FNV-1a over the bytes read as signed chars."""
    h = 2166136261
    for byte in data:
        h = ((h ^ ((byte - 256 if byte > 127 else byte) & 0xFFFFFFFF)) * 16777619) & 0xFFFFFFFF
    return h


@dataclass
class FastTextLID:
    """A supervised fastText model in flat tables; ``predict`` gives each text's top label and probability."""

    labels: list[str]
    tables: tuple

    def predict(self, texts: list[str], max_chars: int = 0) -> tuple[list[str], list[float]]:
        """As fastText's ``predict(text.replace("\\n", " "), k=1)`` on each text's first ``max_chars``
        characters (0: all): label (``unknown`` for a text with no tokens) and probability."""
        ids, probs = _fasttext_c.predict(texts, max_chars, self.tables)
        return [self.labels[i] if i >= 0 else "unknown" for i in ids], probs


def load(path: Path) -> FastTextLID | None:
    """Read a fastText model file; None when the C helper is missing, or the file is not a model it predicts
    (then use fastText itself, which also gives its own error for a broken file)."""
    if _fasttext_c is None:
        return None
    try:
        return _load(_Reader(Path(path).read_bytes()))
    except (struct.error, ValueError, IndexError):
        return None


def _load(r: _Reader) -> FastTextLID | None:
    if r.one("i") != MAGIC or r.one("i") != VERSION:
        return None
    dim, _ws, _epoch, _min_count, _neg, word_ngrams, loss, model, bucket, minn, maxn, _lr_rate = (
        r.one("i") for _ in range(12))
    r.one("d")
    if model != MODEL_SUPERVISED or loss != LOSS_HS or word_ngrams > 1 or maxn <= 0 or not 0 < dim <= MAX_DIM:
        return None
    size, nwords, nlabels = (r.one("i") for _ in range(3))
    _ntokens, prune_size = r.one("q"), r.one("q")
    entries = []
    for _ in range(size):
        word = r.word()
        entries.append((word, r.one("q"), r.one("b")))
    if [kind for _, _, kind in entries] != [0] * nwords + [1] * nlabels:
        return None
    prune = np.full(bucket, -1, np.int32) if prune_size >= 0 else np.zeros(0, np.int32)
    if prune_size > 0:
        pairs = r.take("<i4", 2 * prune_size).reshape(-1, 2)
        prune[pairs[:, 0]] = pairs[:, 1]
    quantized = bool(r.one("B"))
    if prune_size >= 0 and not quantized:
        return None  # a pruned dictionary over dense rows: fastText refuses such a file as invalid
    rows, row_scale = _matrix(r, quantized)
    rows = rows * row_scale[:, None]  # fastText adds norm * centroid, a float32 product, for each row it reads
    quantized_out = bool(r.one("B"))
    out_rows, out_scale = _matrix(r, quantized and quantized_out)
    if r.at != len(r.data) or rows.shape[1] != dim or out_rows.shape != (nlabels, dim):
        return None
    words = [w for w, _, _ in entries[:nwords]]
    blob, starts, slots = _word_table(words)
    left, right = _huffman([count for _, count, _ in entries[nwords:]])
    eos = words.index(EOS) if EOS in words else -1
    tables = (blob, starts.tobytes(), slots.tobytes(), prune.tobytes(), np.ascontiguousarray(rows).tobytes(),
              np.ascontiguousarray(out_rows).tobytes(), out_scale.tobytes(), left.tobytes(), right.tobytes(),
              nwords, nlabels, dim, minn, maxn, bucket, eos)
    labels = [w.decode("utf-8", "replace").removeprefix(LABEL_PREFIX.decode()) for w, _, _ in entries[nwords:]]
    return FastTextLID(labels, tables)
