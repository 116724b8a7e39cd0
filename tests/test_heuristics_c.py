"""The C helper for the Gopher filters gives exactly what the Python rules give: the same words as
``WORD_RE.findall`` and the same first broken n-gram rule, on real web text and on random Unicode."""

from __future__ import annotations

import random

from phi3data.pipelines.recipe import load_recipe
from phi3data.pipelines.stages import heuristics
from phi3data.pipelines.stages.heuristics import WORD_RE, _find_words_py, split_words
from tests.test_heuristics import texts

# digits of several scripts, separators and apostrophes, word and non-word symbols, combining marks (not \w),
# whitespace that str.split knows and ASCII does not, letters outside the BMP, a lone underscore
POOL = list("0123456789٣३３.,:/'’_-…!?ab xyzÉñß½²Ⅻ\u0301\u00a0\u2028\x1c\x85\u3000\t\n𝔘😀中文") + ["..", "..."]


def random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(POOL) for _ in range(rng.randint(0, 60))) for _ in range(count)]


def test_the_extension_is_built() -> None:
    """`pip install` builds it; without it the filters still work, only slower, so CI checks it is there."""
    assert heuristics._heuristics_c is not None


def test_c_words_equal_the_regex() -> None:
    for text in texts() + random_texts(5_000):
        assert heuristics._heuristics_c.find_words(text) == WORD_RE.findall(text) == _find_words_py(text), text[:80]


def test_c_ngram_rules_equal_the_python_rules() -> None:
    stage = load_recipe({"pipeline": {"name": "c"}, "stage": [{"type": "gopher_repetition"}]}).build_stages()[0]
    rules = stage.params.top_n_grams, stage.params.dup_n_grams
    reasons = set()
    cases = [(split_words(t), len(t)) for t in texts() if t]
    rng = random.Random(1)
    for _ in range(3_000):  # small vocabularies repeat n-grams at every size; sizes near the thresholds
        words = [rng.choice("a b c d e f gg hhh".split()[: rng.randint(1, 8)]) for _ in range(rng.randint(0, 80))]
        cases.append((words, max(1, sum(map(len, words)) + rng.randint(-5, 40))))
    for words, size in cases:
        expected = stage.ngram_reason_py(words, size)
        assert heuristics._heuristics_c.repetition_reason(words, size, *rules) == expected, (words[:20], size)
        reasons.add(expected)
    assert {f"top_{n}_gram" for n in (2, 3, 4)} | {None} <= reasons  # rules fired, and some texts broke none
    # each rule's own count, pinned from both sides: it fires just under the Python value and not at it
    for words, size in cases[::7]:
        ids = heuristics._Words(words)
        for n in range(1, 11):
            top, dup = heuristics._top_ngram_chars(ids, n) / size, heuristics._dup_ngram_chars(ids, n) / size
            for rules, value, reason in ((([(n, 0.0)], []), top, f"top_{n}_gram"),
                                         (([], [(n, 0.0)]), dup, f"dup_{n}_gram")):
                below = [[(n, value - 1e-9)] if r else [] for r in rules]
                at = [[(n, value)] if r else [] for r in rules]
                assert heuristics._heuristics_c.repetition_reason(words, size, *below) == reason
                assert heuristics._heuristics_c.repetition_reason(words, size, *at) is None


def test_c_ngram_rules_take_custom_rules() -> None:
    words = "x y z x y z x y z q".split()
    assert heuristics._heuristics_c.repetition_reason(words, 10, [], [(3, 0.5)]) == "dup_3_gram"
    assert heuristics._heuristics_c.repetition_reason(words, 10, [(2, 0.9)], []) is None
    assert heuristics._heuristics_c.repetition_reason(words, 10, [(2, 0.5)], []) == "top_2_gram"
