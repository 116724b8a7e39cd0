"""The generation plane's command, ``phi3data generate``: a plan of prompts -> a synthetic corpus, exactly once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def generate(
    plan: Annotated[Path, typer.Argument(help="Generation plan (TOML), e.g. generators/textbooks.toml")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output directory (resumable)")] = None,
    base_url: Annotated[list[str] | None, typer.Option(
        help="OpenAI-compatible API root (vLLM, llama.cpp server, TGI ...); repeat it for replicas of one model, "
             "which Ray fans the plan out over")] = None,
    model: Annotated[str | None, typer.Option(help="Model name to send (default: the plan's)")] = None,
    api_key_env: Annotated[str, typer.Option(help="Environment variable holding the API key")] = "OPENAI_API_KEY",
    concurrency: Annotated[int, typer.Option(help="Most requests in flight (per replica); the client adapts below "
                                                  "it, backing off on 429/503 and rising latency")] = 8,
    rpm: Annotated[float | None, typer.Option(help="Requests per minute at most (hosted APIs)")] = None,
    tpm: Annotated[float | None, typer.Option(help="Tokens per minute at most (hosted APIs)")] = None,
    max_tokens_total: Annotated[int | None, typer.Option(help="Token budget: stop sending (cleanly, resumable) "
                                                              "past this many prompt + completion tokens")] = None,
    max_cost: Annotated[float | None, typer.Option(help="Cost budget, with --price-in/--price-out")] = None,
    timeout: Annotated[float, typer.Option(help="Per-request timeout, seconds")] = 300.0,
    seed: Annotated[list[str] | None, typer.Option(help="Replace a seed source's path: NAME=PATH")] = None,
    dry_run: Annotated[bool, typer.Option(help="Expand the plan and show counts, tokens, cost and sample prompts; "
                                               "send nothing")] = False,
    samples: Annotated[int, typer.Option(help="Rendered prompts to show with --dry-run")] = 2,
    price_in: Annotated[float, typer.Option(help="Price per million prompt tokens (estimate and --max-cost)")] = 0.0,
    price_out: Annotated[float, typer.Option(help="Price per million completion tokens")] = 0.0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
    allow_code_execution: Annotated[bool, typer.Option(
        help="Let a plan with [verify] run the generated programs (in the sandbox)")] = False,
    sandbox_workers: Annotated[int, typer.Option(help="Sandbox worker processes for verification")] = 2,
    vllm_model: Annotated[str | None, typer.Option(
        help="Generate with vLLM in this process (a model path or name; needs the vllm package) instead of a "
             "server")] = None,
    vllm_arg: Annotated[list[str] | None, typer.Option(
        help="An engine argument for vllm.LLM, KEY=VALUE (repeatable), e.g. gpu_memory_utilization=0.5")] = None,
) -> None:
    """Generate a synthetic corpus from a plan (topics x audiences x styles over seeds), exactly once.

    Example: phi3data generate generators/textbooks.toml --output out/synthetic/textbooks
    --base-url http://127.0.0.1:8080/v1

    Every reply is appended to OUTPUT/ledger/ as it arrives; a rerun (after Ctrl-C, kill -9 or a failure) sends
    only what has no reply. Output: OUTPUT/data/*.parquet (documents with provenance), failures/, coverage.md.
    """
    from rich.table import Table

    from phi3data.generators.plan import estimate, expand, load_plan, sample_prompts

    overrides = {}
    for item in seed or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--seed takes NAME=PATH, got {item!r}")
        overrides[name] = path
    loaded = load_plan(plan)
    expansion = expand(loaded, seed_paths=overrides)
    if expansion.seed_rejects:
        console.print("seed records left out: " + ", ".join(f"{k}={v}" for k, v in
                                                             sorted(expansion.seed_rejects.items())))
    if dry_run:
        est = estimate(expansion, price_in_per_m=price_in, price_out_per_m=price_out)
        table = Table(title=f"{loaded.name}: {est['prompts']:,} requests, ~{est['prompt_tokens']:,} prompt tokens, "
                            f"<= {est['max_completion_tokens']:,} completion tokens, cost {est['cost']:.2f}")
        for column in ("cell", "prompts", "prompt tokens", "max completion tokens", "cost"):
            table.add_column(column, justify="left" if column == "cell" else "right", overflow="fold")
        for cell, row in sorted(est["cells"].items()):
            table.add_row(cell, f"{row['prompts']:,}", f"{row['prompt_tokens']:,}",
                          f"{row['max_completion_tokens']:,}", f"{row['cost']:.2f}")
        console.print(table)
        for request in sample_prompts(expansion, samples):
            console.rule(f"request {request.index}: {request.cell} ({request.template_id})")
            for message in request.messages:
                console.print(f"[bold]{message['role']}:[/bold] {message['content']}", markup=True, highlight=False)
        return
    if output is None:
        raise ValueError("--output is required unless --dry-run")
    if loaded.verify is not None and not (loaded.verify.allow_code_execution or allow_code_execution):
        from phi3data.generators.sandbox import CodeExecutionRefused

        raise CodeExecutionRefused(f"verifying the replies of {plan}")
    urls = base_url or ["http://127.0.0.1:8000/v1"]
    if vllm_model is not None:
        if base_url:
            raise ValueError("--vllm-model generates in this process; leave out --base-url")
        from phi3data.generators.vllm_engine import VLLMEngine

        engine_args = {}
        for item in vllm_arg or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--vllm-arg takes KEY=VALUE, got {item!r}")
            try:
                engine_args[key] = json.loads(value)
            except json.JSONDecodeError:
                engine_args[key] = value
        engine = VLLMEngine(vllm_model, **engine_args)
        summary = _run(expansion.requests, output, loaded.name, urls, vllm_model, api_key_env, concurrency, timeout,
                       progress, {}, engine=engine)
        console.print(_coverage_table(summary.coverage))
        console.print(f"{summary.planned:,} requests, {summary.answered:,} answered and {summary.failed:,} failed "
                      f"now by vLLM {engine.version} in process -> {output}")
        return
    limits = {"rpm": rpm, "tpm": tpm, "max_total_tokens": max_tokens_total, "max_cost": max_cost,
              "price_in_per_m": price_in, "price_out_per_m": price_out}
    summary = _run(expansion.requests, output, loaded.name, urls, model or loaded.model, api_key_env, concurrency,
                   timeout, progress, limits)
    console.print(_coverage_table(summary.coverage))
    state = "stopped early; rerun to continue" if summary.stopped or summary.pending else "complete"
    console.print(f"{summary.planned:,} requests: {summary.already_answered:,} answered before, {summary.sent:,} "
                  f"sent now ({summary.answered:,} answered, {summary.failed:,} failed), {summary.pending:,} not "
                  f"sent; {state} in {summary.seconds:.1f}s -> {output} (data/, failures/, coverage.md, ledger/)")
    run_args = (urls, model or loaded.model, api_key_env, concurrency, timeout, progress, limits)
    if loaded.chat is not None:
        from phi3data.generators.chat import CHAT_DIR, build_conversations

        done = build_conversations(loaded, expansion.requests, summary.keys, _rows(output), output,
                                   _stepper(output / CHAT_DIR, loaded.name, run_args))
        console.print(f"chat: {done['conversations']:,} conversations of {done['turns']} turns, {done['failed']:,} "
                      f"failed {done['failed_by_step'] or ''} -> {output / CHAT_DIR / 'data'} "
                      f"(tokenize with: phi3data tokenize ... --chat)")
    if loaded.judge is not None:
        from phi3data.generators.judge import JUDGE_DIR, judge_pairs

        done = judge_pairs(loaded, expansion.requests, summary.keys, _rows(output), output,
                           _stepper(output / JUDGE_DIR, loaded.name, run_args))
        console.print(f"judge: {done['pairs']:,} preference pairs from {done['prompts']:,} prompts "
                      f"{done['outcomes']} -> {output / JUDGE_DIR / 'preferences.jsonl'}")
    if loaded.verify is not None:
        from phi3data.generators.sandbox import Sandbox
        from phi3data.generators.verified import SOLVE_DIR, verify_plan

        solve = _stepper(output, loaded.name, run_args, folder=SOLVE_DIR)
        with Sandbox(workers=sandbox_workers, allow_code_execution=True, timeout=loaded.verify.timeout) as sandbox:
            done = verify_plan(loaded, expansion.requests, summary.keys, output, lambda reqs: solve(SOLVE_DIR, reqs),
                               sandbox.run_many, allow_code_execution=True)
        console.print(f"verified: {done['kept']:,} of {done['replies']:,} replies kept (pass rate "
                      f"{done['pass_rate']:.0%}); failures {done['failures']}; {done['preference_pairs']} preference "
                      f"pairs; isolation {done['isolation']} -> {output / 'verified'}, {output / 'verification.json'}")
    from phi3data.cli.report import write_and_print

    write_and_print(output, console.print)


def _rows(folder: Path) -> dict[str, dict]:
    from phi3data.generators.ledger import read_ledger

    return read_ledger(folder).rows


def _stepper(root: Path, plan_name: str, run_args: tuple, folder: str | None = None):
    """A function that sends one follow-up step's requests exactly once into ``root/<step>`` (or ``root/folder``)
    and returns their keys and ledger rows."""

    def generate_step(step: str, requests):
        target = root / (folder or step)
        done = _run(requests, target, f"{plan_name}-{step}", *run_args)
        return done.keys, _rows(target)

    return generate_step


def _run(requests, output: Path, plan_name: str, urls: list[str], model: str, api_key_env: str, concurrency: int,
         timeout: float, progress: bool, limits: dict, engine=None):
    from phi3data.generators.client import ClientConfig, LLMClient
    from phi3data.generators.runner import generate as run_generate

    client = LLMClient(ClientConfig(base_url=urls[0], model=model, api_key_env=api_key_env,
                                    max_concurrency=concurrency, timeout_s=timeout, **limits))
    replicas = urls if len(urls) > 1 else None
    if not progress:
        return run_generate(requests, output, client, plan_name=plan_name, concurrency=concurrency,
                            replicas=replicas, engine=engine)
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.perf_counter()
    with Progress(TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[rate]}")) as bar:
        task = bar.add_task("generate", total=None, rate="")

        def update(counts: dict) -> None:
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.update(task, total=counts["total"], completed=counts["done"],
                       rate=f"{counts['done'] / elapsed:.2f} req/s, {counts['completion_tokens'] / elapsed:,.0f} "
                            f"tok/s, {counts.get('failed', 0)} failed")

        return run_generate(requests, output, client, plan_name=plan_name, concurrency=concurrency, progress=update,
                            replicas=replicas, engine=engine)


def _coverage_table(coverage: dict):
    from rich.table import Table

    columns = ("planned", "generated", "failed", "pending", "truncated")
    table = Table(title="coverage per cell")
    table.add_column("cell")
    for column in columns:
        table.add_column(column, justify="right")
    for entry in coverage["cells"]:
        style = "red" if entry.get("generated", 0) < entry["planned"] else None
        table.add_row(", ".join(f"{v}" for v in entry["cell"].values()),
                      *(str(entry.get(c, 0)) for c in columns), style=style)
    return table
