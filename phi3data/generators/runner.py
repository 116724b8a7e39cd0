"""Run a generation plan exactly once: send what the ledger lacks, append replies as they arrive, write shards.

``generate(requests, output, client, ...)``:
  1. reads the ledger (``phi3data.generators.ledger``) and keeps the requests whose key has no reply;
  2. sends them with bounded concurrency (workers pull the next request only when a slot frees, so a plan of
     millions of requests holds only the ones in flight), appending one ledger row per reply or final failure;
  3. on Ctrl-C (SIGINT) or SIGTERM stops sending, lets the requests in flight finish and records them;
  4. writes the output from the ledger in plan order: ``data/*.parquet`` (generated documents with provenance),
     ``failures/*.parquet`` (requests that failed for good, with their error class), ``coverage.json`` /
     ``coverage.md`` (per cell: planned, generated, failed, not yet sent, truncated) and ``manifest.json``.

A rerun after ``kill -9`` sends only what has no reply in the ledger, so nothing is sent twice and nothing is lost;
failed requests are sent again on a rerun (their failure rows stay as history). Output files are rewritten from the
ledger at the end of every run, atomically, so they always equal what an uninterrupted run would write.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from phi3data import __version__
from phi3data.generators.client import Completion, LLMClient, LLMError
from phi3data.generators.ledger import LedgerWriter, read_ledger
from phi3data.generators.requests import GenRequest
from phi3data.io.writers import ShardWriter, output_lock, remove_stale_tmp, write_json_atomic

if TYPE_CHECKING:
    from phi3data.generators.vllm_engine import VLLMEngine

ROWS_PER_SHARD = 10_000
ENDPOINT = "chat/completions"


@dataclass
class GenerateSummary:
    output: Path
    planned: int
    already_answered: int
    sent: int
    answered: int
    failed: int
    pending: int
    """Requests without a reply or final failure when the run ended (stopped, or over budget)."""
    stopped: bool
    seconds: float
    coverage: dict
    keys: list[str] = field(default_factory=list)
    """Each request's content key, in plan order (the ledger rows are keyed by them)."""


def payload_of(request: GenRequest, model: str) -> dict:
    """The chat/completions body of a request."""
    payload = {"model": model, "messages": list(request.messages), **request.params}
    if request.schema is not None:
        payload["response_format"] = {"type": "json_object", "schema": request.schema}
    return payload


def generate(requests: Sequence[GenRequest], output: Path, client: LLMClient, *, plan_name: str,
             concurrency: int | None = None, progress: Callable[[dict], None] | None = None,
             handle_signals: bool = True, replicas: Sequence[str] | None = None,
             engine: VLLMEngine | None = None) -> GenerateSummary:
    """Send every request of a plan that the ledger in ``output`` has not answered, then write the outputs.

    ``client`` says how to talk to the server (model, retries, limits). With ``replicas`` (base URLs of servers
    that serve the same model), Ray fans the requests out over them, one actor per replica; requests are then
    keyed by the replica group, so a rerun over the same group sends nothing twice whichever replica answered.
    ``progress`` is called with running counts after every reply (over replicas: the actors' summed counts,
    polled while they work). With ``engine`` (vLLM in process) the requests go to it a batch at a time instead of
    a server, keyed by the engine's identity. The output directory is locked for the run.
    """
    with output_lock(output):
        remove_stale_tmp(output)
        return _generate_locked(requests, output, client, plan_name=plan_name,
                                concurrency=concurrency or client.config.max_concurrency, progress=progress,
                                handle_signals=handle_signals, replicas=list(replicas or []), engine=engine)


def server_identity(client: LLMClient, replicas: Sequence[str]) -> str:
    """The server part of a request key: the base URL, or the replica group (sorted, normalised URLs)."""
    if len(replicas) > 1:
        from phi3data.generators.cache import normalise_base_url

        return "replicas:" + ",".join(sorted(normalise_base_url(u) for u in replicas))
    return replicas[0] if replicas else client.config.base_url


def _generate_locked(requests: Sequence[GenRequest], output: Path, client: LLMClient, *, plan_name: str,
                     concurrency: int, progress: Callable[[dict], None] | None, handle_signals: bool,
                     replicas: list[str], engine: VLLMEngine | None = None) -> GenerateSummary:
    started = time.perf_counter()
    server = engine.identity if engine is not None else server_identity(client, replicas)
    model = engine.model if engine is not None else client.config.model
    keys = [r.key(server, model) for r in requests]
    if len(set(keys)) != len(keys):
        raise ValueError("the plan expands to identical requests (same messages and parameters); give each its "
                         "own seed or fewer copies per cell")
    answered_before = read_ledger(output).answered()
    pending = [(r, k) for r, k in zip(requests, keys) if k not in answered_before]
    if engine is not None:
        counts, stopped = send_to_engine(pending, output, engine, progress), False
    elif len(replicas) > 1:
        from phi3data.generators.fanout import fan_out

        counts, stopped = fan_out(pending, output, client, replicas, concurrency, progress)
    else:
        if replicas:
            client = LLMClient(client.config.model_copy(update={"base_url": replicas[0]}))
        counts, stopped = send_and_record(pending, output, client, concurrency, progress, handle_signals)
    state = read_ledger(output)
    coverage = write_outputs(requests, keys, state.rows, output, plan_name=plan_name, server=server, model=model)
    done = {k for k, row in state.rows.items() if row["status"] == "ok"}
    failed = {k for k, row in state.rows.items() if row["status"] == "failed"} - done
    pending_after = sum(1 for k in keys if k not in state.rows)
    write_json_atomic(output / "manifest.json", {
        "plan": plan_name, "model": model, "server": server, "replicas": replicas, "requests": len(requests),
        "answered": sum(1 for k in keys if k in done), "failed": sum(1 for k in keys if k in failed),
        "pending": pending_after, "complete": pending_after == 0, "ledger_unreadable_lines": dict(state.unreadable),
        "client_usage": client.usage.as_dict(), "phi3data_version": __version__})
    return GenerateSummary(output, len(requests), len(requests) - len(pending), counts["answered"] + counts["failed"],
                           counts["answered"], counts["failed"], pending_after, stopped,
                           time.perf_counter() - started, coverage, keys)


def send_and_record(pending: list[tuple[GenRequest, str]], output: Path, client: LLMClient, concurrency: int,
                    progress: Callable[[dict], None] | None = None, handle_signals: bool = True
                    ) -> tuple[Counter, bool]:
    """Send ``pending`` through ``client``, appending each reply or final failure to this writer's ledger file.
    Returns the counts (answered, failed) and whether sending stopped early (a signal, the budget)."""
    counts: Counter = Counter()
    model = client.config.model
    with LedgerWriter(output) as ledger:

        def record(request: GenRequest, key: str, result: Completion | LLMError) -> None:
            ledger.append(_ledger_row(request, key, model, client.config.base_url, result, counts))
            if progress is not None:
                progress({"done": counts["answered"] + counts["failed"], "total": len(pending), **counts,
                          "completion_tokens": client.usage.completion_tokens})

        stopped = asyncio.run(_send(client, pending, record, concurrency, handle_signals))
    return counts, stopped


def send_to_engine(pending: list[tuple[GenRequest, str]], output: Path, engine: VLLMEngine,
                   progress: Callable[[dict], None] | None = None) -> Counter:
    """Generate ``pending`` with an in-process engine, a batch at a time, recording each reply in the ledger."""
    counts: Counter = Counter()
    tokens = 0
    with LedgerWriter(output) as ledger:
        for start in range(0, len(pending), engine.batch_size):
            batch = pending[start:start + engine.batch_size]
            for (request, key), result in zip(batch, engine.generate([r for r, _ in batch])):
                ledger.append(_ledger_row(request, key, engine.model, engine.identity, result, counts))
                tokens += result.completion_tokens if isinstance(result, Completion) else 0
            if progress is not None:
                progress({"done": counts["answered"] + counts["failed"], "total": len(pending), **counts,
                          "completion_tokens": tokens})
    return counts


def _ledger_row(request: GenRequest, key: str, model: str, server: str, result: Completion | LLMError,
                counts: Counter) -> dict:
    """A reply or final failure as a ledger row (and counted)."""
    row = {"key": key, "index": request.index, "model": model, "server": server, "time": time.time()}
    if isinstance(result, Completion):
        row.update(status="ok", text=result.text, finish_reason=result.finish_reason,
                   prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
        counts["answered"] += 1
    else:
        row.update(status="failed", error=str(result)[:500], error_class=_error_class(result))
        counts["failed"] += 1
    return row


async def _send(client: LLMClient, pending: list[tuple[GenRequest, str]],
                record: Callable[[GenRequest, str, Completion | LLMError], None], concurrency: int,
                handle_signals: bool) -> bool:
    """Workers pull requests one at a time; a stop signal ends the pulling and lets the in-flight ones finish."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread: the caller stops it another way
    todo: Iterator[tuple[GenRequest, str]] = iter(pending)
    budget_hit = False

    async def worker() -> None:
        nonlocal budget_hit
        for request, key in todo:
            if stop.is_set():
                return
            try:
                result: Completion | LLMError = await client.request(ENDPOINT, payload_of(request,
                                                                                          client.config.model))
            except LLMError as exc:
                if _error_class(exc) == "BudgetExhausted":  # never sent: not a failure, left for a later run
                    budget_hit = True
                    stop.set()
                    return
                result = exc
            record(request, key, result)

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(pending) or 1)))))
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await client.aclose()
    return stop.is_set() or budget_hit


def _error_class(exc: BaseException) -> str:
    if type(exc).__name__ != "LLMError":
        return type(exc).__name__
    status = getattr(exc, "status", None)
    if status is not None:
        return f"http_{status}"
    message = str(exc)
    for marker, name in (("gave up after", "retries_exhausted"), ("no choices", "unusable_reply")):
        if marker in message:
            return name
    return "LLMError"


def provenance(request: GenRequest, row: dict, *, plan_name: str, server: str, model: str, key: str) -> dict:
    """Everything that says where a generated document came from (the ``metadata`` column)."""
    return {"plan": plan_name, "cell": request.cell, "template_id": request.template_id,
            "template_hash": request.template_hash, "seed_id": request.seed_id, "seed_text": request.seed_text,
            "backend": "vllm-in-process" if server.startswith("vllm:") else "openai-http",
            "server": server, "model": model, "params": request.params,
            "request_key": key, "finish_reason": row.get("finish_reason"),
            "usage": {"prompt_tokens": row.get("prompt_tokens"), "completion_tokens": row.get("completion_tokens")},
            **({"extra": request.extra} if request.extra else {})}


def write_outputs(requests: Sequence[GenRequest], keys: Sequence[str], rows: dict[str, dict], output: Path, *,
                  plan_name: str, server: str, model: str) -> dict:
    """Data shards, failure shards and the coverage report, in plan order, from the ledger's rows."""
    from phi3data.documents import CORE_SCHEMA, make_batch

    for stale in [*(output / "data").glob("part-*.parquet"), *(output / "failures").glob("part-*.parquet")]:
        stale.unlink()
    docs, failures = [], []
    cells: dict[str, Counter] = {}
    for request, key in zip(requests, keys):
        cell = cells.setdefault(json.dumps(request.cell, sort_keys=True), Counter())
        cell["planned"] += 1
        row = rows.get(key)
        if row is None:
            cell["pending"] += 1
        elif row["status"] == "ok":
            cell["generated"] += 1
            cell["truncated"] += row.get("finish_reason") == "length"
            meta = provenance(request, row, plan_name=plan_name, server=server, model=model, key=key)
            docs.append({"id": f"{plan_name}-{key[:24]}", "text": row["text"], "url": None,
                         "source": f"synthetic/{plan_name}", "metadata": meta})
        else:
            cell["failed"] += 1
            failures.append({"id": f"{plan_name}-{key[:24]}", "index": request.index, "key": key,
                             "error_class": row.get("error_class"), "error": row.get("error"),
                             "cell": json.dumps(request.cell, sort_keys=True), "template_id": request.template_id})
    _write_shards(output / "data", [make_batch(docs[i:i + ROWS_PER_SHARD])
                                    for i in range(0, len(docs), ROWS_PER_SHARD)], CORE_SCHEMA)
    failure_tables = [pa.Table.from_pylist(failures[i:i + ROWS_PER_SHARD])
                      for i in range(0, len(failures), ROWS_PER_SHARD)]
    _write_shards(output / "failures", failure_tables, None)
    coverage = {"cells": [{"cell": json.loads(c), **{k: int(v) for k, v in counts.items()}}
                          for c, counts in sorted(cells.items())]}
    totals = Counter()
    for counts in cells.values():
        totals.update(counts)
    coverage["totals"] = {k: int(v) for k, v in totals.items()}
    coverage["short_cells"] = [c["cell"] for c in coverage["cells"] if c.get("generated", 0) < c["planned"]]
    write_json_atomic(output / "coverage.json", coverage)
    (output / "coverage.md").write_text(coverage_markdown(coverage), encoding="utf-8")
    return coverage


def _write_shards(directory: Path, tables: list[pa.Table], empty_schema: pa.Schema | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, table in enumerate(tables):
        writer = ShardWriter(directory / f"part-{i:05d}.parquet")
        writer.write(table)
        writer.close()
    if not tables and empty_schema is not None:
        writer = ShardWriter(directory / "part-00000.parquet")
        writer.close(empty_schema=empty_schema)


def coverage_markdown(coverage: dict) -> str:
    """The coverage report as a Markdown table, cells that fell short marked."""
    columns = ("planned", "generated", "failed", "pending", "truncated")
    lines = ["# Coverage", "", "| cell | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for entry in coverage["cells"]:
        cell = ", ".join(f"{k}={v}" for k, v in entry["cell"].items())
        short = " (short)" if entry.get("generated", 0) < entry["planned"] else ""
        lines.append(f"| {cell}{short} | " + " | ".join(str(entry.get(c, 0)) for c in columns) + " |")
    totals = coverage["totals"]
    lines.append("| **total** | " + " | ".join(str(totals.get(c, 0)) for c in columns) + " |")
    return "\n".join(lines) + "\n"
