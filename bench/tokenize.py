"""Tokenization benchmark: phi3data vs raw tiktoken, vs datatrove's DocumentTokenizer, SentencePiece vs HF.

One run, same machine, same input files, same worker/thread count (--workers, default 2):

1. raw tiktoken cl100k ``encode_ordinary_batch(num_threads=N)`` vs ``phi3data tokenize --tokenizer phi3-small``
   writing shards (goal: phi3data >= 0.9x raw). Raw is timed twice: encoding texts already in memory, and
   reading the same files + encoding (the end-to-end work phi3data does, minus writing).
2. datatrove ``DocumentTokenizer`` with the local phi-3 tokenizer.json (no hub) vs phi3data phi-3-mini shards
   (goal: >= 1.5x). Both add <|endoftext|> after each document and write token files; datatrove's shuffle is
   off so it does no work phi3data skips.
3. phi-3-mini through SentencePiece vs HF ``tokenizers`` on the same vocabulary (same ids).

The corpus is the shared textbooks, the shared web JSONL and the curated web sample (``phi3data run
pipelines/web_quality.toml`` output, built once under --work if missing), staged as JSONL so both tools read
the same files.

    python bench/tokenize.py [--workers 2] [--work /tmp/phi3data-bench-tokenize]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file shares its name with the standard library's `tokenize`: keep bench/ off the import path so that
# `import tokenize` (inspect, linecache, spawned workers) still finds the real module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def stage_corpus(work: Path) -> Path:
    """A folder of JSONL files: textbooks, web JSONL (symlinked) and the curated web sample (converted)."""
    import pyarrow.parquet as pq

    corpus = work / "corpus"
    if corpus.exists():
        return corpus
    curated = work / "web_out"
    if not (curated / "manifest.json").exists():
        from phi3data.pipelines.recipe import load_recipe
        from phi3data.pipelines.runner import run_pipeline

        run_pipeline(load_recipe(ROOT / "pipelines" / "web_quality.toml"), SHARED / "web" / "warc", curated,
                     progress=False)
    tmp = work / "corpus.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "openstax.jsonl.gz").symlink_to(SHARED / "textbooks" / "openstax.jsonl.gz")
    for path in sorted((SHARED / "web" / "jsonl").iterdir()):
        name = path.name.replace(".json.gz", ".jsonl.gz")
        (tmp / f"web_{name}").symlink_to(path)
    for path in sorted((curated / "data").glob("*.parquet")):
        rows = pq.read_table(path, columns=["id", "text"]).to_pylist()
        with open(tmp / f"curated_{path.stem.split('.')[0]}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.rename(corpus)
    return corpus


def read_texts(corpus: Path) -> list[str]:
    from phi3data.io.readers import read_records

    texts = []
    for path in sorted(corpus.iterdir()):
        texts += [r["text"] for r in read_records(path, source="b", max_document_bytes=5_000_000)
                  if not r.get("reject")]
    return texts


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def run_phi3data(corpus: Path, out: Path, tokenizer: str, threads: int) -> tuple[float, dict]:
    from phi3data.tokenization.runner import TokenizeConfig, tokenize

    shutil.rmtree(out, ignore_errors=True)
    # One process with `threads` encoder threads, like the raw tiktoken baseline (on a corpus this small, spawning
    # worker processes costs more than it saves).
    seconds, summary = timed(lambda: tokenize([corpus], out, TokenizeConfig(tokenizer=tokenizer), workers=1))
    return seconds, summary.manifest


def run_datatrove(corpus: Path, out: Path, tokenizer_json: Path, workers: int) -> tuple[float, int]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    shutil.rmtree(out, ignore_errors=True)
    files = sorted(p.name for p in corpus.iterdir())
    pipeline = [
        JsonlReader(str(corpus), glob_pattern="*.jsonl*", text_key="text", id_key="id"),
        DocumentTokenizer(str(out / "tokens"), tokenizer_name_or_path=str(tokenizer_json),
                          eos_token="<|endoftext|>", shuffle_documents=False, batch_size=10000),
    ]
    executor = LocalPipelineExecutor(pipeline=pipeline, tasks=min(workers, len(files)), workers=workers,
                                     logging_dir=str(out / "logs"), skip_completed=False)
    seconds, _ = timed(executor.run)
    tokens = sum(p.stat().st_size for p in (out / "tokens").rglob("*.ds")) // 2
    return seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/phi3data-bench-tokenize"))
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the cl100k comparison (median kept)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    workers = args.workers
    corpus = stage_corpus(args.work)

    from phi3data.tokenization.tokenizers import get_tokenizer

    read_s, texts = timed(lambda: read_texts(corpus))
    chars = sum(len(t) for t in texts)
    print(f"corpus: {len(list(corpus.iterdir()))} files, {len(texts):,} documents, {chars / 1e6:.1f} M characters; "
          f"{workers} workers/threads; {os.cpu_count()} CPUs")
    results: dict[str, dict] = {}

    # 1. raw tiktoken vs phi3data (phi-3-small = cl100k_base padded)
    enc = get_tokenizer("phi3-small").enc
    enc.encode_ordinary_batch(texts[:50], num_threads=workers)  # warm up
    # ~1 s per side: alternate the two sides and keep the median round, so one noisy second does not decide it
    rounds = []
    for _ in range(args.repeats):
        raw_s, ids = timed(lambda: enc.encode_ordinary_batch(texts, num_threads=workers))
        raw_tokens = sum(len(x) for x in ids)
        p3_s, p3 = run_phi3data(corpus, args.work / "out_cl100k", "phi3-small", workers)
        assert p3["tokens"] == raw_tokens + len(texts), (p3["tokens"], raw_tokens)  # + one <|endoftext|> per doc
        rounds.append((raw_s / p3_s, raw_s, p3_s))
    ratios = sorted(r[0] for r in rounds)
    _, raw_s, p3_s = sorted(rounds)[len(rounds) // 2]
    print(f"cl100k raw/phi3data ratio per round: {', '.join(f'{r:.2f}' for r in ratios)}")
    results["tiktoken"] = {"raw_encode_s": raw_s, "raw_read_encode_s": read_s + raw_s, "phi3data_s": p3_s,
                           "tokens": raw_tokens, "round_ratios": ratios}

    # 2. datatrove vs phi3data on phi-3-mini's vocabulary
    tokenizer_json = SHARED / "tokenizers" / "phi3" / "derived_hf_from_gguf" / "tokenizer.json"
    dt_s, dt_tokens = run_datatrove(corpus, args.work / "out_datatrove", tokenizer_json, workers)
    mini_s, mini = run_phi3data(corpus, args.work / "out_mini", "phi3-mini", workers)
    mini_hf_s, mini_hf = run_phi3data(corpus, args.work / "out_mini_hf", "phi3-mini-hf", workers)
    assert mini["tokens"] == mini_hf["tokens"] == dt_tokens, (mini["tokens"], mini_hf["tokens"], dt_tokens)
    results["datatrove"] = {"datatrove_s": dt_s, "phi3data_sp_s": mini_s, "phi3data_hf_s": mini_hf_s,
                            "tokens": mini["tokens"]}

    # 3. SentencePiece vs HF tokenizers, encoding only, same texts and threads
    sp, hf = get_tokenizer("phi3-mini"), get_tokenizer("phi3-mini-hf")
    sp_s, sp_ids = timed(lambda: sp.encode_batch(texts, threads=workers))
    hf_s, hf_ids = timed(lambda: hf.encode_batch(texts, threads=workers))
    assert sp_ids == hf_ids
    results["sp_vs_hf"] = {"sentencepiece_s": sp_s, "hf_tokenizers_s": hf_s,
                           "tokens": sum(len(x) for x in sp_ids)}

    r = results["tiktoken"]
    print("\n| comparison | baseline | phi3data | ratio (baseline time / phi3data time) |")
    print("|---|---|---|---|")
    print(f"| tiktoken cl100k, encode only (texts in memory), median of {args.repeats} rounds "
          f"| {r['tokens'] / r['raw_encode_s']:,.0f} tok/s "
          f"({r['raw_encode_s']:.2f}s) | {r['tokens'] / r['phi3data_s']:,.0f} tok/s ({r['phi3data_s']:.2f}s, "
          f"read+encode+write shards) | {r['raw_encode_s'] / r['phi3data_s']:.2f}x |")
    print(f"| tiktoken cl100k, read files + encode | {r['tokens'] / r['raw_read_encode_s']:,.0f} tok/s "
          f"({r['raw_read_encode_s']:.2f}s) | same run | {r['raw_read_encode_s'] / r['phi3data_s']:.2f}x |")
    d = results["datatrove"]
    print(f"| datatrove DocumentTokenizer (HF tokenizer.json) | {d['tokens'] / d['datatrove_s']:,.0f} tok/s "
          f"({d['datatrove_s']:.2f}s) | phi3-mini SentencePiece: {d['tokens'] / d['phi3data_sp_s']:,.0f} tok/s "
          f"({d['phi3data_sp_s']:.2f}s) | {d['datatrove_s'] / d['phi3data_sp_s']:.2f}x |")
    print(f"| datatrove DocumentTokenizer (HF tokenizer.json) | same | phi3-mini HF path: "
          f"{d['tokens'] / d['phi3data_hf_s']:,.0f} tok/s ({d['phi3data_hf_s']:.2f}s) | "
          f"{d['datatrove_s'] / d['phi3data_hf_s']:.2f}x |")
    s = results["sp_vs_hf"]
    print(f"| phi-3-mini encode only: HF tokenizers vs SentencePiece | {s['tokens'] / s['hf_tokenizers_s']:,.0f} "
          f"tok/s ({s['hf_tokenizers_s']:.2f}s) | SentencePiece {s['tokens'] / s['sentencepiece_s']:,.0f} tok/s "
          f"({s['sentencepiece_s']:.2f}s) | {s['hf_tokenizers_s'] / s['sentencepiece_s']:.2f}x |")
    (args.work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
