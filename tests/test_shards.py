"""Token shards: round trip, Megatron .idx read by an independent reader, llm.c export, exactly-once reruns,
bad input, identical shards on local / Ray / Spark, and the packed dataset."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from phi3data.io.readers import read_records
from phi3data.tokenization.dataset import PackedDataset
from phi3data.tokenization.runner import TokenizeConfig, tokenize
from phi3data.tokenization.shards import TokenShard, export_llmc, open_shards
from phi3data.tokenization.tokenizers import get_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TEXTBOOKS = SHARED / "textbooks" / "openstax.jsonl.gz"
WEB_JSONL = SHARED / "web" / "jsonl"
WARC = SHARED / "web" / "warc"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"missing {path}: these tests read the shared data in ../shared/data (see ../shared/README.md)")
    return path


@pytest.fixture(scope="module")
def curated_web(tmp_path_factory) -> Path:
    """`phi3data run` output for two real WARC shards (a Parquet data/ folder)."""
    from phi3data.pipelines.recipe import load_recipe
    from phi3data.pipelines.runner import run_pipeline

    root = tmp_path_factory.mktemp("curated")
    warc_in = root / "warc"
    warc_in.mkdir()
    for name in ("web-sample-00000.warc.gz", "web-sample-00001.warc.gz"):
        (warc_in / name).symlink_to(_need(WARC / name))
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "pipelines" / "web_quality.toml")
    run_pipeline(recipe, warc_in, root / "out", workers=2, progress=False)
    return root / "out"


def _texts(path: Path) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for f in files:
        out += [r["text"] for r in read_records(f, source="t", max_document_bytes=5_000_000) if not r.get("reject")]
    return out


@pytest.mark.parametrize("name", ["phi3-mini", "phi3-small"])
def test_shards_round_trip_to_the_input_text(tmp_path, curated_web, name):
    out = tmp_path / "tok"
    summary = tokenize([_need(TEXTBOOKS), curated_web, _need(WEB_JSONL)], out, TokenizeConfig(tokenizer=name),
                       workers=2)
    tok = get_tokenizer(name)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == ("uint16" if name == "phi3-mini" else "uint32")
    assert manifest["tokenizer_hash"] == tok.identity_hash and manifest["tokenizer"]["name"] == name
    assert set(manifest["sources"]) == {"openstax", "out", "jsonl"}
    shards = open_shards(out)
    assert len(shards) == summary.shards_total == 1 + len(list((curated_web / "data").iterdir())) + 7
    files = {TEXTBOOKS.name: TEXTBOOKS}
    files.update({p.name: p for p in (curated_web / "data").iterdir()})
    files.update({p.name: p for p in WEB_JSONL.iterdir()})
    docs = 0
    for shard in shards:
        text_in = _texts(files[shard.manifest["input"]])
        assert len(shard) == len(text_in)
        for i, text in enumerate(text_in):
            ids = shard.document(i)
            assert ids[-1] == tok.eos_id
            assert tok.decode(ids[:-1]) == text
        docs += len(shard)
    assert docs == manifest["documents"] > 900
    assert manifest["tokens"] == sum(len(s.tokens) for s in shards)


def _read_megatron_idx(path: Path) -> dict:
    """An independent reader written from Megatron-LM's published MMapIndexedDataset index layout."""
    data = path.read_bytes()
    assert data[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", data, 9)
    (code,) = struct.unpack_from("<B", data, 17)
    seq_count, doc_count = struct.unpack_from("<QQ", data, 18)
    pos = 34
    sizes = np.frombuffer(data, dtype="<i4", count=seq_count, offset=pos)
    pos += 4 * seq_count
    pointers = np.frombuffer(data, dtype="<i8", count=seq_count, offset=pos)
    pos += 8 * seq_count
    doc_idx = np.frombuffer(data, dtype="<i8", count=doc_count, offset=pos)
    pos += 8 * doc_count
    assert pos == len(data)
    dtypes = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
              8: np.uint16}
    return {"version": version, "dtype": np.dtype(dtypes[code]), "sizes": sizes, "pointers": pointers,
            "doc_idx": doc_idx}


@pytest.mark.parametrize("name", ["phi3-mini", "phi3-small"])
def test_megatron_index_reads_our_bin(tmp_path, name):
    out = tmp_path / "tok"
    tokenize([_need(WEB_JSONL)], out, TokenizeConfig(tokenizer=name), workers=1)
    for shard in open_shards(out):
        idx = _read_megatron_idx(shard.stem.with_name(shard.stem.name + ".idx"))
        assert idx["version"] == 1 and idx["dtype"].itemsize == shard.tokens.dtype.itemsize
        assert len(idx["sizes"]) == len(shard) and idx["doc_idx"].tolist() == list(range(len(shard) + 1))
        raw = shard.stem.with_name(shard.stem.name + ".bin").read_bytes()
        for i in range(len(shard)):
            seq = np.frombuffer(raw, dtype=idx["dtype"], count=int(idx["sizes"][i]), offset=int(idx["pointers"][i]))
            assert seq.tolist() == shard.document(i).tolist()


def test_llmc_export_header(tmp_path):
    out = tmp_path / "tok"
    tokenize([_need(WEB_JSONL)], out, TokenizeConfig(), workers=1)
    info = export_llmc(out, tmp_path / "train.bin")
    data = (tmp_path / "train.bin").read_bytes()
    header = np.frombuffer(data, dtype="<i4", count=256)
    assert header[0] == 20240520 and header[1] == 1 and header[2] == info["tokens"]
    tokens = np.frombuffer(data, dtype="<u2", offset=1024)
    assert len(tokens) == info["tokens"]
    assert tokens.tolist() == np.concatenate([s.tokens for s in open_shards(out)]).tolist()


def test_rerun_skips_finished_shards_and_refuses_another_config(tmp_path):
    out = tmp_path / "tok"
    first = tokenize([_need(WEB_JSONL)], out, TokenizeConfig(), workers=1)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "manifest.json" and p.name[0] != "."}
    victim = open_shards(out)[0].stem
    victim.with_name(victim.name + ".json").unlink()  # as if killed before the shard finished
    again = tokenize([_need(WEB_JSONL)], out, TokenizeConfig(), workers=1)
    assert again.shards_skipped == first.shards_total - 1
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "manifest.json" and p.name[0] != "."}
    assert set(after) == set(before)
    # finished shards were skipped, not rewritten: only the victim's files have new times
    untouched = {n: t for n, t in before.items() if not n.startswith(victim.name)}
    assert untouched and all(after[n] == t for n, t in untouched.items())
    assert again.manifest["tokens"] == first.manifest["tokens"]
    with pytest.raises(ValueError, match="another config"):
        tokenize([_need(WEB_JSONL)], out, TokenizeConfig(add_bos=True), workers=1)


def test_bad_input_is_counted_not_fatal(tmp_path):
    lines = [
        json.dumps({"id": "ok", "text": "A fine document."}),
        json.dumps({"id": "empty", "text": ""}),
        json.dumps({"id": "blank", "text": "   \n\t "}),
        '{"id": "surrogate", "text": "broken \\ud800 pair and \\udc00 end"}',
        json.dumps({"id": "huge", "text": "x" * 5000}),
        json.dumps({"id": "many", "text": "word " * 300}),
        '{"id": "cut", "text": "unterminated',
        json.dumps({"id": "number", "text": 42}),
        json.dumps({"id": "notext"}),
        json.dumps({"id": "ok2", "text": "Zweites Dokument, mit Umlauten: äöü ß."}),
    ]
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "tok"
    config = TokenizeConfig(max_document_chars=4000, max_document_tokens=200)
    summary = tokenize([src, empty], out, config, source="bad", workers=1)
    m = summary.manifest
    assert m["documents"] == 3 and m["documents_read"] == 10
    assert m["rejects"] == {"empty_document": 2, "malformed_json": 1, "malformed_record": 1, "missing_text": 1,
                            "too_large": 1, "too_many_tokens": 1}
    assert m["repaired_documents"] == 1 and m["repaired_characters"] == 2
    tok = get_tokenizer("phi3-mini")
    shard = next(s for s in open_shards(out) if len(s))
    assert tok.decode(shard.document(1)[:-1]) == "broken \ufffd pair and \ufffd end"
    rejects = [json.loads(x) for x in next(out.glob("*.rejects.jsonl")).read_text().splitlines()]
    assert {r["id"] for r in rejects} >= {"empty", "blank", "huge", "many", "number", "notext"}
    assert len(next(s for s in open_shards(out) if not len(s)).tokens) == 0  # the empty file is a finished shard


def test_chat_shards_carry_the_loss_mask(tmp_path):
    conversations = [
        {"messages": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "wizard", "content": "?"}]},
    ]
    src = tmp_path / "sft.jsonl.gz"
    with gzip.open(src, "wt") as handle:
        handle.write("\n".join(json.dumps(c) for c in conversations) + "\n")
    out = tmp_path / "sft"
    summary = tokenize([src], out, TokenizeConfig(chat=True), workers=1)
    assert summary.manifest["documents"] == 2 and summary.manifest["rejects"] == {"bad_chat_record": 1}
    shard = open_shards(out)[0]
    tok = get_tokenizer("phi3-mini")
    assert shard.mask is not None and len(shard.mask) == len(shard.tokens)
    assert tok.decode(np.asarray(shard.tokens)[np.asarray(shard.mask) == 1]) == (
        "7<|end|><|endoftext|>4<|end|><|endoftext|>")
    data = PackedDataset(out, seq_len=8, shuffle=False)
    sample = data.sample(0)
    assert sample["mask"].tolist() == np.asarray(shard.mask[:9]).tolist()
    # the trainer's targets: the next token, or -100 (ignored by the loss) where that token's mask is 0
    assert data.has_mask and len(data) == (len(shard.tokens) - 1) // 8
    x, y = data.batch(0, len(data))  # unshuffled: window i is tokens[8i : 8i + 9]
    tokens, mask = np.asarray(shard.tokens).astype(np.int64), np.asarray(shard.mask)
    for i in range(len(data)):
        window = slice(8 * i + 1, 8 * i + 9)
        assert x[i].tolist() == tokens[8 * i:8 * i + 8].tolist()
        assert y[i].tolist() == np.where(mask[window] == 0, -100, tokens[window]).tolist()
    assert (y == -100).any() and (y != -100).any()
    [(_, y_eval)] = data.fixed_batches(1, len(data))  # evaluation targets are masked the same way
    assert y_eval.tolist() == y.tolist()
    # shards with and without a loss mask do not mix silently
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"text": "Plain text has no loss mask."}) + "\n")
    tokenize([plain], tmp_path / "plain", TokenizeConfig(), workers=1)
    with pytest.raises(ValueError, match="loss mask"):
        PackedDataset([out, tmp_path / "plain"], seq_len=4)


def _digests(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.suffix in (".bin", ".offsets", ".idx", ".mask")}


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("local") / "tok"
    tokenize([_need(WEB_JSONL)], out, TokenizeConfig(tokenizer="phi3-small"), engine="local", workers=2)
    return _digests(out)


def test_one_stream_across_files_gives_the_shards_of_one_task_per_file(tmp_path, local_shards):
    """workers=1 reads and encodes every file through one encoder stream and commits in the background; the
    shards are byte for byte those of one pool task per file, and every manifest is in place when it returns."""
    out = tmp_path / "tok"
    summary = tokenize([_need(WEB_JSONL)], out, TokenizeConfig(tokenizer="phi3-small"), engine="local", workers=1)
    assert _digests(out) == local_shards
    assert len(list(out.glob("*.json"))) == len(summary.manifest["shards"]) + 1  # + the directory manifest
    assert not list(out.glob("*.tmp*"))


@pytest.mark.cluster
def test_ray_gives_identical_shards(ray_cluster, tmp_path, local_shards):
    out = tmp_path / "tok"
    tokenize([_need(WEB_JSONL)], out, TokenizeConfig(tokenizer="phi3-small"), engine="ray", workers=2)
    assert _digests(out) == local_shards and len(local_shards) == 21


@pytest.mark.cluster
def test_spark_gives_identical_shards(spark_local, tmp_path, local_shards):
    out = tmp_path / "tok"
    tokenize([_need(WEB_JSONL)], out, TokenizeConfig(tokenizer="phi3-small"), engine="spark", workers=2)
    assert _digests(out) == local_shards


def test_packed_dataset_reads_every_input_kind_and_refuses_bad_ones(tmp_path):
    from phi3data.tokenization.shards import TokenShardWriter

    def shard(stem, tokens, dtype="<u2", mask=None):
        writer = TokenShardWriter(stem, np.dtype(dtype), with_mask=mask is not None)
        writer.write(np.asarray(tokens), None if mask is None else np.asarray(mask))
        writer.close({})
        return stem

    (tmp_path / "a").mkdir()
    a0, a1 = shard(tmp_path / "a" / "s0", range(10)), shard(tmp_path / "a" / "s1", range(100, 130))
    stream = lambda d, pos: [d.batch(p, 1)[0][0].tolist() for p in pos]  # noqa: E731
    both = PackedDataset(tmp_path / "a", seq_len=4, shuffle=False)
    assert len(both) == 2 + 7 and both.num_tokens == 40 and not both.has_mask
    assert stream(both, [1, 2]) == [[4, 5, 6, 7], [100, 101, 102, 103]]  # the 10th token of s0 is never read
    # one shard stem (or its .bin), a list of inputs, a plain .bin with its dtype: the same windows
    assert stream(PackedDataset(a1, seq_len=4, shuffle=False), range(7)) == stream(both, range(2, 9))
    assert stream(PackedDataset(f"{a1}.bin", seq_len=4, shuffle=False), [0]) == [[100, 101, 102, 103]]
    assert stream(PackedDataset([a0, a1], seq_len=4, shuffle=False), range(9)) == stream(both, range(9))
    plain = tmp_path / "plain.bin"
    np.arange(100, 130, dtype="<u2").tofile(plain)
    assert stream(PackedDataset(plain, seq_len=4, dtype="uint16", shuffle=False), range(7)) == stream(both, range(2, 9))
    with pytest.raises(ValueError, match="dtype"):
        PackedDataset(plain, seq_len=4)
    (tmp_path / "p").mkdir()
    np.arange(30, dtype="<u2").tofile(tmp_path / "p" / "x.bin")
    with pytest.raises(ValueError, match="manifest.json"):
        PackedDataset(tmp_path / "p", seq_len=4)
    (tmp_path / "p" / "manifest.json").write_text(json.dumps({"dtype": "uint16"}))
    assert len(PackedDataset(tmp_path / "p", seq_len=4)) == 7
    (tmp_path / "p" / "manifest.json").write_text(json.dumps({"tokens": 30}))
    with pytest.raises(ValueError, match="no 'dtype' key"):
        PackedDataset(tmp_path / "p", seq_len=4)
    wide = shard(tmp_path / "wide", range(30), dtype="<u4")
    with pytest.raises(ValueError, match="mix dtypes"):
        PackedDataset([tmp_path / "a", wide], seq_len=4)
    with pytest.raises(ValueError, match="not the dtype uint16"):
        PackedDataset(wide, seq_len=4, dtype="uint16")
    with pytest.raises(ValueError, match="no token file has 33 tokens"):  # s1 has 30
        PackedDataset(tmp_path / "a", seq_len=32)
    with pytest.raises(ValueError, match="no tokens"):
        PackedDataset(shard(tmp_path / "empty", []), seq_len=4)
    with pytest.raises(FileNotFoundError):
        PackedDataset(tmp_path / "missing", seq_len=4)
    masked = shard(tmp_path / "m", range(30), mask=[i % 2 for i in range(30)])
    with pytest.raises(ValueError, match="some token files have a loss mask and some do not"):
        PackedDataset([masked, a1], seq_len=4)


def test_packed_dataset_is_deterministic_and_resumable(tmp_path):
    out = tmp_path / "tok"
    tokenize([_need(WEB_JSONL)], out, TokenizeConfig(), workers=1)
    shards = [np.asarray(s.tokens).astype(np.int64) for s in open_shards(out)]
    assert len(shards) > 1
    data = PackedDataset(out, seq_len=64, seed=7)
    per_shard = [(len(s) - 1) // 64 for s in shards]
    assert len(data) == sum(per_shard) and not data.has_mask
    # windows are taken shard by shard, in shard order, and never cross from one shard into the next
    first = 0
    for tokens, n in zip(shards, per_shard):
        for j in (0, n - 1):
            assert data.sample(first + j)["tokens"].tolist() == tokens[j * 64:j * 64 + 65].tolist()
        first += n
    assert sorted(data.order(0).tolist()) == list(range(len(data)))
    assert data.order(0).tolist() != data.order(1).tolist()
    # the iterator walks the same stream as the trainer's batch(start, size), epoch after epoch
    it = iter(data)
    head = [next(it)["tokens"] for _ in range(12)]
    state = data.state_dict()
    assert state == {"samples": 12, "seed": 7, "seq_len": 64, "num_tokens": sum(map(len, shards))}
    rest = [next(it)["tokens"] for _ in range(len(data) + 8)]  # runs into the next epoch
    x, y = data.batch(12, 4)
    assert x.tolist() == [r[:-1].tolist() for r in rest[:4]] and y.tolist() == [r[1:].tolist() for r in rest[:4]]
    k = len(data) - 12  # rest[k] is the first sample of epoch 1
    assert rest[k].tolist() == data.sample(int(data.order(1)[0]))["tokens"].tolist()
    resumed = PackedDataset(out, seq_len=64, seed=7)
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert all((a == next(it)["tokens"]).all() for a in rest)
    again = iter(PackedDataset(out, seq_len=64, seed=7))
    assert all((a == next(again)["tokens"]).all() for a in head)
    with pytest.raises(ValueError, match="another dataset or sequence length"):
        PackedDataset(out, seq_len=32, seed=7).load_state_dict(state)
    assert TokenShard.open(open_shards(out)[0].stem).manifest["format"] == "phi3data-tokens"


@pytest.mark.parametrize("name", ["phi3-small", "phi3-mini", "phi3-mini-hf"])
def test_threaded_encode_stream_keeps_document_order(name):
    """Chunks encoded on several threads come back in input order with the ids of a one-at-a-time encode."""
    from phi3data.tokenization.runner import encode_stream

    tok = get_tokenizer(name)
    docs = [(f"d{i}", t) for i, t in enumerate(_texts(_need(WEB_JSONL))[:60])]
    # small chunks, so many are in flight at once and finish out of order
    got = list(encode_stream(tok, iter(docs), threads=3, chunk_chars=2_000))
    assert [g[0] for g in got] == [d[0] for d in docs]
    assert [g[1] for g in got] == [len(t) for _, t in docs]
    for (_, text), (_, _, ids) in zip(docs, got, strict=True):
        assert ids.dtype == np.uint32 and ids.tolist() == tok.encode_text(text)


def test_rejects_are_written_in_input_order_whatever_the_thread_count(tmp_path):
    """Reader rejects are found while reading ahead, empty-document rejects when results return; the rejects
    file is still in input order, the same bytes with 1 or 4 encoder threads."""
    from phi3data.tokenization.runner import tokenize_shard

    lines = []
    for i in range(400):
        if i % 7 == 3:
            lines.append(f'{{"id": "m{i}", "text": ')  # malformed: a reader reject
        else:
            lines.append(json.dumps({"id": f"d{i}", "text": f"document {i} " * (1 + i % 50)}))
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    config = json.dumps(TokenizeConfig(tokenizer="phi3-small", max_document_tokens=60).__dict__, sort_keys=True)
    written = {}
    for threads in (1, 4):
        out = tmp_path / f"t{threads}"
        out.mkdir()
        item = {"path": str(src), "relpath": "in.jsonl", "key": "k", "source": "in", "stem": "s", "config_hash": "h",
                "threads": threads}
        tokenize_shard(config, str(out), item)
        written[threads] = (out / "s.rejects.jsonl").read_text()
    ids = [json.loads(line)["id"] for line in written[1].splitlines()]
    assert written[1] == written[4]
    assert len({json.loads(line)["reason"] for line in written[1].splitlines()}) >= 2
    # reader rejects are named <source>:<line> (1-based), too-long documents d<index> (0-based)
    assert ids == sorted(ids, key=lambda x: int(x.split(":")[-1]) - 1 if ":" in x else int(x[1:]))
