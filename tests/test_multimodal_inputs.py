"""Image-text inputs as a run plans them: which files under a directory are inputs, what keys a LLaVA shard,
the streamed LLaVA JSON, and record files with columns of their own. Real photos from scikit-image."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash
from conftest import JSONL_DIR, require_shared

from phi3data.io.inputs import plan_shards
from phi3data.multimodal import readers
from phi3data.multimodal.readers import (
    JsonArrayError,
    iter_json_array,
    read_all,
    read_llava,
    read_records_parquet,
    reject_counts,
)
from phi3data.multimodal.records import image_id, make_pairs, record_kind
from phi3data.multimodal.writers import write_parquet
from phi3data.pipelines.recipe import load_recipe
from phi3data.pipelines.runner import run_pipeline

skimage = pytest.importorskip("skimage")
DATA = Path(skimage.__file__).parent / "data"
CHELSEA, COFFEE, ROCKET = ((DATA / n).read_bytes() for n in ("chelsea.png", "coffee.png", "rocket.jpg"))


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_a_directory_of_webdataset_tars_skips_img2dataset_status_files(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for n, (image, caption) in enumerate([(CHELSEA, b"A cat"), (ROCKET, b"A rocket")]):
        with tarfile.open(shards / f"{n:05d}.tar", "w") as tar:
            add(tar, "000000000.png" if n == 0 else "000000000.jpg", image)
            add(tar, "000000000.txt", caption)
        pq.write_table(pa.table({"key": ["000000000", "000000001"], "url": ["http://a/x", "http://a/gone"],
                                 "status": ["success", "failed_to_download"], "error_message": [None, "404"]}),
                       shards / f"{n:05d}.parquet")
        (shards / f"{n:05d}_stats.json").write_text(json.dumps({"count": 2, "successes": 1}))

    assert [s.relpath for s in plan_shards(shards, "webdataset")] == ["00000.tar", "00001.tar"]
    assert [s.relpath for s in plan_shards(shards)] == ["00000.parquet", "00000_stats.json", "00001.parquet",
                                                        "00001_stats.json"]  # text formats: as before
    recipe = load_recipe({"pipeline": {"name": "wds"}, "input": {"format": "webdataset"},
                          "stage": [{"type": "image_decode"}]})
    summary = run_pipeline(recipe, shards, tmp_path / "out", engine="local", workers=1, progress=False)
    assert summary.shards_total == 2
    assert summary.stats["documents_out"] == 2
    assert summary.stats["read_rejects"] == {"download_failed": 2}


def test_url_lists_and_record_files_in_a_directory(tmp_path):
    (tmp_path / "a.txt").write_text("https://example.org/1.jpg\n")
    (tmp_path / "b.parquet").write_bytes(b"")
    (tmp_path / "notes.md").write_text("not an input")
    assert [s.relpath for s in plan_shards(tmp_path, "urls")] == ["a.txt", "b.parquet"]
    assert [s.relpath for s in plan_shards(tmp_path, "records")] == ["b.parquet"]


def test_text_inputs_keep_their_keys():
    jsonl = require_shared(JSONL_DIR)
    for shard in plan_shards(jsonl):
        assert shard.key == xxhash.xxh3_128(Path(shard.path).read_bytes()).hexdigest()
    assert plan_shards(jsonl, "jsonl") == plan_shards(jsonl)


def write_llava(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "images" / "cat.png").write_bytes(CHELSEA)
    convs = [{"id": "a", "image": "cat.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                                 {"from": "gpt", "value": "A cat."}]},
             {"id": "b", "image": "later.jpg", "conversations": [{"from": "human", "value": "<image>\nAnd this?"},
                                                                 {"from": "gpt", "value": "A rocket."}]},
             {"id": "c", "image": "../outside.png", "conversations": [{"from": "human", "value": "<image>"},
                                                                      {"from": "gpt", "value": "No."}]}]
    path = root / "llava.json"
    path.write_text(json.dumps(convs))
    return path


def test_a_llava_shard_key_covers_the_bytes_of_its_images(tmp_path):
    path = write_llava(tmp_path)
    images = tmp_path / "images"
    assert readers.llava_image_paths(path) == ["cat.png", "later.jpg"]  # the unsafe path is never read
    key = plan_shards(path, "llava", images)[0].key
    assert plan_shards(path, "llava", images)[0].key == key
    assert key != plan_shards(path)[0].key  # the JSON's bytes alone

    recipe = load_recipe({"pipeline": {"name": "llava"}, "input": {"format": "llava", "image_root": str(images)},
                          "stage": [{"type": "image_decode"}]})
    first = run_pipeline(recipe, path, tmp_path / "out", engine="local", workers=1, progress=False)
    assert first.stats["read_rejects"] == {"missing_image": 2}

    (images / "cat.png").write_bytes(COFFEE)  # same name, other picture
    assert plan_shards(path, "llava", images)[0].key != key
    (images / "later.jpg").write_bytes(ROCKET)  # a missing image appears
    again = run_pipeline(recipe, path, tmp_path / "out", engine="local", workers=1, progress=False)
    assert again.shards_skipped == 0
    assert again.stats["read_rejects"] == {"missing_image": 1}
    rows = pq.read_table(tmp_path / "out" / "data").to_pylist()
    assert {r["image_ids"][0] for r in rows} >= {image_id(COFFEE), image_id(ROCKET)}


def test_llava_json_is_streamed_value_by_value(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "JSON_CHUNK_CHARS", 7)  # every value runs across several reads
    values = [{"id": str(i), "text": "x" * i, "nested": [1, {"a": "]"}]} for i in range(40)]
    path = tmp_path / "list.json"
    path.write_text("\ufeff  [\n" + ",\n".join(json.dumps(v) for v in values) + "\n]\n")
    assert list(iter_json_array(path)) == values

    path.write_text(json.dumps(values[:2])[:-1] + ', {"id": "2", "broken": ]')
    got = []
    with pytest.raises(JsonArrayError) as err:
        got.extend(iter_json_array(path))
    assert got == values[:2] and err.value.index == 2
    path.write_text('{"id": "not a list"}')
    with pytest.raises(JsonArrayError, match="expected a JSON list"):
        list(iter_json_array(path))

    # the reader keeps the conversations before a break and rejects the rest of the file
    llava = write_llava(tmp_path / "broken")
    llava.write_text(llava.read_text()[:-1] + ", {")
    out = read_all(read_llava(llava, llava.parent / "images"))
    assert out.records.column("id").to_pylist() == ["a"]
    assert reject_counts(out.rejects) == {"missing_image": 2, "unreadable_json": 1}


def test_record_files_with_columns_of_their_own(tmp_path):
    pairs = make_pairs([{"image": CHELSEA, "text": "A cat"}, {"image": ROCKET, "text": "A rocket"}])
    extra = pairs.append_column("phash", pa.array([1, 2], pa.int64()))
    assert record_kind(extra) == "pair"
    write_parquet(extra, tmp_path / "extra.parquet")
    got = read_all(read_records_parquet(tmp_path / "extra.parquet")).records
    assert got.column_names == pairs.column_names + ["phash"] and got.column("phash").to_pylist() == [1, 2]

    pq.write_table(pairs.drop_columns(["image"]), tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match=r"missing\.parquet.*'pair' lacks column\(s\) image \("):
        list(read_records_parquet(tmp_path / "missing.parquet"))
    pq.write_table(pairs.set_column(3, "text", pa.array([1, 2], pa.int64())).set_column(
        1, "image_id", pa.array([[1], [2]], pa.list_(pa.int64()))), tmp_path / "types.parquet")
    with pytest.raises(ValueError, match=r"types\.parquet: column 'image_id' is list<.*pair records need string"):
        list(read_records_parquet(tmp_path / "types.parquet"))

    # a pipeline's output (stage columns added) is a records input, and again a pipeline's output
    recipe = load_recipe({"pipeline": {"name": "again"}, "input": {"format": "records"},
                          "stage": [{"type": "image_decode", "phash": True}]})
    run_pipeline(recipe, tmp_path / "extra.parquet", tmp_path / "one", engine="local", workers=1, progress=False)
    first = next((tmp_path / "one" / "data").glob("*.parquet"))
    run_pipeline(recipe, first, tmp_path / "two", engine="local", workers=1, progress=False)
    second = pq.read_table(next((tmp_path / "two" / "data").glob("*.parquet")))
    assert second.equals(pq.read_table(first))
