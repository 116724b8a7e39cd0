"""Ray fans a plan's requests out over several replicas of a server: one actor per replica.

Requests are dealt to replicas round-robin in plan order. Each actor sends its share through its own client with
the run's settings, and appends to its own ledger file (the ledger is a directory, one file per writer), so the
driver reads one ledger whatever the number of replicas and writes the outputs as a single-server run would.
A replica that fails a request records it as failed like any other; a rerun sends it again.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from phi3data.generators.client import LLMClient
from phi3data.generators.requests import GenRequest


class ReplicaSender:
    """The work of one Ray actor: a client for one replica, and the share of the plan it sends."""

    def __init__(self, config: dict, base_url: str):
        from phi3data.generators.client import ClientConfig

        self.client = LLMClient(ClientConfig(**{**config, "base_url": base_url}))

    def run(self, pending: list[tuple[GenRequest, str]], output: str, concurrency: int) -> tuple[dict, bool]:
        from phi3data.generators.runner import send_and_record

        counts, stopped = send_and_record(pending, Path(output), self.client, concurrency, handle_signals=False)
        return dict(counts), stopped


def fan_out(pending: list[tuple[GenRequest, str]], output: Path, client: LLMClient, replicas: list[str],
            concurrency: int) -> tuple[Counter, bool]:
    """Send ``pending`` over ``replicas`` with one Ray actor each (joins a running Ray, else starts one)."""
    from phi3data.engines.ray import ray_session

    with ray_session(workers=len(replicas)):
        import ray

        actor = ray.remote(num_cpus=0, scheduling_strategy="SPREAD")(ReplicaSender)
        config = client.config.model_dump()
        senders = [actor.remote(config, url) for url in replicas]
        shares = [pending[i::len(replicas)] for i in range(len(replicas))]
        results = ray.get([s.run.remote(share, str(output), concurrency) for s, share in zip(senders, shares)])
    counts: Counter = Counter()
    stopped = False
    for result_counts, result_stopped in results:
        counts.update(result_counts)
        stopped = stopped or result_stopped
    return counts, stopped
