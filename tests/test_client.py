"""The LLM client against a FAKE fault-injecting OpenAI-style server on loopback: 429 with Retry-After, 5xx,
hangs, bad requests, the concurrency bound, the request cache and the API key's secrecy. (A real llama.cpp
server cannot be made to show these faults; tests/test_classify_annotate.py runs the client against one.)"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from phi3data.generators.client import (
    BudgetExhausted,
    ClientConfig,
    LLMClient,
    LLMError,
    parse_retry_after,
)
from phi3data.generators.limits import AdaptiveLimit, Budget, LimitChange, estimate_tokens, parse_reset

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
                    if fault[0] == "status":  # ("status", code, headers[, body])
                        self.send_response(fault[1])
                        for name, value in fault[2].items():
                            self.send_header(name, value)
                        payload = fault[3] if len(fault) > 3 else b'{"error": "injected"}'
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                    if fault[0] == "text":  # ("text", content): a 200 reply with this text
                        self._ok(body, text=fault[1])
                        return
                    # ("ok", headers): a normal reply with extra headers; ("no_choices",): an empty one
                    self._ok(body, empty=fault[0] == "no_choices", headers=fault[1] if len(fault) > 1 else {})
                finally:
                    with owner.lock:
                        owner.in_flight -= 1

            def _ok(self, body, empty=False, text=None, headers=None):
                prompt = body.get("prompt") or body["messages"][-1]["content"]
                if text is None:
                    text = f"echo:{prompt}:{body.get('max_tokens')}"
                choices = []
                for index in range(body.get("n") or 1):  # choice i > 0 says "#i"
                    content = text if index == 0 else f"{text}#{index}"
                    choice = {"index": index, "finish_reason": "stop"}
                    if "messages" in body:
                        choice["message"] = {"role": "assistant", "content": content}
                    else:
                        choice["text"] = content
                    choices.append(choice)
                reply = {"choices": [] if empty else choices,
                         "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 3}}
                payload = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
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


def make_client(url: str, secret_env: str, sleep=None, clock=None, **overrides) -> LLMClient:
    config = dict(base_url=url, model="fake-model", api_key_env=secret_env, max_retries=3, backoff_initial_s=0.01,
                  backoff_max_s=0.05, timeout_s=5.0)
    config.update(overrides)
    return LLMClient(ClientConfig(**config), sleep=sleep, clock=clock)


class RecordedTime:
    """A client clock that moves only when the client sleeps: each wait is recorded, and none is slept."""

    def __init__(self):
        self.now = 1000.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


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
    assert [(c.old, c.new, c.reason) for c in client.limit_history] == [(8, 4, "timeout")]


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
        # the bound, counted by the client; the server saw real overlap (its own count can run one reply late)
        assert client.limiter.peak_in_flight == 3 and server.max_in_flight >= 2
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
    fake.script = [("no_choices",)] * 4  # max_retries=3: asked four times, then failed
    first = make_client(fake.url, secret_env, cache_path=cache)
    (failed,) = first.complete_many(["alpha"], max_tokens=4)
    assert isinstance(failed, LLMError) and "no choices" in str(failed) and "after 4 attempts" in str(failed)
    assert first.usage.invalid_replies == 4 and first.usage.failures == 1 and len(first.cache) == 0
    again = make_client(fake.url, secret_env, cache_path=cache).complete_many(["alpha"], max_tokens=4)
    assert len(fake.requests) == 5 and again[0].text == "echo:alpha:4" and not again[0].cached


def test_an_empty_reply_is_asked_again(fake, secret_env):
    fake.script = [("text", ""), ("no_choices",)]
    client = make_client(fake.url, secret_env)
    [result] = client.complete_many(["alpha"], max_tokens=4)
    assert result.text == "echo:alpha:4" and len(fake.requests) == 3
    assert client.usage.invalid_replies == 2 and client.usage.retries == 2 and client.usage.failures == 0


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


# --- adaptive concurrency ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [429, 503])
def test_limit_halves_on_overload_and_recovers_while_healthy(secret_env, status):
    server = FakeFaultServer(delay=0.02)
    server.script = [("status", status, {"Retry-After": "0"})] * 4  # the first four requests, all in flight
    try:
        client = make_client(server.url, secret_env, max_concurrency=4, latency_tolerance=None)
        results = client.complete_many([f"p{i}" for i in range(30)], max_tokens=1)
        assert all(not isinstance(r, LLMError) for r in results) and len(server.requests) == 34
        # one halving for the burst (the other three errors were sent before it), then +1 per round of successes
        assert [(c.old, c.new, c.reason) for c in client.limit_history] == [
            (4, 2, f"HTTP {status}"), (2, 3, "healthy"), (3, 4, "healthy")]
        # counted by the client: the fake server's own count can include a reply it has sent but not yet tallied
        assert client.concurrency_limit == 4 and client.limiter.peak_in_flight == 4 and client.limiter.in_flight == 0
    finally:
        server.close()


def test_limit_starts_at_initial_and_respects_min_and_fixed_mode(fake, secret_env):
    fake.script = [("status", 503, {"Retry-After": "0"})] * 2
    client = make_client(fake.url, secret_env, max_concurrency=8, initial_concurrency=2, min_concurrency=2,
                         latency_tolerance=None)
    assert client.concurrency_limit == 2
    client.complete_many([f"p{i}" for i in range(4)], max_tokens=1)
    assert [(c.old, c.new) for c in client.limit_history] == [(2, 3)], "never below min_concurrency"

    fake.script = [("status", 503, {"Retry-After": "0"})] * 2
    fixed = make_client(fake.url, secret_env, max_concurrency=3, adaptive=False)
    fixed.complete_many([f"q{i}" for i in range(8)], max_tokens=1)
    assert fixed.limit_history == [] and fixed.concurrency_limit == 3

    with pytest.raises(ValueError, match="initial_concurrency"):
        ClientConfig(max_concurrency=4, initial_concurrency=5)
    with pytest.raises(ValueError, match="max_cost needs"):
        ClientConfig(max_cost=1.0)


def test_rising_latency_lowers_the_limit_once_then_it_grows_back():
    limit = AdaptiveLimit(4, 1, 8, latency_tolerance=3.0, clock=lambda: 7.0)
    for _ in range(6):  # healthy at 10 ms per token: +1 after four; five samples set the best latency
        limit.succeeded(0, 0.01)
    assert limit.limit == 5
    limit.succeeded(0, 0.2)  # the moving average jumps past 3x the best seen
    assert limit.history[-1] == LimitChange(7.0, 5, 2, "latency") and limit.epoch == 1
    limit.succeeded(0, 0.2)  # a reply sent before the decrease: ignored
    limit.overloaded(0, "HTTP 503")
    assert limit.limit == 2
    for _ in range(2 + 3):
        limit.succeeded(1, 0.01)
    assert [(c.old, c.new, c.reason) for c in limit.history] == [
        (4, 5, "healthy"), (5, 2, "latency"), (2, 3, "healthy"), (3, 4, "healthy")]


# --- rate limits --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("headers", "wait"), [
    ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s",
      "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "1m"}, 2.0),
    ({"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "2s",
      "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1m30s"}, 90.0),
    ({"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "2s"}, None),
])
def test_rate_limit_headers_pause_new_sends_until_reset(fake, secret_env, headers, wait):
    fake.script = [("ok", headers)]
    recorded = RecordedTime()
    client = make_client(fake.url, secret_env, sleep=recorded.sleep, clock=recorded.clock, max_concurrency=1)
    results = client.complete_many(["a", "b", "c"], max_tokens=1)
    assert [r.text for r in results] == ["echo:a:1", "echo:b:1", "echo:c:1"]
    assert recorded.waits == ([] if wait is None else [wait])
    assert client.usage.rate_limit_waits == (0 if wait is None else 1)


def test_parse_reset():
    assert parse_reset("1s") == 1.0 and parse_reset("6m0s") == 360.0 and parse_reset("20ms") == pytest.approx(0.02)
    assert parse_reset("1h2m3.5s") == 3723.5 and parse_reset("7") == 7.0
    assert parse_reset(None) is None and parse_reset("soon") is None and parse_reset("5x3s") is None


def test_rpm_spaces_sends_so_no_minute_has_more(fake, secret_env):
    recorded = RecordedTime()
    client = make_client(fake.url, secret_env, sleep=recorded.sleep, clock=recorded.clock, rpm=6)
    results = client.complete_many([f"p{i}" for i in range(8)], max_tokens=1)
    assert all(not isinstance(r, LLMError) for r in results) and len(fake.requests) == 8
    starts = client.request_pacer.scheduled
    assert len(starts) == 8 and starts == sorted(starts)
    assert all(starts[i + 6] - starts[i] >= 60 for i in range(len(starts) - 6)), "7 sends in one minute"
    assert recorded.waits == [10.0] * 7 and client.usage.rate_limit_waits == 7

    unlimited = RecordedTime()
    make_client(fake.url, secret_env, sleep=unlimited.sleep, clock=unlimited.clock).complete_many(
        [f"q{i}" for i in range(8)], max_tokens=1)
    assert unlimited.waits == []


def test_tpm_paces_by_estimate_corrected_by_reported_usage(fake, secret_env):
    recorded = RecordedTime()
    client = make_client(fake.url, secret_env, sleep=recorded.sleep, clock=recorded.clock, tpm=100,
                         max_concurrency=1)
    prompts = ["x" * 40, "y" * 40, "z" * 40]
    assert estimate_tokens(client.completion_payload(prompts[0], max_tokens=10)) == (10, 10)
    client.complete_many(prompts, max_tokens=10)
    # each reserves 20 tokens (12 s at 100/min) but used 1 + 3: the next send waits 4 tokens' worth, 2.4 s
    assert recorded.waits == [pytest.approx(2.4), pytest.approx(2.4)]


def test_estimate_tokens():
    chat = {"messages": [{"role": "user", "content": "abcdefgh"},
                         {"role": "user", "content": [{"type": "text", "text": "abcd"}]}],
            "max_tokens": 5, "n": 3}
    assert estimate_tokens(chat) == (3, 15)
    assert estimate_tokens({"prompt": ["abcde", "fgh"]}) == (2, 0)


# --- budget -------------------------------------------------------------------------------------------------------

def test_token_budget_stops_new_sends_and_reports_the_unsent(fake, secret_env, tmp_path):
    cache = str(tmp_path / "cache.sqlite")
    seen: dict[int, object] = {}
    client = make_client(fake.url, secret_env, max_concurrency=1, max_total_tokens=10, cache_path=cache)
    prompts = ["a b", "c d", "e f", "g h", "i j"]  # each estimated 1 + 1 tokens, each using 2 + 3
    results = client.complete_many(prompts, on_result=lambda i, r: seen.update({i: r}), max_tokens=1)
    assert [type(r).__name__ for r in results] == ["Completion"] * 2 + ["BudgetExhausted"] * 3
    assert all(isinstance(seen[i], BudgetExhausted) and isinstance(seen[i], LLMError) for i in (2, 3, 4))
    assert len(fake.requests) == 2 and client.budget.spent_tokens == 10 and client.budget.reserved_tokens == 0
    assert client.usage.not_sent == 3 and client.usage.failures == 0
    # exhausted for good; a cached reply still answers (it costs nothing)
    again = client.complete_many(["a b", "k l"], max_tokens=1)
    assert again[0].cached and isinstance(again[1], BudgetExhausted) and len(fake.requests) == 2


def test_cost_budget(fake, secret_env):
    client = make_client(fake.url, secret_env, max_concurrency=1, max_cost=20.0, price_in_per_m=1e6,
                         price_out_per_m=2e6)
    results = client.complete_many(["a b", "c d", "e f", "g h"], max_tokens=1)  # 2*1 + 3*2 = 8 each
    assert [isinstance(r, BudgetExhausted) for r in results] == [False, False, False, True]
    assert client.usage.cost == 24.0 and len(fake.requests) == 3


def test_budget_counts_in_flight_reservations():
    budget = Budget(max_tokens=10)
    assert budget.admit(4, 4) and not budget.admit(1, 2)  # 8 reserved + 3 > 10
    assert budget.exhausted and not budget.admit(0, 1)  # and stays exhausted
    budget.release(4, 4)
    budget.spend(1, 1)
    assert budget.reserved_tokens == 0 and budget.spent_tokens == 2


# --- structured output ------------------------------------------------------------------------------------------

SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "grade", "schema": {"type": "object"}}}


def test_refused_response_format_falls_back_and_is_remembered(fake, secret_env):
    refusal = b'{"error": {"message": "response_format json_schema is not supported by this model"}}'
    fake.script = [("status", 400, {}, refusal), ("text", '{"score": 3}'), ("text", '{"score": 4}')]
    client = make_client(fake.url, secret_env, max_concurrency=1)
    results = client.chat_many([[{"role": "user", "content": "grade a"}], [{"role": "user", "content": "grade b"}]],
                               response_format=SCHEMA_FORMAT, max_tokens=5)
    assert [r.text for r in results] == ['{"score": 3}', '{"score": 4}']
    assert ["response_format" in r["body"] for r in fake.requests] == [True, False, False]
    assert client.usage.structured_fallbacks == 2 and client.usage.failures == 0


def test_other_400_on_a_schema_request_is_not_a_fallback(fake, secret_env):
    fake.script = [("status", 400, {}, b'{"error": "context length exceeded"}')]
    client = make_client(fake.url, secret_env)
    [result] = client.chat_many([[{"role": "user", "content": "x"}]], response_format=SCHEMA_FORMAT)
    assert isinstance(result, LLMError) and result.status == 400 and "context length" in result.body
    assert len(fake.requests) == 1 and client.usage.structured_fallbacks == 0


def test_ignored_response_format_is_parsed_and_retried(fake, secret_env):
    fake.script = [("text", "Sure! The score is 3."), ("text", '{"score": 3}')]
    client = make_client(fake.url, secret_env)
    [result] = client.chat_many([[{"role": "user", "content": "x"}]], response_format={"type": "json_object"})
    assert result.text == '{"score": 3}'
    assert ["response_format" in r["body"] for r in fake.requests] == [True, False]
    assert client.usage.structured_fallbacks == 1 and client.usage.invalid_replies == 1


def test_invalid_json_is_retried_then_failed(fake, secret_env, tmp_path):
    fake.script = [("text", "nope")] * 4
    client = make_client(fake.url, secret_env, cache_path=str(tmp_path / "cache.sqlite"))
    [failed] = client.chat_many([[{"role": "user", "content": "x"}]], response_format=SCHEMA_FORMAT)
    assert isinstance(failed, LLMError) and "not valid JSON" in str(failed)
    assert len(fake.requests) == 4 and client.usage.invalid_replies == 4 and client.usage.failures == 1
    assert len(client.cache) == 0

    fake.script = [("text", "nope"), ("text", "{broken"), ("text", "[1, 2]")]
    [ok] = client.chat_many([[{"role": "user", "content": "y"}]], response_format=SCHEMA_FORMAT)
    assert ok.text == "[1, 2]" and len(fake.requests) == 7 and len(client.cache) == 1
    # without response_format, any non-empty text is a good reply
    fake.script = [("text", "nope")]
    [plain] = client.chat_many([[{"role": "user", "content": "z"}]])
    assert plain.text == "nope" and len(fake.requests) == 8


def test_n_choices_give_all_texts(fake, secret_env):
    client = make_client(fake.url, secret_env)
    [completion] = client.complete_many(["hi"], max_tokens=1, n=2)
    [chat] = client.chat_many([[{"role": "user", "content": "yo"}]], max_tokens=2, n=3)
    assert completion.texts == ["echo:hi:1", "echo:hi:1#1"] and completion.text == "echo:hi:1"
    assert chat.texts == ["echo:yo:2", "echo:yo:2#1", "echo:yo:2#2"] and chat.text == chat.texts[0]
    [single] = client.complete_many(["one"], max_tokens=1)
    assert single.texts == [single.text]


def test_rpm_and_tpm_together_share_one_start_time(fake, secret_env):
    """A send held back by tpm takes its rpm slot at its real start, so later sends cannot bunch up behind it."""
    recorded = RecordedTime()
    client = make_client(fake.url, secret_env, sleep=recorded.sleep, clock=recorded.clock, rpm=6, tpm=100)
    # the first reserves 101 tokens (60.6 s at 100/min); the others 2 tokens each (1.2 s)
    results = client.complete_many(["x" * 400] + [f"p{i}" for i in range(7)], max_tokens=1)
    assert all(not isinstance(r, LLMError) for r in results)
    starts = client.request_pacer.scheduled
    assert len(starts) == 8 and starts == client.token_pacer.scheduled
    assert all(starts[i + 6] - starts[i] >= 60 for i in range(len(starts) - 6))
