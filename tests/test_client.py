"""The LLM client against a FAKE fault-injecting OpenAI-style server on loopback: 429 with Retry-After, 5xx,
hangs, bad requests, the concurrency bound, the request cache and the API key's secrecy. (A real llama.cpp
server cannot be made to show these faults; tests/test_classify_annotate.py runs the client against one.)"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from phi3data.generators.client import ClientConfig, LLMClient, LLMError, parse_retry_after

SECRET = "sk-test-5ecret-do-not-log"


class FakeFaultServer:
    """A fake OpenAI-compatible server: each request pops the next scripted fault, else answers normally."""

    def __init__(self, delay: float = 0.0):
        self.script: list[tuple] = []
        self.requests: list[dict] = []
        self.delay = delay
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                           "body": body})
                    fault = owner.script.pop(0) if owner.script else ("ok",)
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                try:
                    time.sleep(owner.delay)
                    if fault[0] == "hang":
                        time.sleep(fault[1])
                        return
                    if fault[0] == "status":
                        self.send_response(fault[1])
                        for name, value in fault[2].items():
                            self.send_header(name, value)
                        payload = b'{"error": "injected"}'
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                    self._ok(body, empty=fault[0] == "no_choices")
                finally:
                    with owner.lock:
                        owner.in_flight -= 1

            def _ok(self, body, empty=False):
                prompt = body.get("prompt") or body["messages"][-1]["content"]
                text = f"echo:{prompt}:{body.get('max_tokens')}"
                choice = {"index": 0, "finish_reason": "stop"}
                if "messages" in body:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                reply = {"choices": [] if empty else [choice],
                         "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 3}}
                payload = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    server = FakeFaultServer()
    yield server
    server.close()


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("PHI3DATA_TEST_KEY", SECRET)
    return "PHI3DATA_TEST_KEY"


def make_client(url: str, secret_env: str, sleep=None, **overrides) -> LLMClient:
    config = dict(base_url=url, model="fake-model", api_key_env=secret_env, max_retries=3, backoff_initial_s=0.01,
                  backoff_max_s=0.05, timeout_s=5.0)
    config.update(overrides)
    return LLMClient(ClientConfig(**config), sleep=sleep)


def test_chat_and_completions_roundtrip_and_token_accounting(fake, secret_env):
    client = make_client(fake.url, secret_env)
    chats = client.chat_many([[{"role": "user", "content": "one two"}], [{"role": "user", "content": "three"}]],
                             max_tokens=7)
    texts = client.complete_many(["four five six"], max_tokens=9)
    assert [c.text for c in chats] == ["echo:one two:7", "echo:three:7"]
    assert texts[0].text == "echo:four five six:9"
    assert [r["path"] for r in fake.requests].count("/v1/chat/completions") == 2
    assert fake.requests[-1]["path"] == "/v1/completions"
    assert client.usage.prompt_tokens == 2 + 1 + 3 and client.usage.completion_tokens == 9
    assert client.usage.requests_sent == 3 and client.usage.retries == 0


def test_429_honours_retry_after(fake, secret_env):
    fake.script = [("status", 429, {"Retry-After": "1"})]
    waits: list[float] = []

    async def record(seconds: float) -> None:  # records the wait instead of timing it
        waits.append(seconds)

    client = make_client(fake.url, secret_env, sleep=record)
    [result] = client.complete_many(["hello"], max_tokens=1)
    assert result.text == "echo:hello:1"
    assert waits == [1.0], "the client must wait the server's Retry-After (1 s), not its own 10 ms backoff"
    assert client.usage.retries == 1 and len(fake.requests) == 2


def test_5xx_then_success_and_giving_up(fake, secret_env):
    fake.script = [("status", 500, {}), ("status", 503, {}), ("status", 502, {})]
    client = make_client(fake.url, secret_env)
    [ok] = client.complete_many(["x"], max_tokens=1)
    assert ok.text == "echo:x:1" and client.usage.retries == 3

    fake.script = [("status", 500, {})] * 10
    fake.requests.clear()
    [failed] = client.complete_many(["y"], max_tokens=1)
    assert isinstance(failed, LLMError) and "gave up after 4 attempts" in str(failed)
    assert len(fake.requests) == 4 and client.usage.failures == 1


def test_hang_times_out_and_is_retried(fake, secret_env):
    fake.script = [("hang", 3.0)]
    client = make_client(fake.url, secret_env, timeout_s=0.5)
    [result] = client.complete_many(["slow"], max_tokens=2)
    assert result.text == "echo:slow:2"
    # the 3 s hang was cut by the 0.5 s timeout and retried, rather than waited out
    assert client.usage.retries == 1 and len(fake.requests) == 2


def test_client_error_is_not_retried(fake, secret_env):
    fake.script = [("status", 400, {})]
    client = make_client(fake.url, secret_env)
    [result] = client.complete_many(["bad"], max_tokens=1)
    assert isinstance(result, LLMError) and result.status == 400
    assert len(fake.requests) == 1 and client.usage.retries == 0


def test_concurrency_is_bounded_and_order_kept(secret_env):
    server = FakeFaultServer(delay=0.15)
    try:
        client = make_client(server.url, secret_env, max_concurrency=3)
        prompts = [f"p{i}" for i in range(12)]
        results = client.complete_many(prompts, max_tokens=1)
        assert [r.text for r in results] == [f"echo:{p}:1" for p in prompts]
        assert 2 <= server.max_in_flight <= 3
    finally:
        server.close()


def test_cache_sends_nothing_twice(fake, secret_env, tmp_path):
    cache = tmp_path / "cache.sqlite"
    first = make_client(fake.url, secret_env, cache_path=str(cache))
    a = first.complete_many(["alpha", "beta"], max_tokens=4, temperature=0.0)
    assert len(fake.requests) == 2 and not any(r.cached for r in a)

    rerun = make_client(fake.url, secret_env, cache_path=str(cache))
    b = rerun.complete_many(["alpha", "beta"], max_tokens=4, temperature=0.0)
    assert len(fake.requests) == 2, "a rerun with the same cache must not send anything"
    assert [r.text for r in b] == [r.text for r in a] and all(r.cached for r in b)
    assert rerun.usage.cache_hits == 2 and rerun.usage.prompt_tokens == 0 and rerun.usage.cached_prompt_tokens == 2

    rerun.complete_many(["alpha"], max_tokens=5, temperature=0.0)  # a different parameter is a new request
    other_model = make_client(fake.url, secret_env, cache_path=str(cache), model="another-model")
    other_model.complete_many(["alpha"], max_tokens=4, temperature=0.0)
    assert len(fake.requests) == 4


def test_cache_key_includes_the_server(fake, secret_env, tmp_path):
    """The same model name and prompt on another server is another request: a shared cache must not answer a
    request to server B with server A's reply."""
    cache = str(tmp_path / "cache.sqlite")
    other = FakeFaultServer()
    try:
        make_client(fake.url, secret_env, cache_path=cache).complete_many(["alpha"], max_tokens=4)
        [reply] = make_client(other.url, secret_env, cache_path=cache).complete_many(["alpha"], max_tokens=4)
        assert len(fake.requests) == 1 and len(other.requests) == 1 and not reply.cached
        # the same server written with a trailing slash is the same server
        [again] = make_client(fake.url + "/", secret_env, cache_path=cache).complete_many(["alpha"], max_tokens=4)
        assert again.cached and len(fake.requests) == 1
    finally:
        other.close()


def test_an_unusable_reply_is_not_cached(fake, secret_env, tmp_path):
    cache = str(tmp_path / "cache.sqlite")
    fake.script = [("no_choices",)]
    (failed,) = make_client(fake.url, secret_env, cache_path=cache).complete_many(["alpha"], max_tokens=4)
    assert isinstance(failed, LLMError) and "no choices" in str(failed)
    again = make_client(fake.url, secret_env, cache_path=cache).complete_many(["alpha"], max_tokens=4)
    assert len(fake.requests) == 2 and again[0].text == "echo:alpha:4" and not again[0].cached


def test_api_key_is_sent_but_never_logged(fake, secret_env, tmp_path):
    cache = tmp_path / "cache.sqlite"
    fake.script = [("status", 401, {})]
    client = make_client(fake.url, secret_env, cache_path=str(cache))
    [denied] = client.complete_many(["who"], max_tokens=1)
    [ok] = client.complete_many(["me"], max_tokens=1)
    assert all(r["auth"] == f"Bearer {SECRET}" for r in fake.requests)
    assert isinstance(denied, LLMError) and SECRET not in str(denied)
    assert SECRET not in repr(client) and SECRET not in repr(client.config) and SECRET not in repr(ok)
    client.cache.close()
    for path in tmp_path.iterdir():
        assert SECRET.encode() not in path.read_bytes()


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") < 1  # a date in the past: retry now
