"""The C predictor for lid.176 gives exactly fastText's top label and probability (the same float32), on real web
pages in many languages, on textbooks and on text built to hit fastText's tokenizer corners."""

from __future__ import annotations

import random

import fasttext
import pytest
from conftest import WARC_DIR, require_shared

from phi3data.io.readers import read_records
from phi3data.pipelines.recipe import load_recipe
from phi3data.pipelines.stages import fasttext_lid
from phi3data.pipelines.stages.language import default_lid_model_path, predict_with_fasttext
from tests.test_heuristics import texts

# fastText's separators (space, \n, \r, \t, \v, \f, NUL) and what is not one (NBSP, ideographic space), its line
# end "</s>" as a word, label-like tokens, bracket characters of its n-grams, multi-byte UTF-8 of 2, 3, 4 bytes
POOL = (list("abcdefghijklmnopqrstuvwxyz      \n\r\t\v\f\x00<>_\u00a0\u3000éßøДжзあいう中文한국어😀𝔘ابت")
        + ["</s>", "__label__en", "__label__", "the ", "und ", "de ", "это ", "的", " " * 5])


def random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(POOL) for _ in range(rng.randint(0, 120))) for _ in range(count)]


@pytest.fixture(scope="module")
def models():
    path = default_lid_model_path()
    fast = fasttext_lid.load(path)
    assert fast is not None, "the C helper is not built, or lid.176 is not read"
    return fast, fasttext.load_model(str(path)).f


@pytest.fixture(scope="module")
def web_pages() -> list[str]:
    """Every page of two WARC shards, extracted as the web recipe does (several hundred pages, many languages)."""
    extract = load_recipe({"pipeline": {"name": "x"}, "stage": [{"type": "extract"}]}).build_stages()[0]
    extract.ensure_setup()
    pages = []
    for shard in sorted(require_shared(WARC_DIR).glob("*.warc.gz"))[-2:]:
        records = read_records(shard, fmt="warc", source="t", max_document_bytes=10_000_000)
        records = [r for r in records if not r.get("reject")]
        pages += [r["text"] for r in extract.process_records(records)[0]]
    assert len(pages) > 200
    return pages


def test_the_extension_is_built() -> None:
    """`pip install` builds it; without it language ID falls back to fastText, only slower, so CI checks it."""
    assert fasttext_lid._fasttext_c is not None


@pytest.mark.parametrize("max_chars", [4_000, 0, 7])
def test_c_prediction_equals_fasttext(models, web_pages, max_chars) -> None:
    fast, reference = models
    docs = web_pages + texts() + random_texts(3_000)
    got = fast.predict(docs, max_chars)
    expected = predict_with_fasttext(reference, docs, max_chars)
    assert got[0] == expected[0]
    assert got[1] == expected[1]  # the same float32 probabilities, before the stage clips them at 1.0
    assert len(set(got[0])) > 20  # many languages were predicted, not one label everywhere


def test_tokenizer_corners(models) -> None:
    fast, reference = models
    cases = ["", " ", "\x00", "hello </s> bonjour le monde", "</s>", "__label__de Hallo Welt", "__label__en",
             "a" * 100_000, "word\u00a0word", "\t\r\v\fkoira talo", "😀" * 50, "x</s>y"]
    for case in cases:
        assert fast.predict([case]) == predict_with_fasttext(reference, [case], 0), case[:40]
    # "</s>" ends fastText's line: what follows it is not read
    assert fast.predict(["bonjour le monde </s> the cat sat on the mat"]) == fast.predict(["bonjour le monde"])


def test_models_it_does_not_cover_return_none(tmp_path) -> None:
    data = bytearray(default_lid_model_path().read_bytes())
    softmax = tmp_path / "softmax.ftz"
    data[32:36] = (3).to_bytes(4, "little")  # args.loss = softmax
    softmax.write_bytes(bytes(data))
    assert fasttext_lid.load(softmax) is None
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a model" * 10)
    assert fasttext_lid.load(garbage) is None
    truncated = tmp_path / "truncated.ftz"
    truncated.write_bytes(default_lid_model_path().read_bytes()[:-100])
    assert fasttext_lid.load(truncated) is None
    assert fasttext_lid.load(default_lid_model_path()) is not None
