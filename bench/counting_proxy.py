"""A counting proxy in front of an OpenAI-compatible server, run as its own process so that it shares no
interpreter with the clients it counts: ``python -m bench.counting_proxy UPSTREAM`` prints its ``/v1`` URL on the
first line of stdout, forwards every POST unchanged and answers ``GET /_counts`` with what reached the server:
requests, completion tokens of the 200 replies, and the requests whose ``messages`` list was empty (bespokelabs
curator sends one such request to read rate-limit headers before a run). It runs until stdin closes.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx


def serve(upstream: str) -> ThreadingHTTPServer:
    """Start the proxy on a free loopback port (in a thread); its counts are the server's ``counts``."""
    upstream = upstream.rstrip("/")
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
    counts: Counter = Counter()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/_counts":
                with lock:
                    self._reply(200, json.dumps(dict(counts)).encode(), "application/json")
                return
            reply = client.get(f"{upstream}{self.path.removeprefix('/v1')}")
            self._reply(reply.status_code, reply.content, reply.headers.get("content-type", "application/json"))

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                empty = not json.loads(body).get("messages", [None])
            except (ValueError, AttributeError):
                empty = False
            reply = client.post(f"{upstream}{self.path.removeprefix('/v1')}", content=body,
                                headers={"Content-Type": "application/json"})
            tokens = 0
            if reply.status_code == 200:
                try:
                    tokens = int((reply.json().get("usage") or {}).get("completion_tokens") or 0)
                except ValueError:
                    pass
            with lock:
                counts["requests"] += 1
                counts[f"status_{reply.status_code}"] += 1
                if empty:
                    counts["empty_messages"] += 1
                    counts["empty_messages_completion_tokens"] += tokens
                else:
                    counts["completion_tokens"] += tokens
            self._reply(reply.status_code, reply.content, reply.headers.get("content-type", "application/json"))

        def _reply(self, status: int, payload: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.counts = counts  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    server = serve(sys.argv[1])
    print(f"http://127.0.0.1:{server.server_address[1]}/v1", flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or exits)
    server.shutdown()


if __name__ == "__main__":
    main()
