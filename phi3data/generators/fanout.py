"""Ray fans a plan's requests out over several replicas of a server: one actor per replica.

Requests are dealt to replicas round-robin in plan order. Each actor sends its share through its own client with
the run's settings, and appends to its own ledger file (the ledger is a directory, one file per writer), so the
driver reads one ledger whatever the number of replicas and writes the outputs as a single-server run would.
A replica that fails a request records it as failed like any other; a rerun sends it again.

Progress: each actor keeps its running counts (answered, failed, completion tokens), and the driver polls them
every ``PROGRESS_EVERY_S`` while the actors work and passes their sum to the same ``progress`` callback a
single-server run calls after every reply. Polling only reads counts; sending and recording are unchanged.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from phi3data.generators.client import LLMClient
from phi3data.generators.requests import GenRequest

PROGRESS_EVERY_S = 0.5
COUNTED = ("answered", "failed", "completion_tokens")


class ReplicaSender:
    """The work of one Ray actor: a client for one replica, and the share of the plan it sends.

    The actor runs with two threads, so ``counts`` answers while ``run`` is sending."""

    def __init__(self, config: dict, base_url: str):
        from phi3data.generators.client import ClientConfig

        self.client = LLMClient(ClientConfig(**{**config, "base_url": base_url}))
        self._counts: dict[str, int] = dict.fromkeys(COUNTED, 0)
        self._lock = threading.Lock()

    def run(self, pending: list[tuple[GenRequest, str]], output: str, concurrency: int) -> tuple[dict, bool]:
        from phi3data.generators.runner import send_and_record

        def note(counts: dict) -> None:
            with self._lock:
                self._counts = {k: int(counts.get(k, 0)) for k in COUNTED}

        counts, stopped = send_and_record(pending, Path(output), self.client, concurrency, note,
                                          handle_signals=False)
        return dict(counts), stopped

    def counts(self) -> dict[str, int]:
        """Answered, failed and completion tokens so far in ``run``."""
        with self._lock:
            return dict(self._counts)


def fan_out(pending: list[tuple[GenRequest, str]], output: Path, client: LLMClient, replicas: list[str],
            concurrency: int, progress: Callable[[dict], None] | None = None) -> tuple[Counter, bool]:
    """Send ``pending`` over ``replicas`` with one Ray actor each (joins a running Ray, else starts one).

    ``progress`` gets the summed counts of all actors (``done``, ``total``, ``answered``, ``failed``,
    ``completion_tokens``) whenever they change between polls; the last call, made once every actor has
    returned, has the final counts."""
    from phi3data.engines.ray import ray_session

    with ray_session(workers=len(replicas)):
        import ray

        actor = ray.remote(num_cpus=0, max_concurrency=2, scheduling_strategy="SPREAD")(ReplicaSender)
        config = client.config.model_dump()
        senders = [actor.remote(config, url) for url in replicas]
        shares = [pending[i::len(replicas)] for i in range(len(replicas))]
        runs = [s.run.remote(share, str(output), concurrency) for s, share in zip(senders, shares)]
        if progress is not None:
            _watch(runs, senders, len(pending), progress)
        results = ray.get(runs)
    counts: Counter = Counter()
    stopped = False
    for result_counts, result_stopped in results:
        counts.update(result_counts)
        stopped = stopped or result_stopped
    return counts, stopped


def _watch(runs: list, senders: list, total: int, progress: Callable[[dict], None]) -> None:
    """Poll the actors' counts until every run has returned (the last poll sees final counts); report changes."""
    import ray

    last: dict | None = None
    waiting = list(runs)
    while waiting:
        _, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=PROGRESS_EVERY_S)
        summed: Counter = Counter()
        for share in ray.get([s.counts.remote() for s in senders]):
            summed.update(share)
        report = _report(summed, total)
        if report != last:
            progress(report)
            last = report


def _report(counts: Counter, total: int) -> dict:
    return {"done": counts["answered"] + counts["failed"], "total": total, "answered": counts["answered"],
            "failed": counts["failed"], "completion_tokens": counts["completion_tokens"]}
