"""The URL-list fetcher against a real HTTP server on 127.0.0.1 serving real images (no mocks)."""

from __future__ import annotations

import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from phi3data.multimodal.fetch import (
    FetchConfig,
    fetch_urls,
    latest_status,
    opt_out_directive,
    read_status,
    retry_after_seconds,
)
from phi3data.multimodal.readers import read_all, read_url_list, read_webdataset

pytest.importorskip("httpx")
skimage = pytest.importorskip("skimage")
matplotlib = pytest.importorskip("matplotlib")

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
HOPPER = (Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").read_bytes()
CAMERA = (SKIMAGE_DATA / "camera.png").read_bytes()
COFFEE = (SKIMAGE_DATA / "coffee.png").read_bytes()
ROCKET = (SKIMAGE_DATA / "rocket.jpg").read_bytes()
PER_HOST = 2


class Server(ThreadingHTTPServer):
    # server_close() waits for every handler (a slow reply outlives its client's timeout), so none writes to
    # stderr while a later test captures it
    daemon_threads = False
    block_on_close = True

    def handle_error(self, request, client_address) -> None:
        """A client that gave up (timeout, truncated body) is expected here, not an error to print."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.hits: dict[str, int] = {}
        self.inflight = 0
        self.max_inflight = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def send_image(self, data: bytes, ctype: str, extra: dict | None = None, length: int | None = None):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's name)
        server: Server = self.server
        # A request is in flight from its arrival until its headers go out (before the client can see its
        # reply). The slow reply's handler outlives the client's timeout, so it is left out of the count.
        self.counted = self.path != "/slow.jpg"
        with server.lock:
            hits = server.hits[self.path] = server.hits.get(self.path, 0) + 1
            server.inflight += self.counted
            server.max_inflight = max(server.max_inflight, server.inflight)
        try:
            self.route(hits)
        finally:
            self.uncount()

    def uncount(self):
        if self.counted:
            with self.server.lock:
                self.server.inflight -= 1
            self.counted = False

    def end_headers(self):
        self.uncount()
        super().end_headers()

    def route(self, hits: int):
        path = self.path
        if path == "/img/hopper.jpg":
            self.send_image(HOPPER, "image/jpeg")
        elif path == "/img/camera.png":
            self.send_image(CAMERA, "image/png")
        elif path == "/img/coffee.png":
            self.send_image(COFFEE, "image/png")
        elif path == "/moved.png":
            self.send_response(302)
            self.send_header("Location", "/img/coffee.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/loop.png":
            self.send_response(302)
            self.send_header("Location", "/loop.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/slow.jpg":
            time.sleep(2.5)  # past every client timeout in these tests (1 s and 2 s)
            self.send_image(ROCKET, "image/jpeg")
        elif path == "/truncated.jpg":
            self.send_image(ROCKET[: len(ROCKET) // 2], "image/jpeg", length=len(ROCKET))
            self.close_connection = True
        elif path == "/flaky.jpg":
            if hits == 1:
                self.send_response(503)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_image(ROCKET, "image/jpeg")
        elif path == "/noai.jpg":
            self.send_image(HOPPER, "image/jpeg", {"X-Robots-Tag": "noai"})
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


@pytest.fixture()
def server():
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


PATHS = ["/img/hopper.jpg", "/moved.png", "/missing.png", "/slow.jpg", "/truncated.jpg", "/flaky.jpg",
         "/noai.jpg", "/loop.png", "/img/camera.png"]
CONFIG = FetchConfig(workers=4, per_host=PER_HOST, timeout=1.0, retries=2, backoff=0.01, max_backoff=0.05,
                     max_redirects=3)


def write_list(tmp_path: Path, server: Server) -> Path:
    path = tmp_path / "urls.jsonl"
    path.write_text("".join(f'{{"url": "{server.url(p)}", "caption": "caption of {p}"}}\n' for p in PATHS))
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_helpers():
    assert opt_out_directive(["noarchive, NoAI"], ("noai",)) == "noai"
    assert opt_out_directive(["googlebot: noindex"], ("noindex",)) is None
    assert opt_out_directive(["phi3data: noimageai"], ("noimageai",)) == "noimageai"
    assert opt_out_directive(["noai"], ()) is None
    assert retry_after_seconds("7") == 7.0 and retry_after_seconds(None) is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_fetch_status_table_and_retry_failed(tmp_path, server):
    urls = read_all(read_url_list(write_list(tmp_path, server))).records
    out = tmp_path / "out"
    first = fetch_urls(urls, out, config=CONFIG)
    rows = {row["url"]: row for row in pq.read_table(first.status_path).to_pylist()}
    assert set(rows) == {server.url(p) for p in PATHS}

    def row(path):
        return rows[server.url(path)]

    ok = row("/img/hopper.jpg")
    assert (ok["status"], ok["http_code"], ok["error"], ok["attempts"]) == ("success", 200, None, 1)
    assert (ok["bytes"], ok["sha256"], ok["final_url"]) == (len(HOPPER), sha(HOPPER), server.url("/img/hopper.jpg"))
    moved = row("/moved.png")
    assert moved["status"] == "success" and moved["final_url"] == server.url("/img/coffee.png")
    assert moved["sha256"] == sha(COFFEE)
    missing = row("/missing.png")
    assert (missing["status"], missing["http_code"], missing["error"], missing["attempts"]) == \
        ("failed", 404, "HTTP 404", 1)
    slow = row("/slow.jpg")
    assert slow["status"] == "failed" and "Timeout" in slow["error"] and slow["attempts"] == 3
    assert slow["sha256"] is None and slow["bytes"] is None
    truncated = row("/truncated.jpg")
    assert truncated["status"] == "failed" and truncated["attempts"] == 3 and truncated["sha256"] is None
    assert "RemoteProtocolError" in truncated["error"]
    flaky = row("/flaky.jpg")
    assert (flaky["status"], flaky["http_code"], flaky["attempts"], flaky["sha256"]) == \
        ("success", 200, 2, sha(ROCKET))
    noai = row("/noai.jpg")
    assert (noai["status"], noai["error"], noai["sha256"]) == ("opt_out", "X-Robots-Tag: noai", None)
    loop = row("/loop.png")
    assert loop["status"] == "failed" and loop["error"].startswith("too_many_redirects")
    assert row("/img/camera.png")["sha256"] == sha(CAMERA)
    assert first.counts() == {"success": 4, "failed": 4, "opt_out": 1}
    assert server.hits["/flaky.jpg"] == 2 and server.hits["/noai.jpg"] == 1
    assert server.max_inflight <= PER_HOST

    # the shard holds the successes as WebDataset pairs, the caption beside each image
    read = read_all(read_webdataset(first.shard))
    pairs = read.records.to_pylist()
    assert sorted(p["image_id"] for p in pairs) == sorted([sha(HOPPER), sha(COFFEE), sha(ROCKET), sha(CAMERA)])
    # and its status table beside it: the URLs that failed or opted out are counted rejects of the shard
    assert sorted(read.rejects.column("reason").to_pylist()) == ["download_failed"] * 4 + ["opt_out"]
    assert {p["text"] for p in pairs} == {f"caption of {p}" for p in
                                          ("/img/hopper.jpg", "/moved.png", "/flaky.jpg", "/img/camera.png")}

    # a plain rerun fetches nothing: every URL was attempted
    server.hits.clear()
    assert fetch_urls(urls, out, config=CONFIG).rows == [] and server.hits == {}

    # --retry-failed fetches the failed ones only; successes and opt-outs are never fetched again
    second = fetch_urls(urls, out, retry_failed=True, config=CONFIG)
    assert {r["url"] for r in second.rows} == {server.url(p) for p in
                                               ("/missing.png", "/slow.jpg", "/truncated.jpg", "/loop.png")}
    assert set(server.hits) == {"/missing.png", "/slow.jpg", "/truncated.jpg", "/loop.png"}
    assert server.hits["/missing.png"] == 1 and server.hits["/slow.jpg"] == 3
    assert second.skipped == 5
    assert read_status(out).num_rows == len(PATHS) + 4
    merged = latest_status(out)
    assert merged[server.url("/img/hopper.jpg")]["shard"] == first.shard.name
    assert pq.read_table(out / "status.parquet").num_rows == len(PATHS)
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_opt_out_can_be_disabled(tmp_path, server):
    urls = read_all(read_url_list(write_list(tmp_path, server))).records
    urls = urls.filter([u.endswith("/noai.jpg") for u in urls.column("url").to_pylist()])
    config = FetchConfig(workers=2, timeout=2, retries=0, disallowed_directives=())
    result = fetch_urls(urls, tmp_path / "out", config=config)
    assert [(r["status"], r["sha256"]) for r in result.rows] == [("success", sha(HOPPER))]


def test_fetch_command(tmp_path, server):
    from typer.testing import CliRunner

    from phi3data.cli import app

    urls = tmp_path / "urls.txt"
    urls.write_text(f"{server.url('/img/hopper.jpg')}\n{server.url('/missing.png')}\nnot-a-url\n")
    out = tmp_path / "out"
    first = CliRunner().invoke(app, ["fetch", str(urls), "--output", str(out), "--workers", "2", "--retries", "0"])
    assert first.exit_code == 0, first.output
    assert "'success': 1" in first.output and "'failed': 1" in first.output and "invalid_url" in first.output
    server.hits.clear()
    (out / "fetch-00007.tar").write_bytes(b"a shard whose run died before its status table was committed")
    again = CliRunner().invoke(app, ["fetch", str(urls), "--output", str(out), "--retry-failed", "--retries", "0"])
    assert again.exit_code == 0, again.output
    assert server.hits == {"/missing.png": 1}
    assert len(read_status(out)) == 3
    assert not (out / "fetch-00007.tar").exists()
    assert sorted(p.name for p in out.glob("fetch-*")) == ["fetch-00000.status.parquet", "fetch-00000.tar",
                                                           "fetch-00001.status.parquet", "fetch-00001.tar"]
