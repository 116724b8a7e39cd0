"""Image stages (decode, size, resize, pHash dedup) and image-text inputs of ``phi3data run``, on real photos from
scikit-image and scikit-learn: counted drop reasons, pHash against imagehash, LLaVA's pad-to-square, the
image_pairs recipe and identical output on local, Ray and Spark."""

from __future__ import annotations

import io
import json
import struct
import tomllib
import zlib
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage
from conftest import ROOT, output_files
from PIL import Image
from sklearn.datasets import load_sample_images

from phi3data.documents import make_rejects
from phi3data.multimodal import images as img
from phi3data.multimodal.records import CONVERSATION_SCHEMA, image_id, make_conversations, make_pairs, pair_id
from phi3data.multimodal.writers import TarShardWriter, write_parquet
from phi3data.pipelines.recipe import RecipeError, load_recipe
from phi3data.pipelines.runner import run_pipeline
from phi3data.pipelines.stages.image import ImageDecode, ImageResize, ImageSize

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
RECIPE = ROOT / "pipelines" / "image_pairs.toml"

# Real photos with real English captions: everything here passes the recipe.
PHOTOS = {
    "astronaut.png": "An astronaut in a white space suit poses in front of the American flag.",
    "coffee.png": "A cup of coffee with latte art on a saucer.",
    "chelsea.png": "A ginger tabby cat looks to the left.",
    "rocket.jpg": "A rocket stands on the launch pad before lift off.",
    "hubble_deep_field.jpg": "Hundreds of distant galaxies seen by the Hubble space telescope.",
    "ihc.png": "A stained tissue sample seen through a light microscope.",
    "camera.png": "A man with a camera on a tripod in a park.",
    "retina.jpg": "A photograph of the back of a human eye.",
}


def photo(name: str) -> bytes:
    """A packaged photo's file bytes (scikit-image's data folder, or scikit-learn's sample images)."""
    if name in ("china.jpg", "flower.jpg"):
        return Path(next(f for f in load_sample_images().filenames if f.endswith(name))).read_bytes()
    return (SKIMAGE_DATA / name).read_bytes()


def encode(array: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **kwargs)
    return out.getvalue()


def reencoded(name: str, side: int, quality: int = 80) -> bytes:
    """A smaller JPEG copy of a photo: what a re-upload of the same picture looks like."""
    image = Image.open(io.BytesIO(photo(name))).convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's calling card) and no pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def bad_samples() -> dict[str, tuple[bytes, str, str]]:
    """key -> (image bytes, caption, the reason the recipe drops it under)."""
    rocket = photo("rocket.jpg")
    noise = np.random.default_rng(0)
    return {
        "truncated": (rocket[: len(rocket) // 2], "Half of a rocket photograph.", "image_decode:truncated"),
        "not_an_image": (b"<html><body>404 not found</body></html>", "A missing picture of a dog.",
                         "image_decode:undecodable"),
        "bomb": (png_header_only(60_000, 60_000), "A picture claiming to be huge.",
                 "image_decode:decompression_bomb"),
        "ppm": (encode(np.asarray(Image.open(io.BytesIO(photo("coins.png")))), "PPM"),
                "Old coins on a table, in a rare file format.", "image_decode:unsupported_format"),
        "sliver": (encode(noise.integers(0, 255, (1000, 1), dtype=np.uint8)), "A one pixel wide sliver of noise.",
                   "image_size:too_small"),
        "tall": (encode(noise.integers(0, 255, (900, 250, 3), dtype=np.uint8)), "A tall strip of colour noise.",
                 "image_size:too_tall"),
        "repeated": (photo("brick.png"), "buy now buy now buy now buy now buy now buy now buy now buy now",
                     "caption_repetition:dup_5_gram"),
        "one_word": (photo("moon.png"), "Moonlight.", "caption_length:too_few_words"),
        "german": (photo("coins.png"), "Eine Sammlung alter Münzen liegt auf dem dunklen Tisch.",
                   "caption_language:other_language"),
        "duplicate": (reencoded("astronaut.png", 400), "The astronaut photo again, smaller and saved as a JPEG.",
                      "image_dedup:duplicate"),
    }


def write_tar(path: Path) -> Path:
    """A WebDataset shard: the good photos, the bad samples, and one img2dataset failed-download sidecar."""
    with TarShardWriter(path) as tar:
        for name, caption in {**PHOTOS, "china.jpg": "A temple roof in front of green trees.",
                              "flower.jpg": "A pink flower with a yellow centre."}.items():
            ext = "jpg" if name.endswith("jpg") else "png"
            tar.add(Path(name).stem, {ext: photo(name), "txt": caption.encode()})
        for key, (data, caption, _) in bad_samples().items():
            tar.add(f"x_{key}", {"jpg": data, "txt": caption.encode()})
        tar.add("x_failed", {"json": json.dumps({"status": "failed_to_download", "error_message": "timeout",
                                                 "url": "http://example.invalid/a.jpg"}).encode()})
    return path


@pytest.fixture(scope="module")
def pairs_tar(tmp_path_factory) -> Path:
    return write_tar(tmp_path_factory.mktemp("wds") / "00000.tar")


@pytest.fixture(scope="module")
def recipe_run(pairs_tar, tmp_path_factory):
    out = tmp_path_factory.mktemp("image_pairs")
    return run_pipeline(load_recipe(RECIPE), pairs_tar, out, engine="local", workers=1, progress=False)


def parquet_rows(folder: Path) -> list[dict]:
    """Every row of every parquet file in a run's output folder (segments write one file each)."""
    return [row for path in sorted(folder.glob("*.parquet")) for row in pq.read_table(path).to_pylist()]


def drops_of(stats: dict) -> dict[str, int]:
    return {reason: n for stage in stats["stages"] for reason, n in stage["drops"].items()}


# --- helpers: pHash, decode, pad-to-square ---------------------------------------------------------------------


def test_phash_equals_imagehash_bit_for_bit():
    names = ["astronaut.png", "camera.png", "coffee.png", "chelsea.png", "rocket.jpg", "coins.png", "logo.png",
             "page.png", "hubble_deep_field.jpg", "china.jpg"]
    for name in names:
        image = Image.open(io.BytesIO(photo(name)))
        assert img.phash(image) == int(str(imagehash.phash(image)), 16), name


def test_phash_catches_a_resized_reencoded_copy_but_not_other_photos():
    names = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png", "coins.png", "moon.png",
             "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "china.jpg", "flower.jpg", "brick.png", "page.png"]
    hashes = {n: img.phash(img.decode_image(photo(n))) for n in names}
    for name in ("astronaut.png", "chelsea.png", "china.jpg"):
        copy = img.phash(img.decode_image(reencoded(name, 300, quality=70)))
        assert img.hamming(copy, hashes[name]) <= 4, name
    closest = min(img.hamming(hashes[a], hashes[b]) for i, a in enumerate(names) for b in names[i + 1:])
    assert closest > 4


def test_decode_drops_bad_images_with_their_reasons_and_sizes_the_rest():
    samples = bad_samples()
    rows = [{"image": photo("chelsea.png"), "text": "cat", "source": "t"}]
    rows += [{"image": samples[k][0], "text": k, "source": "t"}
             for k in ("truncated", "not_an_image", "bomb", "ppm")]
    out = ImageDecode(ImageDecode.Params()).process(make_pairs(rows))
    assert dict(out.drops) == {"image_decode:truncated": 1, "image_decode:undecodable": 1,
                               "image_decode:decompression_bomb": 1, "image_decode:unsupported_format": 1}
    assert sorted(r["reason"] for r in out.rejects) == ["decompression_bomb", "truncated", "undecodable",
                                                        "unsupported_format"]
    assert make_rejects(out.rejects).num_rows == 4  # the rows fit the run's rejects schema
    kept = out.batch.to_pylist()
    chelsea = Image.open(io.BytesIO(photo("chelsea.png")))
    assert [(r["width"], r["height"], r["image_format"]) for r in kept] == [(*chelsea.size, "PNG")]


def test_a_conversation_is_dropped_when_any_of_its_images_fails():
    good, truncated = photo("coffee.png"), bad_samples()["truncated"][0]
    table = make_conversations([
        {"id": "ok", "messages": [{"role": "user", "content": "<|image|><|image|> same?"},
                                  {"role": "assistant", "content": "no"}], "images": [good, photo("camera.png")]},
        {"id": "bad", "messages": [{"role": "user", "content": "<|image|><|image|> same?"},
                                   {"role": "assistant", "content": "no"}], "images": [good, truncated]},
    ])
    out = ImageDecode(ImageDecode.Params()).process(table)
    assert dict(out.drops) == {"image_decode:truncated": 1}
    assert out.batch.column("id").to_pylist() == ["ok"]
    assert out.batch.column("widths").to_pylist() == [[600, 512]]
    sized = ImageSize(ImageSize.Params(min_side=450)).process(out.batch)
    assert dict(sized.drops) == {"image_size:too_small": 1}  # coffee is 600x400


def test_size_presets_fill_the_projects_bounds_and_explicit_values_win():
    datacomp = ImageSize.Params(preset="datacomp")
    assert (datacomp.min_side, datacomp.max_side, datacomp.max_aspect) == (200, None, 3.0)
    obelics = ImageSize.Params(preset="obelics", min_side=100)
    assert (obelics.min_side, obelics.max_side, obelics.min_aspect, obelics.max_aspect) == (100, 20_000, 0.5, 2.0)
    stage = ImageSize(ImageSize.Params(preset="obelics"))
    rows = [{"image": photo(n), "text": n, "source": "t"} for n in ("coffee.png", "text.png", "page.png")]
    out = stage.process(make_pairs(rows))  # text.png is 448x172 (aspect 2.6), page.png 384x191 (2.01)
    assert dict(out.drops) == {"image_size:too_wide": 2}


def test_pad_to_square_resize_reencodes_with_new_ids_and_keeps_the_original():
    rows = [{"image": photo("coffee.png"), "text": "A cup of coffee.", "source": "t"}]
    pairs = make_pairs(rows)
    out = ImageResize(ImageResize.Params(size=224)).process(pairs).batch.to_pylist()[0]
    resized = Image.open(io.BytesIO(out["image"]))
    assert (resized.format, resized.size) == ("JPEG", (224, 224))
    assert out["image_id"] == image_id(out["image"]) != pairs.column("image_id")[0].as_py()
    assert out["id"] == pair_id(out["image_id"], "A cup of coffee.")
    assert out["original_image_id"] == pairs.column("image_id")[0].as_py()
    pixels = np.asarray(resized, dtype=np.int16)  # 600x400 -> padding bands of 600/6 rows above and below
    assert np.abs(pixels[:30].reshape(-1, 3).mean(axis=0) - img.CLIP_MEAN_RGB).max() < 3
    own_mean = np.asarray(Image.open(io.BytesIO(photo("coffee.png"))).convert("RGB")).reshape(-1, 3).mean(axis=0)
    mean_pad = ImageResize(ImageResize.Params(size=224, background="mean", format="png")).process(pairs)
    padded = np.asarray(Image.open(io.BytesIO(mean_pad.batch.column("image")[0].as_py())), dtype=np.int16)
    assert np.abs(padded[:30].reshape(-1, 3).mean(axis=0) - own_mean).max() < 1.5
    crop = ImageResize(ImageResize.Params(mode="center_crop", size=128, format="webp")).process(pairs)
    assert Image.open(io.BytesIO(crop.batch.column("image")[0].as_py())).size == (128, 128)
    short = ImageResize(ImageResize.Params(mode="shorter_side", size=200, draft=False)).process(pairs)
    assert Image.open(io.BytesIO(short.batch.column("image")[0].as_py())).size == (300, 200)


# --- the image_pairs recipe through `phi3data run` ---------------------------------------------------------


def test_image_pairs_recipe_counts_every_reason_and_keeps_the_good_pairs(recipe_run):
    stats = recipe_run.stats
    expected = {reason: 1 for _, _, reason in bad_samples().values()}
    assert drops_of(stats) == expected
    assert stats["read_rejects"] == {"failed_sidecar": 1}
    decision = stats["decisions"]["image_dedup"]
    assert (decision["links"], decision["clusters"], decision["in_clusters"], decision["to_drop"]) == (1, 1, 2, 1)
    out = recipe_run.output
    rejects = parquet_rows(out / "rejects")
    assert sorted(r["reason"] for r in rejects) == ["decompression_bomb", "failed_sidecar", "truncated",
                                                    "undecodable", "unsupported_format"]
    data = pq.read_table(next((out / "data").glob("*.parquet")))
    keys = sorted(json.loads(m)["key"] for m in data.column("metadata").to_pylist())
    assert keys == sorted([Path(n).stem for n in PHOTOS] + ["china", "flower"])
    originals = {image_id(photo(n)): n for n in [*PHOTOS, "china.jpg", "flower.jpg"]}
    for row in data.to_pylist():
        source = Image.open(io.BytesIO(photo(originals[row["original_image_id"]])))
        assert row["phash"] & (2**64 - 1) == int(str(imagehash.phash(source)), 16)  # hashed before the resize
        image = Image.open(io.BytesIO(row["image"]))
        assert (image.format, image.size, row["width"], row["height"]) == ("JPEG", (336, 336), 336, 336)
        assert row["image_id"] == image_id(row["image"]) and row["id"] == pair_id(row["image_id"], row["text"])
    findings = parquet_rows(out / "findings")
    dup = [f for f in findings if f["stage"] == "image_dedup"]
    assert len(dup) == 1
    original = make_pairs([{"image": photo("astronaut.png"), "text": PHOTOS["astronaut.png"]}])
    assert json.loads(dup[0]["detail"])["kept"] == original.column("id")[0].as_py()  # the larger image is kept


def test_image_inputs_need_known_options():
    with pytest.raises(RecipeError, match="image_root"):
        load_recipe({"pipeline": {"name": "x"}, "input": {"format": "webdataset", "image_root": "imgs"},
                     "stage": [{"type": "image_decode"}]})


def test_llava_input_with_image_root_counts_read_rejects_and_drops(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "cat.png").write_bytes(photo("chelsea.png"))
    (images / "cut.jpg").write_bytes(bad_samples()["truncated"][0])
    convs = [{"id": "a", "image": "cat.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                                 {"from": "gpt", "value": "A cat."}]},
             {"id": "b", "image": "cut.jpg", "conversations": [{"from": "human", "value": "<image>\nAnd this?"},
                                                               {"from": "gpt", "value": "A rocket."}]},
             {"id": "c", "image": "gone.jpg", "conversations": [{"from": "human", "value": "<image>\nHm?"},
                                                                {"from": "gpt", "value": "Nothing."}]}]
    (tmp_path / "llava.json").write_text(json.dumps(convs))
    recipe = load_recipe({"pipeline": {"name": "llava"}, "input": {"format": "llava", "image_root": str(images)},
                          "stage": [{"type": "image_decode"}, {"type": "image_resize", "size": 64}]})
    summary = run_pipeline(recipe, tmp_path / "llava.json", tmp_path / "out", engine="local", workers=1,
                           progress=False)
    assert summary.stats["read_rejects"] == {"missing_image": 1}
    assert drops_of(summary.stats) == {"image_decode:truncated": 1}
    rows = pq.read_table(next((tmp_path / "out" / "data").glob("*.parquet"))).to_pylist()
    assert [r["id"] for r in rows] == ["a"]
    assert Image.open(io.BytesIO(rows[0]["images"][0])).size == (64, 64)
    assert rows[0]["image_ids"] == [image_id(rows[0]["images"][0])]
    assert rows[0]["original_image_ids"] == [image_id(photo("chelsea.png"))]


def test_an_image_shard_with_nothing_left_keeps_its_record_schema(tmp_path):
    write_parquet(make_pairs([{"image": bad_samples()["truncated"][0], "text": "cut"}]), tmp_path / "in.parquet")
    recipe = load_recipe({"pipeline": {"name": "empty"}, "input": {"format": "records"},
                          "stage": [{"type": "image_decode"}]})
    run_pipeline(recipe, tmp_path / "in.parquet", tmp_path / "out", engine="local", workers=1, progress=False)
    data = pq.read_table(next((tmp_path / "out" / "data").glob("*.parquet")))
    assert data.num_rows == 0
    assert {"image_id", "image", "text", "width", "height", "image_format"} <= set(data.column_names)
    assert data.schema.field("image").type == pa.large_binary()
    assert CONVERSATION_SCHEMA.names != data.column_names


def write_image_warc(path: Path) -> Path:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as handle:
        writer = WARCWriter(handle, gzip=True)
        for url, status, ctype, body in [("https://example.org/cat.png", "200 OK", "image/png", photo("chelsea.png")),
                                         ("https://example.org/", "200 OK", "text/html", b"<html>hi</html>"),
                                         ("https://example.org/gone.jpg", "404 Not Found", "image/jpeg", b"no"),
                                         ("https://example.org/cut.jpg", "200 OK", "image/jpeg",
                                          bad_samples()["truncated"][0])]:
            headers = StatusAndHeaders(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))],
                                       protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body),
                                                          http_headers=headers))
    return path


def write_cauldron_file(path: Path) -> Path:
    from phi3data.multimodal.writers import write_cauldron

    table = make_conversations([{"id": "q", "messages": [{"role": "user", "content": "<|image|>What is it?"},
                                                         {"role": "assistant", "content": "A cat."}],
                                 "images": [photo("chelsea.png")]}])
    return write_cauldron(table, path)


def write_urls(path: Path) -> Path:
    rows = [{"url": "https://example.org/a.jpg", "caption": "a cat on a mat"},
            {"url": "ftp://example.org/b.jpg", "caption": "not fetchable"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(("fmt", "write", "stages", "read_rejects", "drops", "kept"), [
    ("warc_images", lambda d: write_image_warc(d / "images.warc.gz"), [{"type": "image_decode"}],
     {"http_error": 1}, {"image_decode:truncated": 1}, 1),
    ("cauldron", lambda d: write_cauldron_file(d / "cauldron.parquet"), [{"type": "image_decode"}], {}, {}, 1),
    ("urls", lambda d: write_urls(d / "urls.jsonl"), [{"type": "length", "min_chars": 1}],
     {"invalid_url": 1}, {}, 1),
])
def test_every_image_input_format_runs_with_its_read_rejects(tmp_path, fmt, write, stages, read_rejects, drops,
                                                             kept):
    path = write(tmp_path)
    recipe = load_recipe({"pipeline": {"name": fmt}, "input": {"format": fmt}, "stage": stages})
    summary = run_pipeline(recipe, path, tmp_path / "out", engine="local", workers=1, progress=False)
    assert summary.stats["read_rejects"] == read_rejects
    assert drops_of(summary.stats) == drops
    assert summary.stats["documents_out"] == kept
    rejects = parquet_rows(tmp_path / "out" / "rejects")
    assert sorted(r["reason"] for r in rejects) == sorted([*read_rejects, *(d.split(":")[1] for d in drops)])


def test_exact_image_dedup_matches_identical_bytes_only(tmp_path):
    astronaut = photo("astronaut.png")
    rows = [{"image": astronaut, "text": "An astronaut."}, {"image": astronaut, "text": "The same astronaut."},
            {"image": reencoded("astronaut.png", 400), "text": "A smaller astronaut."}]
    write_parquet(make_pairs(rows), tmp_path / "in.parquet")
    for method, dropped in (("exact", 1), ("phash", 2)):
        recipe = load_recipe({"pipeline": {"name": method}, "input": {"format": "records"},
                              "stage": [{"type": "image_dedup", "method": method}]})
        out = tmp_path / method
        summary = run_pipeline(recipe, tmp_path / "in.parquet", out, engine="local", workers=1, progress=False)
        assert drops_of(summary.stats) == {"image_dedup:duplicate": dropped}
        kept = set(pq.read_table(next((out / "data").glob("*.parquet"))).column("id").to_pylist())
        full = min(pair_id(image_id(astronaut), t) for t in ("An astronaut.", "The same astronaut."))
        smaller = make_pairs(rows[2:]).column("id")[0].as_py()
        assert kept == ({full, smaller} if method == "exact" else {full})


# --- the same output on every engine ---------------------------------------------------------------------------


def two_record_shards(root: Path) -> Path:
    """Two parquet shards of pairs; the re-encoded astronaut sits in the second, its original in the first."""
    samples = bad_samples()
    first = [{"image": photo(n), "text": c, "source": "a"} for n, c in list(PHOTOS.items())[:4]]
    second = [{"image": photo(n), "text": c, "source": "b"} for n, c in list(PHOTOS.items())[4:]]
    second += [{"image": samples[k][0], "text": samples[k][1], "source": "b"}
               for k in ("duplicate", "truncated", "sliver", "german")]
    write_parquet(make_pairs(first), root / "a.parquet")
    write_parquet(make_pairs(second), root / "b.parquet")
    return root


@pytest.fixture(scope="module")
def records_recipe():
    data = tomllib.loads(RECIPE.read_text())
    data["input"] = {"format": "records"}
    return load_recipe(data)


@pytest.fixture(scope="module")
def local_records_run(records_recipe, tmp_path_factory) -> Path:
    root = two_record_shards(tmp_path_factory.mktemp("records"))
    out = tmp_path_factory.mktemp("records_local")
    run_pipeline(records_recipe, root, out, engine="local", workers=2, progress=False)
    return out


def table_rows(out: Path, folder: str) -> list:
    rows = []
    for path in sorted((out / folder).glob("*.parquet")):
        rows.extend(json.dumps(r, sort_keys=True, default=lambda b: b.hex()) for r in pq.read_table(path).to_pylist())
    return sorted(rows)


@pytest.mark.cluster
@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_image_recipe_gives_identical_output_on_every_engine(engine, engine_up, records_recipe, local_records_run,
                                                             tmp_path):
    root = two_record_shards(tmp_path / "in")
    out = tmp_path / engine
    summary = run_pipeline(records_recipe, root, out, engine=engine, workers=2, progress=False)
    assert drops_of(summary.stats) == {"image_decode:truncated": 1, "image_size:too_small": 1,
                                       "caption_language:other_language": 1, "image_dedup:duplicate": 1}
    assert output_files(out) == output_files(local_records_run)
    for folder in ("data", "rejects", "findings"):
        assert table_rows(out, folder) == table_rows(local_records_run, folder)
