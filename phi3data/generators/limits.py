"""Throughput control for the LLM client: how many requests fly at once, how fast they leave, and how much they
may spend.

- :class:`AdaptiveLimit`: a concurrency limit that adapts to a self-hosted server by AIMD. It halves on overload
  (429, 503, a timeout, or latency per generated token rising past ``latency_tolerance`` times the best seen) and
  grows by one after ``limit`` healthy replies in a row (about one round trip). Replies to requests sent before
  the last decrease are ignored, so one burst of errors halves the limit once, not once per error.
- :class:`Pacer`: spaces sends so no more than ``per_minute`` units (requests or tokens) leave in any minute;
  each send reserves its cost on a shared timeline (the GCRA form of a token bucket with a one-request burst).
- :func:`pause_from_headers`: how long to hold new sends when a server's ``x-ratelimit-remaining-*`` hits 0.
- :class:`Budget`: a cap on total tokens and/or cost; a request is admitted only if it fits beside what was
  spent and what requests in flight may spend.
- :func:`estimate_tokens`: prompt characters / 4 and ``max_tokens`` x ``n``, the estimate a send reserves.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

DECREASE_FACTOR = 0.5
"""Multiplicative decrease on overload."""
LATENCY_SMOOTHING = 0.2
"""Weight of the newest latency in the moving average."""
LATENCY_MIN_SAMPLES = 5
"""Replies seen before the latency rule may act."""


@dataclass(frozen=True)
class LimitChange:
    """One change of the concurrency limit: when (client clock), from, to, and why."""

    at: float
    old: int
    new: int
    reason: str


class AdaptiveLimit:
    """An async concurrency bound whose limit moves by AIMD (fixed when ``adaptive`` is False)."""

    def __init__(self, initial: int, minimum: int, maximum: int, *, adaptive: bool = True,
                 latency_tolerance: float | None = 3.0, clock: Callable[[], float] = time.monotonic):
        self.limit = initial
        self.minimum = minimum
        self.maximum = maximum
        self.adaptive = adaptive
        self.latency_tolerance = latency_tolerance
        self.clock = clock
        self.in_flight = 0
        self.peak_in_flight = 0
        """The most requests ever in flight at once (never above the limit at the time)."""
        self.epoch = 0
        """Counts decreases; a request carries the epoch it was sent in."""
        self.history: list[LimitChange] = []
        self._healthy = 0
        self._latency: float | None = None
        self._samples = 0
        self.best_latency: float | None = None
        self._cond: asyncio.Condition | None = None

    def bind(self) -> None:
        """Start afresh on the running event loop (asyncio primitives belong to one loop)."""
        self._cond = asyncio.Condition()
        self.in_flight = 0

    async def acquire(self) -> int:
        """Wait for a free slot; returns the epoch to pass back with the reply's signal."""
        if self._cond is None:
            self.bind()
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            return self.epoch

    async def release(self) -> None:
        """Free a slot (after giving the reply's signal): wakes as many waiters as the limit now allows."""
        async with self._cond:
            self.in_flight -= 1
            self._cond.notify(max(self.limit - self.in_flight, 0))

    def overloaded(self, epoch: int, reason: str) -> None:
        """The server pushed back (429, 503, a timeout) on a request sent in ``epoch``."""
        if self.adaptive and epoch == self.epoch:
            self._decrease(reason)

    def succeeded(self, epoch: int, seconds_per_token: float | None) -> None:
        """A good reply to a request sent in ``epoch``, with its latency per generated token (None: unknown)."""
        if not self.adaptive or epoch != self.epoch:
            return  # sent before the last decrease: says nothing about the present limit
        if seconds_per_token is not None and self.latency_tolerance is not None:
            self._samples += 1
            if self._latency is None:
                self._latency = seconds_per_token
            else:
                self._latency += LATENCY_SMOOTHING * (seconds_per_token - self._latency)
            if self._samples >= LATENCY_MIN_SAMPLES:
                if self.best_latency is None or self._latency < self.best_latency:
                    self.best_latency = self._latency
                if 0 < self.best_latency and self.latency_tolerance * self.best_latency < self._latency:
                    self._decrease("latency")
                    return
        self._healthy += 1
        if self._healthy >= self.limit and self.limit < self.maximum:
            self._set(self.limit + 1, "healthy")

    def _decrease(self, reason: str) -> None:
        self.epoch += 1
        self._latency, self._samples = None, 0  # judge the new level by its own replies
        self._set(max(self.minimum, math.floor(self.limit * DECREASE_FACTOR)), reason)

    def _set(self, new: int, reason: str) -> None:
        self._healthy = 0
        if new != self.limit:
            self.history.append(LimitChange(self.clock(), self.limit, new, reason))
            self.limit = new  # waiters are woken by the next release, which follows every signal


class Pacer:
    """No more than ``per_minute`` units leave in any 60 s: a send of cost c reserves c * 60 / per_minute seconds
    on a shared timeline and starts when its reservation begins."""

    def __init__(self, per_minute: float):
        self.interval = 60.0 / per_minute
        self.next_free = -math.inf
        self.scheduled: list[float] = []
        """Start times handed out, in order (for tests and progress displays)."""

    def reserve(self, now: float, cost: float) -> float:
        """The time at which a send of ``cost`` units may start (>= now)."""
        start = max(now, self.next_free)
        self.next_free = start + cost * self.interval
        self.scheduled.append(start)
        return start

    def correct(self, delta: float) -> None:
        """Shift the timeline by a reservation's error (actual - estimated units)."""
        self.next_free += delta * self.interval


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_reset(value: str | None) -> float | None:
    """Seconds in an ``x-ratelimit-reset-*`` value as OpenAI sends it ("1s", "6m0s", "20ms", "1h2m3.5s") or a
    plain number of seconds; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def pause_from_headers(headers: Mapping[str, str]) -> float | None:
    """Seconds to hold new sends: the reset time of each of requests/tokens whose remaining count is 0."""
    pause = None
    for kind in ("requests", "tokens"):
        remaining = headers.get(f"x-ratelimit-remaining-{kind}")
        try:
            exhausted = remaining is not None and float(remaining) <= 0
        except ValueError:
            exhausted = False
        reset = parse_reset(headers.get(f"x-ratelimit-reset-{kind}")) if exhausted else None
        if reset is not None:
            pause = max(pause or 0.0, reset)
    return pause


def prompt_chars(payload: Mapping) -> int:
    """Characters of prompt text in a chat or completions payload."""
    total = 0
    prompt = payload.get("prompt")
    for item in prompt if isinstance(prompt, list) else [prompt]:
        if isinstance(item, str):
            total += len(item)
    for message in payload.get("messages") or []:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(part.get("text") or "") for part in content if isinstance(part, Mapping))
    return total


def estimate_tokens(payload: Mapping) -> tuple[int, int]:
    """(prompt, completion) tokens a request may use: prompt chars / 4, and max_tokens (0 if unset) x n."""
    max_tokens = payload.get("max_tokens") or payload.get("max_completion_tokens") or 0
    return math.ceil(prompt_chars(payload) / 4), int(max_tokens) * int(payload.get("n") or 1)


class Budget:
    """A cap on tokens and/or cost. Once a request does not fit, the budget is exhausted for good."""

    def __init__(self, max_tokens: int | None = None, max_cost: float | None = None, price_in_per_m: float = 0.0,
                 price_out_per_m: float = 0.0):
        self.max_tokens = max_tokens
        self.max_cost = max_cost
        self.price_in_per_m = price_in_per_m
        self.price_out_per_m = price_out_per_m
        self.spent_tokens = 0
        self.spent_cost = 0.0
        self.reserved_tokens = 0
        self.reserved_cost = 0.0
        self.exhausted = False

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price_in_per_m + completion_tokens * self.price_out_per_m) / 1e6

    def admit(self, prompt_tokens: int, completion_tokens: int) -> bool:
        """Reserve an estimate if it fits beside spending and other reservations; False (and exhausted) if not."""
        tokens, cost = prompt_tokens + completion_tokens, self.cost(prompt_tokens, completion_tokens)
        fits = not self.exhausted
        if fits and self.max_tokens is not None:
            fits = self.spent_tokens + self.reserved_tokens + tokens <= self.max_tokens
        if fits and self.max_cost is not None:
            fits = self.spent_cost + self.reserved_cost + cost <= self.max_cost
        if not fits:
            self.exhausted = True
            return False
        self.reserved_tokens += tokens
        self.reserved_cost += cost
        return True

    def release(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Drop an admitted request's reservation (it finished, one way or another)."""
        self.reserved_tokens -= prompt_tokens + completion_tokens
        self.reserved_cost -= self.cost(prompt_tokens, completion_tokens)

    def spend(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.spent_tokens += prompt_tokens + completion_tokens
        self.spent_cost += self.cost(prompt_tokens, completion_tokens)
