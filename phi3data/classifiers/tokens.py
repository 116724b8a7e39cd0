"""Token counts for thresholds and sweeps: whitespace-separated words, counted in Arrow (fast, deterministic,
and the same on every engine). A real tokenizer's count is about 1.3x this for English prose."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def count_tokens(texts: list[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Whitespace word counts per text (0 for a missing text)."""
    array = texts if isinstance(texts, pa.Array | pa.ChunkedArray) else pa.array(texts, pa.large_string())
    counts = pc.list_value_length(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(array)))
    counts = pc.fill_null(counts, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    # splitting "" gives [""]: an empty text has no words
    empty = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(array)), 0), True)
    counts[empty.to_numpy(zero_copy_only=False)] = 0
    return counts
