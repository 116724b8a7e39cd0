"""An OpenAI-compatible LLM client: chat and completions, bounded async concurrency, retries, a request cache.

Works with any server that speaks the OpenAI HTTP API (vLLM, llama.cpp's server, TGI, hosted APIs).

- Concurrency: at most ``max_concurrency`` requests in flight (an asyncio semaphore).
- Retries: 429, 5xx, timeouts and connection errors are retried with exponential backoff and jitter; a
  ``Retry-After`` header (seconds or an HTTP date) is honoured. Other 4xx errors fail at once.
- Cache: with ``cache_path`` set, every successful reply is stored under a key made of the server's base URL, the
  endpoint, the model, the prompt and every parameter, so a rerun sends nothing twice
  (see ``phi3data.generators.cache``).
- Accounting: ``client.usage`` counts requests, cache hits, retries, failures and prompt/completion tokens.
- The API key is read from the environment variable named by ``api_key_env``; it is sent as a bearer token and
  never logged, cached, or put in an error message.

Later generators build on ``request`` / ``map_requests``, which take any endpoint and JSON payload.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from phi3data.generators.cache import RequestCache, request_key

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class ClientConfig(BaseModel):
    """Where the server is and how to talk to it."""

    model_config = ConfigDict(extra="forbid")
    base_url: str = "http://127.0.0.1:8000/v1"
    """The API root, ending in /v1 for most servers."""
    model: str = "default"
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (the key itself never goes in a config)."""
    max_concurrency: int = Field(8, gt=0)
    timeout_s: float = Field(120.0, gt=0)
    """Per-request timeout (connect, read, write)."""
    max_retries: int = Field(6, ge=0)
    backoff_initial_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    max_retry_after_s: float = Field(300.0, ge=0)
    """A server's Retry-After longer than this is capped to it."""
    cache_path: str | None = None
    """A SQLite file for the request cache; None disables caching."""


class LLMError(RuntimeError):
    """A request that failed for good: a non-retryable status, or retries exhausted."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class Completion:
    """One reply: the generated text, why it stopped, its token counts, and whether it came from the cache."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    raw: dict = field(repr=False)


@dataclass
class Usage:
    """Running totals over a client's life. Tokens from cached replies are counted apart (they cost nothing)."""

    requests_sent: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
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


def reply_text(endpoint: str, reply: dict) -> tuple[str, str | None]:
    """The generated text and finish reason of the first choice of a chat or completions reply."""
    choices = reply.get("choices") or []
    if not choices:
        raise LLMError(f"reply from {endpoint} has no choices")
    choice = choices[0]
    if "message" in choice:
        text = (choice.get("message") or {}).get("content") or ""
    else:
        text = choice.get("text") or ""
    return text, choice.get("finish_reason")


class LLMClient:
    """An OpenAI-compatible client. Use the ``*_many`` methods from sync code, ``chat``/``complete`` from async."""

    def __init__(self, config: ClientConfig, *, sleep: Callable[[float], Any] | None = None):
        self.config = config
        self._api_key = os.environ.get(config.api_key_env) or None
        self.usage = Usage()
        self.cache = RequestCache(config.cache_path) if config.cache_path else None
        self._sleep = sleep or asyncio.sleep
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: httpx.AsyncClient | None = None
        self._semaphore: asyncio.Semaphore | None = None

    def __repr__(self) -> str:  # never shows the key
        key = "set" if self._api_key else "unset"
        return f"LLMClient(base_url={self.config.base_url!r}, model={self.config.model!r}, api_key={key})"

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
        """Send one request (or answer it from the cache), with retries and the concurrency bound."""
        key = request_key(self.config.base_url, endpoint, payload)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                try:
                    return self._completion(endpoint, hit, cached=True)
                except LLMError:
                    pass  # an unusable reply cached by an older version: ask again
        http, semaphore = self._session()
        async with semaphore:
            reply = await self._send_with_retries(http, endpoint, payload)
        completion = self._completion(endpoint, reply, cached=False)  # raises on an unusable reply: not cached
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
        self._http = self._semaphore = self._loop = None

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

    def _session(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._http is None or self._semaphore is None:
            limits = httpx.Limits(max_connections=self.config.max_concurrency,
                                  max_keepalive_connections=self.config.max_concurrency)
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.config.timeout_s), limits=limits)
            self._semaphore = asyncio.Semaphore(self.config.max_concurrency)
            self._loop = loop
        return self._http, self._semaphore

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

    async def _send_with_retries(self, http: httpx.AsyncClient, endpoint: str, payload: dict) -> dict:
        url = f"{self.config.base_url.rstrip('/')}/{endpoint.lstrip('/')}"
        last_problem = ""
        for attempt in range(self.config.max_retries + 1):
            retry_after = None
            try:
                self.usage.requests_sent += 1
                response = await http.post(url, json=payload, headers=self._headers())
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last_problem = f"{type(exc).__name__} after {self.config.timeout_s:g}s timeout"
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        last_problem = "reply is not JSON"
                elif response.status_code in RETRY_STATUS:
                    last_problem = f"HTTP {response.status_code}"
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
                else:
                    self.usage.failures += 1
                    raise LLMError(f"{url}: HTTP {response.status_code}: {response.text[:300]}",
                                   status=response.status_code)
            if attempt < self.config.max_retries:
                self.usage.retries += 1
                await self._sleep(self._backoff(attempt, retry_after))
        self.usage.failures += 1
        raise LLMError(f"{url}: gave up after {self.config.max_retries + 1} attempts ({last_problem})")

    def _completion(self, endpoint: str, reply: dict, cached: bool) -> Completion:
        text, finish = reply_text(endpoint, reply)
        usage = reply.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        if cached:
            self.usage.cache_hits += 1
            self.usage.cached_prompt_tokens += prompt_tokens
            self.usage.cached_completion_tokens += completion_tokens
        else:
            self.usage.prompt_tokens += prompt_tokens
            self.usage.completion_tokens += completion_tokens
        return Completion(text, finish, prompt_tokens, completion_tokens, cached, reply)
