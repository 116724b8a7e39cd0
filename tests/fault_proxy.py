"""A FAULT-INJECTING PROXY in front of a real OpenAI-compatible server (the faults a real server cannot be made to
show on demand). Each POST pops the next scripted fault, else is forwarded to the real server unchanged. Every
request body that reaches the proxy is recorded, whether it was answered, faulted or forwarded.

Faults: ("status", code, headers) answers with that status and no forward; ("hang", seconds) waits then drops;
("drop",) closes the connection without a reply; ("truncate",) forwards, then sends half the body under the full
Content-Length; ("malformed",) answers 200 with a body that is not JSON.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx


class FaultProxy:
    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.script: list[tuple] = []
        self.bodies: list[dict] = []
        self.forwarded = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with owner.lock:
                    owner.bodies.append(json.loads(body))
                    fault = owner.script.pop(0) if owner.script else ("forward",)
                kind = fault[0]
                if kind == "status":
                    self._reply(fault[1], b'{"error": "injected"}', fault[2] if len(fault) > 2 else {})
                    return
                if kind == "hang":
                    time.sleep(fault[1])
                    self.close_connection = True
                    return
                if kind == "drop":
                    self.close_connection = True
                    return
                if kind == "malformed":
                    self._reply(200, b'{"choices": [{"message": ', {})
                    return
                path = self.path.removeprefix("/v1")
                upstream = httpx.post(f"{owner.upstream}{path}", content=body, timeout=300,
                                      headers={"Content-Type": "application/json"})
                with owner.lock:
                    owner.forwarded += 1
                if kind == "truncate":
                    self.send_response(upstream.status_code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(upstream.content)))
                    self.end_headers()
                    self.wfile.write(upstream.content[: len(upstream.content) // 2])
                    self.close_connection = True
                    return
                self._reply(upstream.status_code, upstream.content, {})

            def _reply(self, status: int, payload: bytes, headers: dict):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
