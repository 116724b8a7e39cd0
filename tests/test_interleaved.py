"""Interleaved web documents: the page walk on hand-written HTML (order, srcset, relative URLs, captions, every
dropped image counted), on real WARC pages, the corpus-wide image URL frequency filter on two engines, and the
image URL list a finished run gives the fetcher."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import WARC_DIR, require_shared
from typer.testing import CliRunner

from phi3data.documents import make_batch
from phi3data.io.readers import read_records
from phi3data.multimodal.interleaved import (
    alt_text_pairs,
    extract_page,
    image_url_list,
    largest_srcset_candidate,
    resolve_url,
)
from phi3data.multimodal.readers import read_all, read_url_list
from phi3data.multimodal.records import INTERLEAVED_WEB_SCHEMA, URL_SCHEMA, record_kind
from phi3data.pipelines.recipe import load_recipe
from phi3data.pipelines.runner import run_pipeline

PAGE = b"""<!doctype html><html><head><title>Not text</title>
<link rel="canonical" href="https://example.org/blog/post.html"></head><body>
<header><a href="/"><img src="/logo.png" width="200" height="50"></a><nav><a href="/">Home</a></nav></header>
<article>
<h1>Cats  and
  dogs</h1>
<p>First paragraph, <b>bold</b> and plain.</p>
<img src="img/cat.jpg" alt="  A   sleeping cat " width="640" height="480">
<p>Second line one.<br>Second line two.</p>
<figure><img srcset="dog-320.jpg 320w, dog-1280.jpg 1280w, dog-640.jpg 640w" src="dog.jpg">
<figcaption>A dog, <i>captioned</i>.</figcaption></figure>
<img src="https://tracker.example.com/p.gif" width="1" height="1">
<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=">
<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" data-src="//cdn.example.net/lazy.jpg#frag">
<img src="/icons/star.svg"><img src="thumb.png" width="20" height="20"><img src="img/cat.jpg">
<img src="javascript:void(0)"><img alt="no source">
<img src="https://sb.scorecardresearch.com/p?c1=2">
<picture><source srcset="pic-800.webp 800w, pic-1600.webp 1600w" type="image/webp"><img src="pic.jpg" alt="pic">
</picture>
<figure><img src="gone.svg"><figcaption>Caption without a kept image.</figcaption></figure>
<p style="display: none">Hidden text.</p><script>var hidden = 1;</script>
<p>Last paragraph.</p>
</article>
<footer><img src="/footer-logo.png"> Copyright</footer>
<div class="share-buttons"><img src="/share.png">Share</div>
</body></html>"""


def test_a_page_is_walked_in_order_and_every_dropped_image_is_counted():
    page = extract_page(PAGE, "urn:sample:not-http")  # relative URLs resolve against the canonical link
    items = list(zip(page.texts, page.image_urls, page.alts, page.captions, page.widths, page.heights))
    assert items == [
        ("Cats and dogs", None, None, None, None, None),
        ("First paragraph, bold and plain.", None, None, None, None, None),
        (None, "https://example.org/blog/img/cat.jpg", "A sleeping cat", None, 640, 480),
        ("Second line one.\nSecond line two.", None, None, None, None, None),
        (None, "https://example.org/blog/dog-1280.jpg", None, "A dog, captioned.", None, None),
        (None, "https://cdn.example.net/lazy.jpg", None, None, None, None),
        (None, "https://example.org/blog/pic-1600.webp", "pic", None, None, None),
        ("Caption without a kept image.", None, None, None, None, None),
        ("Last paragraph.", None, None, None, None, None),
    ]
    assert page.text == "\n".join(t for t, *_ in items if t is not None)
    assert page.img_tags == 16 == page.images + len(page.dropped)
    assert Counter(reason for reason, _ in page.dropped) == {
        "boilerplate": 3, "tracking_pixel": 1, "data_uri": 1, "excluded_extension": 2, "too_small": 1,
        "repeated_in_page": 1, "bad_scheme": 1, "no_src": 1, "tracker_host": 1}
    assert ("tracking_pixel", "https://tracker.example.com/p.gif") in page.dropped


def test_srcset_candidates_and_url_resolution():
    assert largest_srcset_candidate("a.jpg 1x, b.jpg 2x") == "b.jpg"
    assert largest_srcset_candidate("small.jpg 300w, big.jpg 1200w, mid.jpg 600w") == "big.jpg"
    assert largest_srcset_candidate("only.jpg") == "only.jpg"
    assert largest_srcset_candidate("https://cdn.test/w_200,h_100/a.jpg 200w, https://cdn.test/w_800,h_400/a.jpg 800w"
                                    ) == "https://cdn.test/w_800,h_400/a.jpg"
    assert largest_srcset_candidate("data:image/png;base64,AAAA 2x, real.jpg 1x") == "real.jpg"
    assert largest_srcset_candidate("") is None
    assert resolve_url("../img/a.jpg?x=1#top", "https://example.org/a/b/page.html") == \
        ("https://example.org/a/img/a.jpg?x=1", None)
    assert resolve_url("//cdn.example.org/a.png", "http://example.org/") == ("http://cdn.example.org/a.png", None)
    assert resolve_url("a.png", None) == (None, "unresolvable")
    assert resolve_url("HTTPS://Example.org/A.png", None) == ("https://Example.org/A.png", None)
    assert resolve_url("ftp://example.org/a.png", None) == (None, "bad_scheme")
    assert resolve_url(" data:image/png;base64,AA", "https://example.org/") == (None, "data_uri")
    base_href = b'<html><head><base href="/static/"></head><body><p>x</p><img src="a.jpg"></body></html>'
    assert extract_page(base_href, "https://example.org/news/1.html").image_urls == \
        [None, "https://example.org/static/a.jpg"]


def test_real_warc_pages_give_absolute_urls_found_in_their_html():
    pages = [r for r in read_records(require_shared(WARC_DIR / "web-sample-00008.warc.gz"), fmt="warc",
                                     source="web-sample-00008", max_document_bytes=10_000_000)
             if not r.get("reject")]
    assert len(pages) >= 10
    found = tags = 0
    for record in pages:
        page = extract_page(record["html"], record["url"])
        lists = page.lists()
        assert len({len(v) for v in lists.values()}) == 1
        assert all((t is None) != (u is None) for t, u in zip(page.texts, page.image_urls))
        assert page.img_tags == page.images + len(page.dropped)
        html = record["html"].decode("utf-8", "replace")
        for url in filter(None, page.image_urls):
            parts = urlsplit(url)
            assert parts.scheme in ("http", "https") and parts.netloc, url
            assert parts.path.rsplit("/", 1)[-1] in html, url  # the walk finds URLs, it never makes them up
        found += page.images
        tags += page.img_tags
    assert found >= 50 and tags > found


def test_rows_without_html_become_text_only_documents():
    from phi3data.pipelines.stages.interleaved import ExtractInterleaved

    stage = ExtractInterleaved(ExtractInterleaved.Params())
    stage.ensure_setup()
    batch = make_batch([{"id": "a", "text": "A plain document.", "url": None, "source": "s"},
                        {"id": "b", "text": "  ", "url": None, "source": "s"}])
    out = stage.process(batch)
    assert out.batch.schema == INTERLEAVED_WEB_SCHEMA
    assert out.batch.column("texts").to_pylist() == [["A plain document."]]
    assert out.batch.column("image_urls").to_pylist() == [[None]]
    assert dict(out.drops) == {"extract_interleaved:empty": 1}


# --- the corpus-wide URL count, and the URL list of a finished run ----------------------------------------------

LOGO = "https://cdn.example.com/brand/logo.png"
SHARED_PHOTO = "https://photos.example.com/shared.jpg"


def _html(n: int, images: list[str]) -> bytes:
    tags = "".join(f'<p>Paragraph {n}.{i} about topic {n}.</p><img src="{u}" alt="picture {i} of page {n}">'
                   for i, u in enumerate(images))
    return f"<html><body><article><h1>Page {n}</h1>{tags}</article></body></html>".encode()


def _write_warc(path: Path, pages: dict[int, list[str]]) -> None:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as handle:
        writer = WARCWriter(handle, gzip=True)
        for n, images in pages.items():
            body = _html(n, images)
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(
                f"https://site{n}.example.org/page.html", "response", payload=io.BytesIO(body), http_headers=http,
                warc_headers_dict={"WARC-Record-ID": f"<urn:page:{n:02d}>"}))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Two WARC shards: the logo on four pages (two per shard), a photo on two, one page with only the logo."""
    root = tmp_path_factory.mktemp("interleaved-corpus")
    _write_warc(root / "a.warc.gz", {0: [LOGO, "https://site0.example.org/own0.jpg"],
                                     1: [LOGO, SHARED_PHOTO, "own1.jpg"], 2: ["https://site2.example.org/own2.jpg"]})
    _write_warc(root / "b.warc.gz", {3: [LOGO, SHARED_PHOTO], 4: [LOGO], 5: []})
    return root


def _recipe() -> dict:
    spec = load_recipe(Path(__file__).resolve().parents[1] / "pipelines" / "interleaved.toml").model_dump()
    frequency = next(s for s in spec["stage"] if s["type"] == "image_url_frequency")
    frequency.update(max_pages=2, no_images="drop", partitions=4)
    return spec


def _run(corpus: Path, out: Path, engine: str) -> Path:
    if not (out / "stats.json").exists():
        run_pipeline(load_recipe(_recipe()), corpus, out, engine=engine, workers=2, progress=False)
    return out


def _rows(out: Path) -> list[dict]:
    tables = [pq.read_table(p) for p in sorted((out / "data").glob("*.parquet"))]
    return sorted(pa.concat_tables(tables).to_pylist(), key=lambda r: r["id"])


@pytest.fixture(scope="module")
def local_run(corpus, tmp_path_factory) -> Path:
    return _run(corpus, tmp_path_factory.mktemp("interleaved-local"), "local")


def test_a_url_on_too_many_pages_is_removed(local_run):
    rows = {r["id"]: r for r in _rows(local_run)}
    assert sorted(rows) == ["<urn:page:00>", "<urn:page:01>", "<urn:page:02>", "<urn:page:03>", "<urn:page:05>"]
    assert all(LOGO not in r["image_urls"] for r in rows.values())
    # page 1 was: title, text, logo, text, photo, text, own image; the photo is on two pages: at the limit, kept
    assert rows["<urn:page:01>"]["image_urls"] == [None, None, None, SHARED_PHOTO, None,
                                                   "https://site1.example.org/own1.jpg"]
    assert rows["<urn:page:01>"]["texts"] == ["Page 1", "Paragraph 1.0 about topic 1.", "Paragraph 1.1 about topic 1.",
                                              None, "Paragraph 1.2 about topic 1.", None]
    assert rows["<urn:page:01>"]["alts"][3] == "picture 1 of page 1"
    assert rows["<urn:page:05>"]["image_urls"] == [None]  # had no images to lose: kept as text
    stats = json.loads((local_run / "stats.json").read_text())
    frequency = next(s for s in stats["stages"] if s["name"] == "image_url_frequency")
    assert frequency["drops"] == {"image_url_frequency:no_images_left": 1}  # page 4 held only the logo
    report = stats["reports"]["image_url_frequency"]
    assert report["top_urls"] == [{"url": LOGO, "pages": 4}] and report["images_removed"] == 4
    extracted = stats["reports"]["extract_interleaved"]
    assert extracted["img_tags"] == extracted["images_kept"] == 9 and extracted["pages"] == 6


@pytest.mark.cluster
def test_spark_removes_the_same_images(corpus, local_run, spark_local, tmp_path):
    out = _run(corpus, tmp_path / "spark", "spark")
    assert _rows(out) == _rows(local_run)
    mine, local = (json.loads((d / "stats.json").read_text()) for d in (out, local_run))
    assert mine["reports"] == local["reports"] and mine["documents_out"] == local["documents_out"]
    strip = {"resolved"}  # file paths under each run's own directory
    assert {k: v for k, v in mine["decisions"]["image_url_frequency"].items() if k not in strip} == \
        {k: v for k, v in local["decisions"]["image_url_frequency"].items() if k not in strip}


def test_the_run_gives_the_fetcher_its_image_urls(local_run, tmp_path):
    from phi3data.cli import app

    listed = image_url_list(local_run)
    assert listed.column("url").to_pylist() == sorted([SHARED_PHOTO, "https://site0.example.org/own0.jpg",
                                                       "https://site1.example.org/own1.jpg",
                                                       "https://site2.example.org/own2.jpg"])
    assert dict(zip(listed.column("url").to_pylist(), listed.column("pages").to_pylist()))[SHARED_PHOTO] == 2
    pairs = alt_text_pairs(local_run)
    assert pairs.schema == URL_SCHEMA and record_kind(pairs) == "url"
    by_url = dict(zip(pairs.column("url").to_pylist(), pairs.column("text").to_pylist()))
    assert by_url[SHARED_PHOTO] == "picture 1 of page 1"  # the first page (by id) that holds it
    assert pairs.column("key").to_pylist() == [f"{i:09d}" for i in range(pairs.num_rows)]

    result = CliRunner().invoke(app, ["fetch", str(local_run), "--output", str(tmp_path / "images"), "--list-only"])
    assert result.exit_code == 0, result.output
    got = read_all(read_url_list(tmp_path / "images" / "image_urls.parquet"))
    assert got.rejects.num_rows == 0
    assert got.records.column("url").to_pylist() == listed.column("url").to_pylist()
    assert got.records.column("text").to_pylist() == pairs.column("text").to_pylist()

    refused = CliRunner().invoke(app, ["fetch", str(tmp_path / "images" / "image_urls.parquet"), "--output",
                                       str(tmp_path / "x"), "--list-only"])
    assert refused.exit_code == 2 and "run directory" in refused.output


def test_bad_pages_are_counted_not_crashes():
    """Binary junk, an empty body and a DOM nested far deeper than Python's recursion limit: each row is kept or
    dropped under a named reason, and the good page in the same batch comes through. (In a run the WARC reader
    rejects binary payloads first; here the junk reaches the stage and becomes text for the text filters.)"""
    from phi3data.pipelines.stages.interleaved import ExtractInterleaved

    stage = ExtractInterleaved(ExtractInterleaved.Params())
    stage.ensure_setup()
    deep = b"<html><body>" + b"<div>" * 20_000 + b"<p>Deep text.</p><img src='https://e.org/deep.jpg'>" + \
        b"</div>" * 20_000 + b"</body></html>"
    batch = make_batch([{"id": "junk", "html": bytes(range(256)) * 40, "url": "https://e.org/j", "source": "s"},
                        {"id": "blank", "html": b"<html><body>  </body></html>", "url": None, "source": "s"},
                        {"id": "deep", "html": deep, "url": "https://e.org/d", "source": "s"},
                        {"id": "good", "html": PAGE, "url": "https://example.org/blog/post.html", "source": "s"}],
                       with_html=True)
    out = stage.process(batch)
    kept = {r["id"]: r for r in out.batch.to_pylist()}
    assert "good" in kept and "blank" not in kept and "html" not in out.batch.schema.names
    assert all(u is None for u in kept["junk"]["image_urls"])
    assert kept["deep"]["texts"] == ["Deep text.", None] and kept["deep"]["image_urls"] == [None,
                                                                                          "https://e.org/deep.jpg"]
    assert dict(out.drops) == {"extract_interleaved:empty": 1} and not out.rejects
