"""Tokenizers against their reference implementations on real documents, and the phi-3 chat format."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import pytest

from phi3data.tokenization.chat import ChatFormatError, encode_chat, render
from phi3data.tokenization.tokenizers import (
    PHI3_MINI_VOCAB,
    PHI3_SMALL_VOCAB,
    get_tokenizer,
    load_tokenizer,
    sanitize,
    tokenizers_root,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOKENIZERS = SHARED / "tokenizers"
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"missing {path}: these tests read the shared data in ../shared/data (see ../shared/README.md)")
    return path


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """About 3,500 real documents: OpenStax textbooks, DCLM web pages, CCNet/C4 web JSONL, GSM8K problems."""
    texts = [json.loads(line)["text"] for line in gzip.open(_need(SHARED / "textbooks/openstax.jsonl.gz"), "rt")]
    texts += [json.loads(line)["text"] for line in open(_need(SHARED / "quality/dclm_majority_labeled.jsonl"))]
    for path in sorted(_need(SHARED / "web/jsonl").iterdir()):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            texts += [json.loads(line)["text"] for line in handle if line.strip()]
    for line in gzip.open(_need(SHARED / "eval/gsm8k/test.jsonl.gz"), "rt"):
        item = json.loads(line)
        texts.append(item["question"] + "\n" + item["answer"])
    assert len(texts) > 2500
    return texts


@pytest.fixture(scope="module")
def reference_tiktoken(tmp_path_factory):
    """tiktoken's own cl100k_base, loaded through its cache from the shared ranks file (hash-checked)."""
    import tiktoken

    cache = tmp_path_factory.mktemp("tiktoken_cache")
    ranks = _need(TOKENIZERS / "tiktoken/cl100k_base.tiktoken")
    (cache / hashlib.sha1(CL100K_URL.encode()).hexdigest()).symlink_to(ranks)
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        tiktoken.registry.ENCODINGS.pop("cl100k_base", None)
        enc = tiktoken.get_encoding("cl100k_base")
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR")
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
    return enc


@pytest.fixture(scope="module")
def reference_hf():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(_need(TOKENIZERS / "phi3/derived_hf_from_gguf/tokenizer.json")))


def test_shared_tokenizers_are_found():
    assert tokenizers_root().resolve() == TOKENIZERS.resolve()


def test_phi3_mini_sentencepiece_equals_hf_tokenizers_on_real_documents(corpus, reference_hf):
    import sentencepiece as spm

    ours = get_tokenizer("phi3-mini")
    raw_sp = spm.SentencePieceProcessor(model_file=str(TOKENIZERS / "llama2/tokenizer.model"))
    got = ours.encode_batch(corpus, threads=2)
    hf = [e.ids for e in reference_hf.encode_batch(corpus, add_special_tokens=False)]
    mismatches = [i for i, (a, b) in enumerate(zip(got, hf)) if a != b]
    assert not mismatches, f"{len(mismatches)} of {len(corpus)} documents differ from HF tokenizers"
    assert got[:100] == raw_sp.encode(corpus[:100])
    assert ours.vocab_size == PHI3_MINI_VOCAB and ours.dtype.name == "uint16"
    assert ours.eos_id == 32000 and ours.bos_id == 1


def test_phi3_mini_hf_path_equals_sentencepiece_path(corpus):
    sp, hf = get_tokenizer("phi3-mini"), get_tokenizer("phi3-mini-hf")
    sample = corpus[::3]
    assert hf.encode_batch(sample, threads=2) == sp.encode_batch(sample, threads=1)
    assert hf.identity_hash != sp.identity_hash  # different files, same ids: each records its own identity
    assert hf.special_tokens["<|user|>"] == sp.special_tokens["<|user|>"] == 32010


def test_phi3_mini_matches_gguf_reference_vectors():
    inputs = _need(TOKENIZERS / "phi3/ggml-vocab-phi-3.gguf.inp").read_text(encoding="utf-8")
    inputs = inputs.split("\n__ggml_vocab_test__\n")
    outputs = _need(TOKENIZERS / "phi3/ggml-vocab-phi-3.gguf.out").read_text().split("\n")
    assert len(inputs) == len(outputs) > 40
    for name in ("phi3-mini", "phi3-mini-hf"):
        tok = get_tokenizer(name)
        for text, line in zip(inputs, outputs):
            assert tok.encode_text(text) == [int(x) for x in line.split()], (name, text)


def test_phi3_small_equals_tiktoken_cl100k(corpus, reference_tiktoken):
    ours = get_tokenizer("phi3-small")
    assert ours.encode_batch(corpus, threads=2) == reference_tiktoken.encode_ordinary_batch(corpus, num_threads=2)
    assert ours.vocab_size == PHI3_SMALL_VOCAB and ours.dtype.name == "uint32"
    special = ours.special_tokens
    assert special["<|endoftext|>"] == ours.eos_id == 100257
    assert (special["<|system|>"], special["<|user|>"], special["<|assistant|>"], special["<|end|>"]) == (
        100261, 100262, 100263, 100266)
    # Every id from 0 to 100,351 is a rank or a special token: the padded vocabulary has no holes.
    assert len(set(special.values())) + 100256 == PHI3_SMALL_VOCAB
    assert max(special.values()) == PHI3_SMALL_VOCAB - 1
    assert ours.decode([100266, 100257]) == "<|end|><|endoftext|>"
    assert get_tokenizer("cl100k_base").encode_text("hello <|endoftext|>") == reference_tiktoken.encode_ordinary(
        "hello <|endoftext|>")


def test_hf_tokenizer_from_a_directory_and_a_file(corpus, reference_hf):
    by_dir = load_tokenizer(str(TOKENIZERS / "phi3/derived_hf_from_gguf"))
    by_file = load_tokenizer(str(TOKENIZERS / "phi3/derived_hf_from_gguf/tokenizer.json"))
    sample = corpus[:200]
    want = [e.ids for e in reference_hf.encode_batch(sample, add_special_tokens=False)]
    assert by_dir.encode_batch(sample, threads=2) == want == by_file.encode_batch(sample)
    assert by_dir.eos_id == 32000  # <|endoftext|> found among the added tokens
    sp_model = load_tokenizer(str(TOKENIZERS / "llama2/tokenizer.model"))
    assert sp_model.encode_batch(sample[:20]) == want[:20] and sp_model.eos_id == 2


def test_special_strings_in_documents_stay_text():
    for name in ("phi3-mini", "phi3-mini-hf", "phi3-small"):
        tok = get_tokenizer(name)
        ids = tok.encode_text("a <|endoftext|> b <|user|>")
        assert tok.eos_id not in ids and tok.special_tokens["<|user|>"] not in ids, name
        assert tok.decode(ids) == "a <|endoftext|> b <|user|>", name


def test_round_trip_decode_equals_text(corpus):
    for name in ("phi3-mini", "phi3-small"):
        tok = get_tokenizer(name)
        sample = corpus[::4]
        bad = [i for i, (ids, text) in enumerate(zip(tok.encode_batch(sample, threads=2), sample))
               if tok.decode(ids) != text]
        assert not bad, f"{name}: {len(bad)} documents do not round-trip"


def test_unknown_tokenizer_names_what_to_use(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="phi3-mini"):
        load_tokenizer("gpt-17")
    monkeypatch.setenv("PHI3DATA_TOKENIZERS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="shared/data/tokenizers"):
        load_tokenizer("phi3-mini")


def test_sanitize_replaces_lone_surrogates():
    text = json.loads('"ok \\ud800 and \\udfff end \\ud83d\\ude00"')
    fixed, n = sanitize(text)
    assert n == 2 and fixed == "ok \ufffd and \ufffd end \U0001F600"
    assert sanitize("plain") == ("plain", 0)


# --- chat ---------------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are a careful tutor."},
    {"role": "user", "content": "What is 12 * 7?\nShow the steps."},
    {"role": "assistant", "content": "12 * 7 = 84, because 10 * 7 = 70 and 2 * 7 = 14."},
    {"role": "user", "content": "  And 84 / 4?"},
    {"role": "assistant", "content": "84 / 4 = 21."},
]


def test_chat_ids_equal_reference_tokenizers(reference_hf, reference_tiktoken):
    text = render(CONVERSATION)
    assert text.startswith("<|system|>\nYou are") and text.endswith("84 / 4 = 21.<|end|>\n<|endoftext|>")
    for name in ("phi3-mini", "phi3-mini-hf"):
        ids, mask = encode_chat(CONVERSATION, get_tokenizer(name))
        assert ids.tolist() == reference_hf.encode(text, add_special_tokens=False).ids, name
        assert len(mask) == len(ids)
    ids, _ = encode_chat(CONVERSATION, get_tokenizer("phi3-small"))
    # phi-3-small's special tokens sit in cl100k's unused ids; tiktoken with the same table is the reference.
    import tiktoken

    small = get_tokenizer("phi3-small")
    enc = tiktoken.Encoding("ref", pat_str=reference_tiktoken._pat_str,
                            mergeable_ranks=reference_tiktoken._mergeable_ranks, special_tokens=small.special_tokens)
    assert ids.tolist() == enc.encode(text, allowed_special="all")


@pytest.mark.parametrize("name", ["phi3-mini", "phi3-small"])
def test_chat_mask_covers_only_assistant_replies(name):
    tok = get_tokenizer(name)
    ids, mask = encode_chat(CONVERSATION, tok)
    trained = tok.decode(ids[mask == 1])
    if name == "phi3-small":  # cl100k keeps the newline that opens a reply (phi-3-mini's <|assistant|> absorbs it)
        trained = trained.replace("<|end|>\n", "<|end|>").removeprefix("\n")
    assert trained == ("12 * 7 = 84, because 10 * 7 = 70 and 2 * 7 = 14.<|end|>84 / 4 = 21.<|end|><|endoftext|>")
    assert "tutor" in tok.decode(ids[mask == 0]) and "Show the steps" in tok.decode(ids[mask == 0])
    ids2, mask2 = encode_chat(CONVERSATION[:2], tok)  # ends with the user: nothing to learn
    assert mask2.sum() == 0 and ids2[-1] == tok.eos_id


def test_chat_rejects_bad_conversations():
    tok = get_tokenizer("phi3-mini")
    with pytest.raises(ChatFormatError, match="role"):
        encode_chat([{"role": "robot", "content": "hi"}], tok)
    with pytest.raises(ChatFormatError, match="content"):
        encode_chat([{"role": "user", "content": None}], tok)
    with pytest.raises(ChatFormatError):
        encode_chat([], tok)


def test_chat_shards_from_parquet_and_jsonl_are_identical(tmp_path):
    """Chat (SFT) data reads from Parquet as from JSONL; a malformed JSONL line is a counted reader reject."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from phi3data.tokenization.runner import TokenizeConfig, tokenize
    from phi3data.tokenization.shards import open_shards

    conversations = [
        {"id": f"c{i}", "messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                     {"role": "assistant", "content": str(2 * i)}]}
        for i in range(5)
    ]
    jsonl = tmp_path / "jsonl" / "sft.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("".join(json.dumps(c) + "\n" for c in conversations) + '{"id": "broken", "messages": [\n')
    parquet = tmp_path / "parquet" / "sft.parquet"
    parquet.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(conversations), parquet)
    shards = {}
    for name, src in (("jsonl", jsonl), ("parquet", parquet)):
        summary = tokenize([src], tmp_path / f"out_{name}", TokenizeConfig(chat=True), workers=1)
        assert summary.manifest["documents"] == 5
        (shard,) = open_shards(tmp_path / f"out_{name}")
        shards[name] = (np.asarray(shard.tokens), np.asarray(shard.mask))
    assert summary.manifest["rejects"] == {}
    assert tokenize([jsonl], tmp_path / "again", TokenizeConfig(chat=True), workers=1).manifest["rejects"] == {
        "malformed_json": 1}
    assert all((a == b).all() for a, b in zip(shards["jsonl"], shards["parquet"], strict=True))
