"""An OpenAI-compatible LLM client: chat and completions, adaptive async concurrency, rate limits, a budget,
structured output with a fallback, retries and a request cache.

Works with any server that speaks the OpenAI HTTP API (vLLM, llama.cpp's server, TGI, hosted APIs).

- Concurrency: at most ``client.concurrency_limit`` requests in flight. With ``adaptive`` (the default) the limit
  starts at ``initial_concurrency`` and moves by AIMD between ``min_concurrency`` and ``max_concurrency``: halved
  on 429, 503, a timeout or rising latency, one more after a round of healthy replies
  (``phi3data.generators.limits``). ``client.limit_history`` records every change.
- Rate limits: ``rpm`` / ``tpm`` space sends so no minute sees more requests / tokens (estimated from the payload
  as prompt chars / 4 + max_tokens, corrected by the usage the server reports). When a server's
  ``x-ratelimit-remaining-requests`` or ``-tokens`` reaches 0, new sends wait for its ``x-ratelimit-reset-*``.
- Budget: ``max_total_tokens`` and/or ``max_cost`` (with ``price_in_per_m`` / ``price_out_per_m``). A request is
  sent only if its estimate fits beside what was spent and what is in flight; once one does not, no new request
  is sent and each raises :class:`BudgetExhausted` (counted in ``usage.not_sent``). Cache hits are still answered.
- Retries: 429, 5xx, timeouts and connection errors are retried with exponential backoff and jitter; a
  ``Retry-After`` header (seconds or an HTTP date) is honoured. Other 4xx errors fail at once. An unusable reply
  (no choices, empty text, or text that is not JSON when ``response_format`` asks for JSON) is asked again, up to
  ``max_retries`` times, then fails.
- Structured output: if a server refuses ``response_format`` (HTTP 400/422 naming response_format or
  json_schema), the request is resent without it, and so is every later one to that endpoint; if a server
  accepts it but answers with text that is not JSON, that request is resent without it. The reply must still
  parse as JSON. ``usage.structured_fallbacks`` counts requests sent without their ``response_format``.
- Cache: with ``cache_path`` set, every good reply is stored under a key made of the server's base URL, the
  endpoint, the model, the prompt and every parameter, so a rerun sends nothing twice
  (see ``phi3data.generators.cache``).
- Accounting: ``client.usage`` counts requests, cache hits, retries, failures, tokens and cost.
- The API key is read from the environment variable named by ``api_key_env``; it is sent as a bearer token and
  never logged, cached, or put in an error message.

Later generators build on ``request`` / ``map_requests``, which take any endpoint and JSON payload.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from phi3data.generators.cache import RequestCache, request_key
from phi3data.generators.limits import AdaptiveLimit, Budget, LimitChange, Pacer, estimate_tokens, pause_from_headers

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
OVERLOAD_STATUS = {429, 503}
"""Statuses that lower the adaptive concurrency limit (as do timeouts)."""
REFUSED_FORMAT = re.compile(r"response_format|json_schema", re.IGNORECASE)


class ClientConfig(BaseModel):
    """Where the server is, how to talk to it, and how hard."""

    model_config = ConfigDict(extra="forbid")
    base_url: str = "http://127.0.0.1:8000/v1"
    """The API root, ending in /v1 for most servers."""
    model: str = "default"
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (the key itself never goes in a config)."""
    max_concurrency: int = Field(8, gt=0)
    adaptive: bool = True
    """Move the concurrency limit by AIMD between min_concurrency and max_concurrency; False: fixed at max."""
    initial_concurrency: int | None = Field(None, gt=0)
    """Where the adaptive limit starts; None: max_concurrency."""
    min_concurrency: int = Field(1, gt=0)
    latency_tolerance: float | None = Field(3.0, gt=1)
    """Lower the limit when latency per generated token exceeds this multiple of the best seen; None: never."""
    rpm: float | None = Field(None, gt=0)
    """Requests per minute at most (hosted APIs); None: unlimited."""
    tpm: float | None = Field(None, gt=0)
    """Tokens per minute at most (estimated before sending, corrected by reported usage); None: unlimited."""
    max_total_tokens: int | None = Field(None, gt=0)
    """Stop sending once this many prompt + completion tokens would be exceeded; None: no cap."""
    max_cost: float | None = Field(None, gt=0)
    """Stop sending once this cost would be exceeded (needs a price); None: no cap."""
    price_in_per_m: float = Field(0.0, ge=0)
    """Price of a million prompt tokens."""
    price_out_per_m: float = Field(0.0, ge=0)
    """Price of a million completion tokens."""
    timeout_s: float = Field(120.0, gt=0)
    """Per-request timeout (connect, read, write)."""
    max_retries: int = Field(6, ge=0)
    backoff_initial_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    max_retry_after_s: float = Field(300.0, ge=0)
    """A server's Retry-After longer than this is capped to it."""
    cache_path: str | None = None
    """A SQLite file for the request cache; None disables caching."""

    @model_validator(mode="after")
    def _check(self) -> ClientConfig:
        initial = self.initial_concurrency or self.max_concurrency
        if not self.min_concurrency <= initial <= self.max_concurrency:
            raise ValueError(f"need min_concurrency ({self.min_concurrency}) <= initial_concurrency ({initial}) "
                             f"<= max_concurrency ({self.max_concurrency})")
        if self.max_cost is not None and self.price_in_per_m == 0 and self.price_out_per_m == 0:
            raise ValueError("max_cost needs price_in_per_m and/or price_out_per_m")
        return self


class LLMError(RuntimeError):
    """A request that failed for good: a non-retryable status, retries exhausted, or an unusable reply."""

    def __init__(self, message: str, status: int | None = None, body: str = ""):
        super().__init__(message)
        self.status = status
        self.body = body
        """The start of the server's error body, if any."""


class BudgetExhausted(LLMError):
    """A request that was not sent because the token/cost budget is spent."""


@dataclass
class Completion:
    """One reply: the generated text, why it stopped, its token counts, and whether it came from the cache.

    ``texts`` holds every choice's text (``n`` > 1); ``text`` is the first."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    raw: dict = field(repr=False)
    texts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.texts:
            self.texts = [self.text]


@dataclass
class Usage:
    """Running totals over a client's life. Tokens from cached replies are counted apart (they cost nothing);
    tokens of unusable replies that were asked again are counted (they were paid for)."""

    requests_sent: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    not_sent: int = 0
    """Requests refused by the budget (BudgetExhausted)."""
    invalid_replies: int = 0
    """Replies without choices, with empty text, or not JSON when JSON was asked."""
    structured_fallbacks: int = 0
    """Requests sent without their response_format because the server refused or ignored it."""
    rate_limit_waits: int = 0
    """Sends held back by rpm/tpm pacing or a server's x-ratelimit headers."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    cost: float = 0.0
    """Spent at the configured prices (0 without prices)."""

    def as_dict(self) -> dict[str, int | float]:
        return dict(self.__dict__)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def reply_texts(endpoint: str, reply: dict) -> tuple[list[str], str | None]:
    """Every choice's text (in index order) and the first choice's finish reason, from a chat or completions
    reply."""
    choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index") or 0)
    if not choices:
        raise LLMError(f"reply from {endpoint} has no choices")
    texts = []
    for choice in choices:
        if "message" in choice:
            texts.append((choice.get("message") or {}).get("content") or "")
        else:
            texts.append(choice.get("text") or "")
    return texts, choices[0].get("finish_reason")


def reply_text(endpoint: str, reply: dict) -> tuple[str, str | None]:
    """The generated text and finish reason of the first choice of a chat or completions reply."""
    texts, finish = reply_texts(endpoint, reply)
    return texts[0], finish


def wants_json(payload: dict) -> bool:
    """Whether a payload asks for JSON output (response_format json_object or json_schema)."""
    response_format = payload.get("response_format")
    return isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema")


def check_reply(endpoint: str, reply: dict, json_expected: bool) -> tuple[list[str], str | None]:
    """The reply's texts and finish reason; LLMError if it is unusable (no choices, empty text, not JSON)."""
    texts, finish = reply_texts(endpoint, reply)
    for text in texts:
        if not text:
            raise LLMError(f"reply from {endpoint} has empty text (finish_reason {finish})")
        if json_expected:
            try:
                json.loads(text)
            except ValueError:
                raise LLMError(f"reply from {endpoint} is not valid JSON (finish_reason {finish}): "
                               f"{text[:80]!r}") from None
    return texts, finish


@dataclass
class _Sent:
    """One request's state across its attempts: what it reserved and whether the budget admitted it."""

    estimate: tuple[int, int]
    json_expected: bool
    admitted: bool = False
    without_format: bool = False
    """Sent without its response_format (the server refused or ignored it)."""


class LLMClient:
    """An OpenAI-compatible client. Use the ``*_many`` methods from sync code, ``chat``/``complete`` from async.

    ``sleep`` and ``clock`` (monotonic seconds) may be replaced together to record waits instead of sleeping."""

    def __init__(self, config: ClientConfig, *, sleep: Callable[[float], Any] | None = None,
                 clock: Callable[[], float] | None = None):
        self.config = config
        self._api_key = os.environ.get(config.api_key_env) or None
        self.usage = Usage()
        self.cache = RequestCache(config.cache_path) if config.cache_path else None
        self._sleep = sleep or asyncio.sleep
        self._clock = clock or time.monotonic
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: httpx.AsyncClient | None = None
        initial = config.initial_concurrency or config.max_concurrency
        self.limiter = AdaptiveLimit(initial if config.adaptive else config.max_concurrency, config.min_concurrency,
                                     config.max_concurrency, adaptive=config.adaptive,
                                     latency_tolerance=config.latency_tolerance, clock=self._clock)
        self.request_pacer = Pacer(config.rpm) if config.rpm else None
        self.token_pacer = Pacer(config.tpm) if config.tpm else None
        self.budget = Budget(config.max_total_tokens, config.max_cost, config.price_in_per_m, config.price_out_per_m)
        self.paused_until = -float("inf")
        """Clock time before which no request is sent (a server's rate-limit headers said so)."""
        self._refuses_format: set[str] = set()

    def __repr__(self) -> str:  # never shows the key
        key = "set" if self._api_key else "unset"
        return f"LLMClient(base_url={self.config.base_url!r}, model={self.config.model!r}, api_key={key})"

    @property
    def concurrency_limit(self) -> int:
        """How many requests may be in flight now."""
        return self.limiter.limit

    @property
    def limit_history(self) -> list[LimitChange]:
        """Every change of the concurrency limit, oldest first."""
        return self.limiter.history

    # --- payloads -----------------------------------------------------------------------------------------

    def chat_payload(self, messages: Sequence[dict], **params: Any) -> dict:
        return {"model": self.config.model, "messages": list(messages), **params}

    def completion_payload(self, prompt: str, **params: Any) -> dict:
        return {"model": self.config.model, "prompt": prompt, **params}

    # --- async API ----------------------------------------------------------------------------------------

    async def chat(self, messages: Sequence[dict], **params: Any) -> Completion:
        """One chat completion (``/chat/completions``); params are OpenAI ones: max_tokens, temperature ..."""
        return await self.request("chat/completions", self.chat_payload(messages, **params))

    async def complete(self, prompt: str, **params: Any) -> Completion:
        """One text completion (``/completions``)."""
        return await self.request("completions", self.completion_payload(prompt, **params))

    async def request(self, endpoint: str, payload: dict) -> Completion:
        """Send one request (or answer it from the cache) under the limits, with retries.

        Raises ``BudgetExhausted`` if the budget refused to send it, ``LLMError`` if it failed."""
        key = request_key(self.config.base_url, endpoint, payload)
        json_expected = wants_json(payload)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                try:
                    return self._completion(endpoint, hit, json_expected, cached=True)
                except LLMError:
                    pass  # an unusable reply cached by an older version: ask again
        http = self._session()
        sent = _Sent(estimate_tokens(payload), json_expected)
        try:
            reply = await self._answer(http, endpoint, payload, sent)
        except BudgetExhausted:
            self.usage.not_sent += 1
            raise
        except LLMError:
            self.usage.failures += 1
            raise
        finally:
            if sent.admitted:
                self.budget.release(*sent.estimate)
        completion = self._completion(endpoint, reply, json_expected, cached=False)
        if self.cache is not None:
            self.cache.put(key, reply)
        return completion

    async def map_requests(self, requests: Sequence[tuple[str, dict]],
                           on_result: Callable[[int, Completion | LLMError], None] | None = None
                           ) -> list[Completion | LLMError]:
        """Run many requests concurrently; results in input order, a failure as its ``LLMError``.

        ``on_result(index, result)`` is called as each finishes (to write results out incrementally).
        """

        async def one(index: int, endpoint: str, payload: dict) -> Completion | LLMError:
            try:
                result: Completion | LLMError = await self.request(endpoint, payload)
            except LLMError as exc:
                result = exc
            if on_result is not None:
                on_result(index, result)
            return result

        return list(await asyncio.gather(*(one(i, e, p) for i, (e, p) in enumerate(requests))))

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        self._http = self._loop = None

    # --- sync API -----------------------------------------------------------------------------------------

    def run_many(self, requests: Sequence[tuple[str, dict]],
                 on_result: Callable[[int, Completion | LLMError], None] | None = None
                 ) -> list[Completion | LLMError]:
        """Blocking ``map_requests`` (opens and closes its own connection pool)."""

        async def go() -> list[Completion | LLMError]:
            try:
                return await self.map_requests(requests, on_result)
            finally:
                await self.aclose()

        return asyncio.run(go())

    def chat_many(self, conversations: Sequence[Sequence[dict]], on_result=None, **params: Any
                  ) -> list[Completion | LLMError]:
        return self.run_many([("chat/completions", self.chat_payload(m, **params)) for m in conversations], on_result)

    def complete_many(self, prompts: Sequence[str], on_result=None, **params: Any) -> list[Completion | LLMError]:
        return self.run_many([("completions", self.completion_payload(p, **params)) for p in prompts], on_result)

    # --- internals ----------------------------------------------------------------------------------------

    def _session(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._http is None:
            limits = httpx.Limits(max_connections=self.config.max_concurrency,
                                  max_keepalive_connections=self.config.max_concurrency)
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.config.timeout_s), limits=limits)
            self.limiter.bind()
            self._loop = loop
        return self._http

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.config.max_retry_after_s)
        delay = min(self.config.backoff_initial_s * (2 ** attempt), self.config.backoff_max_s)
        return delay * (0.5 + random.random() / 2)

    async def _answer(self, http: httpx.AsyncClient, endpoint: str, payload: dict, sent: _Sent) -> dict:
        """A usable reply: asks again on an unusable one, and drops a refused or ignored response_format."""
        problem = ""
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self.usage.retries += 1
            try:
                reply = await self._send_with_retries(http, endpoint, payload, sent)
            except BudgetExhausted:
                raise
            except LLMError as exc:
                if not (sent.json_expected and not sent.without_format and exc.status in (400, 422)
                        and REFUSED_FORMAT.search(exc.body)):
                    raise
                self._refuses_format.add(endpoint)  # this and every later request go without it
                reply = await self._send_with_retries(http, endpoint, payload, sent)
            self._spend(reply, sent)
            try:
                check_reply(endpoint, reply, sent.json_expected)
                return reply
            except LLMError as exc:
                self.usage.invalid_replies += 1
                problem = str(exc)
                finish = ((reply.get("choices") or [{}])[0] or {}).get("finish_reason")
                if "not valid JSON" in problem and finish != "length" and not sent.without_format:
                    sent.without_format = True  # the server ignored response_format: parse-and-retry
                    self.usage.structured_fallbacks += 1
        raise LLMError(f"{endpoint}: no usable reply after {self.config.max_retries + 1} attempts ({problem})")

    def _body(self, endpoint: str, payload: dict, sent: _Sent) -> dict:
        """The payload to send now: without response_format once the server refused or ignored it."""
        if sent.json_expected and not sent.without_format and endpoint in self._refuses_format:
            sent.without_format = True
            self.usage.structured_fallbacks += 1
        if sent.without_format:
            return {k: v for k, v in payload.items() if k != "response_format"}
        return payload

    def _spend(self, reply: dict, sent: _Sent) -> None:
        """Count a received reply's tokens against usage, the budget and the token pacer."""
        usage = reply.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        self.usage.prompt_tokens += prompt_tokens
        self.usage.completion_tokens += completion_tokens
        self.usage.cost += self.budget.cost(prompt_tokens, completion_tokens)
        self.budget.spend(prompt_tokens, completion_tokens)
        if self.token_pacer is not None and usage:
            self.token_pacer.correct(prompt_tokens + completion_tokens - sum(sent.estimate))

    async def _wait_for_rate(self, sent: _Sent) -> None:
        """Hold this send until the server's rate-limit pause ends and rpm/tpm pacing gives it a start time."""
        waited = False
        while (wait := self.paused_until - self._clock()) > 0:
            waited = True
            await self._sleep(wait)
        now = self._clock()
        pacers = [(pacer, cost) for pacer, cost in ((self.request_pacer, 1), (self.token_pacer, sum(sent.estimate)))
                  if pacer is not None]
        start = max([now] + [pacer.next_free for pacer, _ in pacers])  # one start time for both: the later
        for pacer, cost in pacers:
            pacer.reserve(start, cost)
        if start > now:
            waited = True
            await self._sleep(start - now)
        if waited:
            self.usage.rate_limit_waits += 1

    async def _send_with_retries(self, http: httpx.AsyncClient, endpoint: str, payload: dict, sent: _Sent) -> dict:
        url = f"{self.config.base_url.rstrip('/')}/{endpoint.lstrip('/')}"
        last_problem = ""
        for attempt in range(self.config.max_retries + 1):
            retry_after = None
            if not sent.admitted and self.budget.exhausted:  # refuse at once, without waiting for a slot
                raise self._budget_exhausted(url)
            epoch = await self.limiter.acquire()
            try:
                if not sent.admitted:
                    if not self.budget.admit(*sent.estimate):
                        raise self._budget_exhausted(url)
                    sent.admitted = True
                await self._wait_for_rate(sent)
                body = self._body(endpoint, payload, sent)
                self.usage.requests_sent += 1
                started = self._clock()
                try:
                    response = await http.post(url, json=body, headers=self._headers())
                except httpx.TimeoutException as exc:
                    self.limiter.overloaded(epoch, "timeout")
                    last_problem = f"{type(exc).__name__} after {self.config.timeout_s:g}s timeout"
                except httpx.TransportError as exc:
                    last_problem = f"{type(exc).__name__}"
                else:
                    pause = pause_from_headers(response.headers)
                    if pause is not None:
                        self.paused_until = max(self.paused_until, self._clock() + pause)
                    if response.status_code == 200:
                        try:
                            reply = response.json()
                        except ValueError:
                            last_problem = "reply is not JSON"
                        else:
                            self.limiter.succeeded(epoch, self._seconds_per_token(reply, self._clock() - started))
                            return reply
                    elif response.status_code in RETRY_STATUS:
                        last_problem = f"HTTP {response.status_code}"
                        if response.status_code in OVERLOAD_STATUS:
                            self.limiter.overloaded(epoch, last_problem)
                        retry_after = parse_retry_after(response.headers.get("retry-after"))
                    else:
                        raise LLMError(f"{url}: HTTP {response.status_code}: {response.text[:300]}",
                                       status=response.status_code, body=response.text[:300])
            finally:
                await self.limiter.release()
            if attempt < self.config.max_retries:
                self.usage.retries += 1
                await self._sleep(self._backoff(attempt, retry_after))
        raise LLMError(f"{url}: gave up after {self.config.max_retries + 1} attempts ({last_problem})")

    def _budget_exhausted(self, url: str) -> BudgetExhausted:
        return BudgetExhausted(f"{url}: not sent, the token/cost budget is spent "
                               f"({self.budget.spent_tokens} tokens, cost {self.budget.spent_cost:g})")

    @staticmethod
    def _seconds_per_token(reply: dict, seconds: float) -> float:
        completion_tokens = int((reply.get("usage") or {}).get("completion_tokens") or 0)
        return seconds / max(completion_tokens, 1)

    def _completion(self, endpoint: str, reply: dict, json_expected: bool, cached: bool) -> Completion:
        texts, finish = check_reply(endpoint, reply, json_expected)
        usage = reply.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        if cached:
            self.usage.cache_hits += 1
            self.usage.cached_prompt_tokens += prompt_tokens
            self.usage.cached_completion_tokens += completion_tokens
        return Completion(texts[0], finish, prompt_tokens, completion_tokens, cached, reply, texts)
