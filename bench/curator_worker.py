"""bespokelabs curator's side of ``python -m bench.generate --curator-python ...``, run by the Python of a venv
with ``bespokelabs-curator`` installed (it imports nothing from phi3data), with ``-P`` so that bench/ does not
lead ``sys.path`` (bench/tokenize.py would hide the standard library's tokenize).

Reads a JSON job on stdin (base_url, model, prompts, concurrency, max_tokens, seed, max_retries), sends the prompts
through curator's OpenAI online backend (``curator.LLM(backend="openai")``) and prints one JSON line of results.
The caller sets the environment that keeps curator offline and cache-free (see ``CURATOR_ENV`` in
``bench/generate.py``). Curator's request limits are raised so that only ``max_concurrent_requests`` bounds it,
like the other clients, and ``invalid_finish_reasons`` is emptied so that a reply cut at ``max_tokens`` is an
answer (by default curator retries such replies, and at temperature 0 they come back cut again).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time


def main() -> None:
    job = json.load(sys.stdin)
    started = time.perf_counter()
    litellm = importlib.util.find_spec("litellm")
    if litellm is not None and litellm.origin:  # tiktoken would download cl100k_base; litellm ships a copy
        tokenizers = os.path.join(os.path.dirname(litellm.origin), "litellm_core_utils", "tokenizers")
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", tokenizers)
    from bespokelabs import curator

    class Answer(curator.LLM):
        def prompt(self, row: dict) -> str:
            return row["prompt"]

        def parse(self, row: dict, response: str) -> dict:
            return {"prompt": row["prompt"], "text": response}

    backend_params = {"base_url": job["base_url"], "api_key": "unused",
                      "max_concurrent_requests": job["concurrency"], "max_retries": job["max_retries"],
                      "max_requests_per_minute": 10_000_000, "max_tokens_per_minute": 10_000_000_000,
                      "request_timeout": 300, "require_all_responses": False}
    if not job.get("default_finish_reasons"):
        backend_params["invalid_finish_reasons"] = []
    llm = Answer(model_name=job["model"], backend="openai", backend_params=backend_params,
                 generation_params={"max_tokens": job["max_tokens"], "temperature": 0.0, "seed": job["seed"]})
    setup = time.perf_counter() - started  # imports, and the rate-limit probe curator sends from LLM()
    wall, cpu = time.perf_counter(), time.process_time()
    response = llm([{"prompt": p} for p in job["prompts"]])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rows = response.dataset.to_list()
    answered = sum(1 for r in rows if r.get("text") is not None)
    print(json.dumps({"answered": answered, "seconds": wall, "cpu": cpu, "setup_seconds": setup,
                      "curator_output_tokens": response.token_usage.output,
                      "curator_failed": response.request_stats.failed}))


if __name__ == "__main__":
    main()
