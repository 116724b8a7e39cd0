"""Gopher's n-gram repetition rules: the vectorised implementation equals the rules as written (n-grams as tuples
of words, a walk that skips past each repeat) on real web text, textbook sections and planted repetitions."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from phi3data.pipelines.stages.heuristics import (
    WORD_RE,
    _dup_ngram_chars,
    _find_words,
    _split_lines,
    _top_ngram_chars,
    _Words,
    split_words,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WEB = SHARED / "web" / "jsonl"
TEXTBOOKS = SHARED / "textbooks" / "openstax.jsonl.gz"


def top_ngram_chars_as_written(words: list[str], n: int) -> int:
    if len(words) < n:
        return 0
    gram, count = Counter(zip(*(words[i:] for i in range(n)))).most_common(1)[0]
    return (sum(len(w) for w in gram) + n - 1) * count


def dup_ngram_chars_as_written(words: list[str], n: int) -> int:
    seen: set[tuple[str, ...]] = set()
    repeated, i = 0, 0
    while i < len(words) - n + 1:
        gram = tuple(words[i:i + n])
        if gram in seen:
            repeated += sum(len(w) for w in gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated


def texts() -> list[str]:
    files = sorted(WEB.glob("*")) + [TEXTBOOKS]
    if not files:
        pytest.fail(f"missing test data: {WEB}")
    out = []
    for path in files:
        with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
            out += [json.loads(line)["text"] for line, _ in zip(f, range(100))]
    assert len(out) > 100
    planted = ["a b c d e " * 50, "x y " * 200 + "z", "the cat sat on the mat . " * 30 + "end of story here now",
               "one two three four five six " * 3 + "one two three four five seven " * 4, "", "solo"]
    return out + planted


def test_ngram_rules_equal_the_rules_as_written() -> None:
    for text in texts():
        words = split_words(text)
        ids = _Words(words)
        for n in (2, 3, 4):
            assert _top_ngram_chars(ids, n) == top_ngram_chars_as_written(words, n), (n, text[:80])
        for n in range(5, 11):
            assert _dup_ngram_chars(ids, n) == dup_ngram_chars_as_written(words, n), (n, text[:80])


def test_fast_splits_equal_the_regexes() -> None:
    """Words cut at whitespace first, and lines by str.split, give exactly what the regexes give."""
    import re

    odd = "\u00a0\u2028\x1c\x85\u3000 x_y __ 3.5.1 1,000 don't … ½² Ⅻ\t\n\n\nend\n"
    for text in [*texts(), odd, "\n", "\n\na\n", "a\n\n"]:
        assert _find_words(text) == WORD_RE.findall(text), text[:80]
        assert _split_lines(text) == re.split(r"\n+", text), text[:80]


def test_text_filters_drop_a_null_text_under_their_empty_reason():
    """An image record without a caption reaches the caption filters with a null text: counted, not a crash."""
    import pyarrow as pa

    from phi3data.pipelines.recipe import load_recipe

    recipe = load_recipe({"pipeline": {"name": "null-text"}, "stage": [
        {"type": "language", "languages": ["en"]}, {"type": "length", "min_chars": 5, "min_words": 1},
        {"type": "gopher_repetition"}, {"type": "gopher_quality"}, {"type": "c4_quality"},
        {"type": "fineweb_quality"}]})
    for stage in recipe.build_stages():
        batch = pa.table({"id": ["null"], "text": pa.array([None], pa.large_string())})
        out = stage.process(batch)
        assert out.batch.num_rows == 0, stage.type_name
        assert sum(out.drops.values()) == 1, (stage.type_name, out.drops)
