"""Image-text records, readers and writers on real images (scikit-image's and matplotlib's bundled photos)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phi3data.documents import REJECT_SCHEMA
from phi3data.multimodal.readers import (
    image_ids_of,
    read_all,
    read_cauldron,
    read_img2dataset_stats,
    read_llava,
    read_records_parquet,
    read_url_list,
    read_warc_images,
    read_webdataset,
    reject_counts,
)
from phi3data.multimodal.records import (
    IMAGE_PLACEHOLDER,
    make_interleaved,
    make_pairs,
    pair_id,
    record_kind,
    sniff_image_type,
)
from phi3data.multimodal.writers import CAULDRON_SCHEMA, write_cauldron, write_parquet, write_webdataset

skimage = pytest.importorskip("skimage")
matplotlib = pytest.importorskip("matplotlib")

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
MPL_DATA = Path(matplotlib.get_data_path()) / "sample_data"


def photo(name: str) -> bytes:
    path = SKIMAGE_DATA / name if (SKIMAGE_DATA / name).exists() else MPL_DATA / name
    return path.read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


CHELSEA, COFFEE, ROCKET, HOPPER, CAMERA = (photo(n) for n in (
    "chelsea.png", "coffee.png", "rocket.jpg", "grace_hopper.jpg", "camera.png"))


def test_records_are_content_addressed():
    pairs = make_pairs([{"image": HOPPER, "text": "Grace Hopper", "source": "t"}])
    row = pairs.to_pylist()[0]
    assert row["image_id"] == sha(HOPPER) and len(row["image_id"]) == 64
    assert row["id"] == pair_id(sha(HOPPER), "Grace Hopper")
    assert sniff_image_type(HOPPER) == "jpg" and sniff_image_type(CHELSEA) == "png"
    doc = make_interleaved([{"id": "d", "texts": ["A cat:", None, "and coffee:", None],
                             "images": [None, CHELSEA, None, COFFEE], "source": "t"}])
    assert doc.column("image_ids").to_pylist()[0] == [None, sha(CHELSEA), None, sha(COFFEE)]
    assert record_kind(doc) == "interleaved"
    with pytest.raises(ValueError):
        make_interleaved([{"id": "x", "texts": ["a", "b"], "images": [None, CHELSEA, COFFEE]}])
    with pytest.raises(ValueError):
        make_interleaved([{"id": "x", "texts": ["a"], "images": [CHELSEA]}])  # both at one position


def write_llava(tmp_path: Path) -> Path:
    (tmp_path / "images" / "coco").mkdir(parents=True)
    (tmp_path / "images" / "coco" / "chelsea.png").write_bytes(CHELSEA)
    (tmp_path / "images" / "coco" / "coffee.png").write_bytes(COFFEE)
    (tmp_path / "images" / "rocket.jpg").write_bytes(ROCKET)
    data = [
        {"id": "a", "image": "coco/chelsea.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat animal is this?"}, {"from": "gpt", "value": "A cat."}]},
        {"id": "b", "image": "coco/missing.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "..."}]},
        {"id": "c", "image": "coco/coffee.png", "conversations": [
            {"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "Same."}]},
        {"id": "d", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        {"id": "e", "image": ["rocket.jpg", "coco/coffee.png"], "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image> then <image>: what changed?"},
            {"from": "gpt", "value": "Everything."}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(data))
    return path


def test_llava_json(tmp_path):
    path = write_llava(tmp_path)
    got = read_all(read_llava(path, tmp_path / "images"))
    rows = got.records.to_pylist()
    assert [r["id"] for r in rows] == ["a", "d", "e"]
    a, d, e = rows
    assert a["image_ids"] == [sha(CHELSEA)] and a["images"] == [CHELSEA]
    assert a["messages"] == [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nWhat animal is this?"},
                             {"role": "assistant", "content": "A cat."}]
    assert d["images"] == [] and [m["role"] for m in d["messages"]] == ["user", "assistant"]
    assert e["image_ids"] == [sha(ROCKET), sha(COFFEE)]
    assert [m["role"] for m in e["messages"]] == ["system", "user", "assistant"]
    assert all("<image>" not in m["content"] for r in rows for m in r["messages"])
    assert got.rejects.schema == REJECT_SCHEMA
    assert reject_counts(got.rejects) == {"missing_image": 1, "placeholder_mismatch": 1}
    by_id = {r["id"]: r for r in got.rejects.to_pylist()}
    assert by_id["b"]["reason"] == "missing_image" and by_id["c"]["reason"] == "placeholder_mismatch"
    assert {r["source"] for r in got.rejects.to_pylist()} == {"llava.json"}
    assert image_ids_of(got.records) == [sha(CHELSEA), sha(ROCKET), sha(COFFEE)]

    # round trip through the parquet writer: identical records
    out = write_parquet(got.records, tmp_path / "out" / "conv.parquet")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]
    again = read_all(read_records_parquet(out))
    assert again.records.equals(got.records)

    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "x", "conversations": [')
    bad = read_all(read_llava(broken, tmp_path / "images"))
    assert bad.records.num_rows == 0 and reject_counts(bad.rejects) == {"unreadable_json": 1}


def test_cauldron_parquet_round_trip(tmp_path):
    table = pa.table({
        "images": [[{"bytes": HOPPER, "path": "hopper.jpg"}],
                   [{"bytes": CHELSEA, "path": None}, {"bytes": COFFEE, "path": None}],
                   [{"bytes": None, "path": "gone.png"}]],
        "texts": [[{"user": "Who is this?", "assistant": "Grace Hopper.", "source": "vqa"},
                   {"user": "Her field?", "assistant": "Computing.", "source": "vqa"}],
                  [{"user": "Which is a cat?", "assistant": "The first.", "source": "cmp"}],
                  [{"user": "?", "assistant": "!", "source": "x"}]],
    }, schema=CAULDRON_SCHEMA)
    src = tmp_path / "train-00000.parquet"
    pq.write_table(table, src)
    got = read_all(read_cauldron(src))
    rows = got.records.to_pylist()
    assert [r["id"] for r in rows] == ["train-00000.parquet:0", "train-00000.parquet:1"]
    assert rows[0]["image_ids"] == [sha(HOPPER)]
    assert rows[0]["messages"][0] == {"role": "user", "content": IMAGE_PLACEHOLDER + "Who is this?"}
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert rows[1]["messages"][0]["content"].startswith(IMAGE_PLACEHOLDER * 2)
    assert reject_counts(got.rejects) == {"missing_image": 1}

    out = write_cauldron(got.records, tmp_path / "out" / "train-00000.parquet")
    again = read_all(read_cauldron(out))
    assert again.records.equals(got.records)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_with_img2dataset_status(tmp_path):
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "000000000.jpg", HOPPER)
        add_member(tar, "000000000.txt", b"Grace Hopper at her desk")
        add_member(tar, "000000000.json", json.dumps({"url": "https://example.org/h.jpg", "status": "success",
                                                      "key": "000000000"}).encode())
        add_member(tar, "000000001.png", CAMERA)
        add_member(tar, "000000001.txt", b"A cameraman")
        add_member(tar, "000000002.json", json.dumps({"url": "https://example.org/x.jpg",
                                                      "status": "failed_to_download",
                                                      "error_message": "HTTP 404"}).encode())
        add_member(tar, "000000003.txt", b"caption without an image")
        add_member(tar, "000000004.webp", CHELSEA)  # image without caption or json
    pq.write_table(pa.table({"key": ["000000000", "000000001", "000000005"],
                             "url": ["https://example.org/h.jpg", "https://example.org/c.png",
                                     "https://example.org/gone.jpg"],
                             "status": ["success", "success", "failed_to_download"],
                             "error_message": [None, None, "timeout"]}), tmp_path / "00000.parquet")
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 6, "successes": 2}))

    got = read_all(read_webdataset(shard))
    rows = got.records.to_pylist()
    assert [r["image_id"] for r in rows] == [sha(HOPPER), sha(CAMERA)]
    assert [r["text"] for r in rows] == ["Grace Hopper at her desk", "A cameraman"]
    assert rows[0]["url"] == "https://example.org/h.jpg"
    assert reject_counts(got.rejects) == {"failed_sidecar": 1, "orphan_member": 2, "download_failed": 1}
    assert {r["id"] for r in got.rejects.to_pylist()} == {"000000002", "000000003", "000000004", "000000005"}
    assert read_img2dataset_stats(shard)["successes"] == 2

    out = write_webdataset(got.records, tmp_path / "out" / "00000.tar")
    again = read_all(read_webdataset(out, source="00000.tar"))
    assert again.records.equals(got.records)
    assert again.rejects.num_rows == 0


def test_warc_images(tmp_path):
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    path = tmp_path / "images.warc.gz"
    with open(path, "wb") as handle:
        writer = WARCWriter(handle, gzip=True)

        def response(url, status, ctype, body):
            headers = StatusAndHeaders(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))],
                                       protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body),
                                                          http_headers=headers))

        response("https://example.org/hopper.jpg", "200 OK", "image/jpeg", HOPPER)
        response("https://example.org/index.html", "200 OK", "text/html; charset=utf-8", b"<html>hi</html>")
        response("https://example.org/camera.png", "200 OK", "image/png", CAMERA)
        response("https://example.org/gone.png", "404 Not Found", "image/png", b"nope")
        writer.write_record(writer.create_warc_record("https://example.org/rocket.jpg", "resource",
                                                      payload=io.BytesIO(ROCKET), warc_content_type="image/jpeg"))
    got = read_all(read_warc_images(path))
    rows = got.records.to_pylist()
    assert [r["id"] for r in rows] == [sha(HOPPER), sha(CAMERA), sha(ROCKET)]
    assert [r["url"] for r in rows] == ["https://example.org/hopper.jpg", "https://example.org/camera.png",
                                        "https://example.org/rocket.jpg"]
    assert rows[0]["image"] == HOPPER
    assert json.loads(rows[1]["metadata"])["content_type"] == "image/png"
    assert reject_counts(got.rejects) == {"http_error": 1}
    again = read_all(read_records_parquet(write_parquet(got.records, tmp_path / "img.parquet")))
    assert again.records.equals(got.records)


def test_url_lists(tmp_path):
    txt = tmp_path / "urls.txt"
    txt.write_text("# images\nhttps://example.org/a.jpg\n\nftp://example.org/b.jpg\nhttp://example.org/c.png\n")
    got = read_all(read_url_list(txt))
    assert got.records.column("url").to_pylist() == ["https://example.org/a.jpg", "http://example.org/c.png"]
    assert got.records.column("key").to_pylist() == ["000000000", "000000002"]
    assert reject_counts(got.rejects) == {"invalid_url": 1}

    rows = [{"url": "https://example.org/a.jpg", "caption": "a cat"}, {"url": "https://example.org/b.jpg",
                                                                        "caption": None}]
    jsonl = tmp_path / "urls.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    got = read_all(read_url_list(jsonl))
    assert got.records.column("text").to_pylist() == ["a cat", None]
    assert got.rejects.num_rows == 1
    parquet = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    got = read_all(read_url_list(parquet))
    assert got.records.column("url").to_pylist() == [r["url"] for r in rows]
    assert got.records.column("text").to_pylist() == ["a cat", None]
