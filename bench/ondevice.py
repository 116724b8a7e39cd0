"""On-device inference (issue 14): the exported GGUF in llama.cpp vs our model in PyTorch fp32, side by side.
Prints tables; asserts nothing.

    python -m bench.ondevice [--work /tmp/phi3data-ondevice] [--checkpoint RUN_OR_CKPT] [--parts speed,ppl,mini]

1. Speed and memory, one model bigger than toy size (random weights: speed does not depend on them; hidden 512,
   8 layers, ffn 1536, phi-3-mini's 32,064 vocabulary, 58 M parameters), the same prompt for every side:
   prompt-eval and generation tokens/s and peak RSS of the q4_k_m, q4_0 and f16 GGUFs in llama.cpp
   (llama-cpp-python, 2 threads) vs our model in PyTorch fp32 (no KV cache: each new token reruns the sequence)
   and the same weights in transformers' Phi3ForCausalLM fp32 (KV cache). Each side runs in its own process:
   peak RSS is its VmHWM (interpreter and libraries included; llama.cpp's mmap'd weights count once touched),
   "model + run" is that peak less the RSS before the model was loaded. Timings are the fastest of --reps runs
   (the machine is shared), except our no-KV-cache generation, timed once. File sizes of each quant.
2. Perplexity cost of each quantisation on held-out OpenStax text, on a trained model (``--checkpoint``, or one
   trained here: ``--ppl-model w256``, 256 wide so k-quants apply, 2 layers, untied, 150 steps of 8 x 64 tokens;
   ``tiny`` is the test suite's 64-wide recipe, whose tied embedding stays Q8_0 in every file).
3. Without building it: each quantisation's size for phi-3-mini's real shape (phi3data/model/sizes/phi-3-mini.toml),
   using the tensor types llama.cpp's quantiser actually picks (read back from a 32-layer stand-in of width 256
   quantised here) and each type's bits per weight.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m")

SPEED_MODEL = dict(vocab_size=32064, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                   num_attention_heads=8, max_position_embeddings=2048, original_max_position_embeddings=2048,
                   tie_word_embeddings=False)

# bits per weight of each ggml type (block bytes * 8 / block values)
BPW = {"F32": 32.0, "F16": 16.0, "Q8_0": 34 * 8 / 32, "Q4_0": 18 * 8 / 32, "Q4_1": 20 * 8 / 32,
       "Q5_0": 22 * 8 / 32, "Q5_1": 24 * 8 / 32, "Q4_K": 144 * 8 / 256, "Q5_K": 176 * 8 / 256,
       "Q6_K": 210 * 8 / 256, "Q8_K": 292 * 8 / 256}


def prompt_ids(n: int) -> list[int]:
    from phi3data.tokenization.tokenizers import load_tokenizer

    tok = load_tokenizer("phi3-mini")
    with gzip.open(SHARED / "textbooks/openstax.jsonl.gz", "rt") as f:
        text = json.loads(f.readline())["text"]
    return [tok.bos_id, *tok.encode_text(text)[: n - 1]]


# ------------------------------------------------------------------------------------------ workers (subprocess)


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set of this process, MiB, from /proc (file-backed mmap pages included)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def best_of(n: int, fn) -> float:
    """The fastest of ``n`` timed runs of ``fn()`` (a shared machine: the least-disturbed run)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def worker(kind: str, path: str, ids: list[int], n_gen: int, threads: int, reps: int) -> dict:
    """Load one side, time prompt eval (best of ``reps``) and greedy generation of ``n_gen`` tokens."""
    if kind == "llama.cpp":
        import llama_cpp

        base = rss_mib()[0]
        model = llama_cpp.Llama(model_path=path, n_ctx=len(ids) + n_gen + 8, n_threads=threads,
                                n_threads_batch=threads, n_batch=len(ids), verbose=False)
        n_vocab = model.n_vocab()

        def last_logits() -> np.ndarray:
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(n_vocab,))

        def prompt() -> None:
            model.reset()
            model.eval(ids)

        def generate() -> None:
            prompt()
            nxt = int(np.argmax(last_logits()))
            t0 = time.perf_counter()
            for _ in range(n_gen - 1):  # greedy, one token per step through the KV cache
                model.eval([nxt])
                nxt = int(np.argmax(last_logits()))
            gen_times.append(time.perf_counter() - t0)

        prompt()  # warm-up
        t_prompt = best_of(reps, prompt)
        gen_times: list[float] = []
        for _ in range(reps):
            generate()
        t_gen = min(gen_times)
        model.close()
    else:
        import torch

        torch.set_num_threads(threads)
        x = torch.tensor([ids])
        base = rss_mib()[0]
        if kind == "pytorch":
            from phi3data.model.hf import load_hf

            model = load_hf(path).eval()
            with torch.no_grad():
                model(x[:, :8])
                t_prompt = best_of(reps, lambda: model(x))
                seq = torch.cat([x, model(x)[0][:, -1:].argmax(-1)], 1)
                t0 = time.perf_counter()
                for _ in range(n_gen - 1):  # no KV cache: every token reruns the whole sequence (one run only)
                    seq = torch.cat([seq, model(seq)[0][:, -1:].argmax(-1)], 1)
                t_gen = time.perf_counter() - t0
        else:  # transformers' Phi3ForCausalLM on the same weights, with its KV cache
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            gen_times = []

            def generate() -> None:
                out = model(x, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                t0 = time.perf_counter()
                for _ in range(n_gen - 1):
                    out = model(nxt, past_key_values=cache, use_cache=True)
                    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                gen_times.append(time.perf_counter() - t0)

            with torch.no_grad():
                model(x[:, :8])
                t_prompt = best_of(reps, lambda: model(x, use_cache=True))
                for _ in range(reps):
                    generate()
            t_gen = min(gen_times)
    peak = rss_mib()[1]
    return {"prompt_tok_s": len(ids) / t_prompt, "gen_tok_s": (n_gen - 1) / t_gen, "peak_rss_mib": peak,
            "model_rss_mib": peak - base}


def run_worker(kind: str, path: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "bench.ondevice", "--worker", kind, "--path", str(path), "--prompt-file",
           str(Path(args.work) / "prompt.json"), "--gen", str(args.gen), "--threads", str(args.threads), "--reps",
           str(args.reps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------- parts


def speed(work: Path, args: argparse.Namespace) -> None:
    import torch

    from phi3data.export.gguf import export_gguf
    from phi3data.model.hf import save_hf
    from phi3data.model.model import Phi3, Phi3Config

    cfg = Phi3Config(**SPEED_MODEL)
    ckpt = work / "speed-ckpt"
    if not (ckpt / "model.safetensors").exists():
        torch.manual_seed(0)
        save_hf(Phi3(cfg), ckpt)
    (work / "prompt.json").write_text(json.dumps(prompt_ids(args.prompt)))
    files = {}
    for q in QUANTS:
        path = work / f"speed-{q}.gguf"
        if not path.exists():
            export_gguf(ckpt, path, quant=q, threads=args.threads)
        files[q] = path
    n_params = sum(int(np.prod(s)) for s in _param_shapes(cfg))
    print(f"\n## speed and memory: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, ffn "
          f"{cfg.intermediate_size}, vocab {cfg.vocab_size}: {n_params / 1e6:.1f} M parameters; prompt "
          f"{args.prompt} tokens, {args.gen} generated greedily, {args.threads} threads\n")
    rows = []
    for label, kind, path in (("llama.cpp q4_k_m", "llama.cpp", files["q4_k_m"]),
                              ("llama.cpp q4_0", "llama.cpp", files["q4_0"]),
                              ("llama.cpp f16", "llama.cpp", files["f16"]),
                              ("PyTorch fp32 (ours, no KV cache)", "pytorch", ckpt),
                              ("transformers fp32 (KV cache)", "transformers", ckpt)):
        r = run_worker(kind, path, args)
        rows.append((label, r))
    base = rows[3][1]
    print("| side | prompt tok/s | generate tok/s | peak RSS MiB | of it model + run MiB | prompt x ours | "
          "generate x ours | model RSS x ours |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in rows:
        print(f"| {label} | {r['prompt_tok_s']:,.0f} | {r['gen_tok_s']:,.1f} | {r['peak_rss_mib']:,.0f} | "
              f"{r['model_rss_mib']:,.0f} | {r['prompt_tok_s'] / base['prompt_tok_s']:.2f} | "
              f"{r['gen_tok_s'] / base['gen_tok_s']:.2f} | {r['model_rss_mib'] / base['model_rss_mib']:.2f} |")
    st = (ckpt / "model.safetensors").stat().st_size
    print("\n| file | MiB | x f16 |\n|---|---:|---:|")
    print(f"| safetensors fp32 | {st / 2**20:.1f} | {st / files['f16'].stat().st_size:.2f} |")
    for q in QUANTS:
        size = files[q].stat().st_size
        print(f"| {q}.gguf | {size / 2**20:.1f} | {size / files['f16'].stat().st_size:.2f} |")


def _param_shapes(cfg) -> list[tuple[int, ...]]:
    h, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd
    layer = [(qkv, h), (h, cfg.num_attention_heads * hd), (2 * f, h), (h, f), (h,), (h,)]
    shapes = [(cfg.vocab_size, h), (h,)] + layer * cfg.num_hidden_layers
    return shapes + ([] if cfg.tie_word_embeddings else [(cfg.vocab_size, h)])


PPL_RECIPES = {
    # the test suite's recipe (tests/test_export_gguf.py): too narrow for k-quants, its tied embedding stays Q8_0
    "tiny": {"model.hidden_size": 64, "model.intermediate_size": 176, "model.num_hidden_layers": 2,
             "seq_len": 64, "micro_batch_size": 8, "max_steps": 140, "lr": 1e-2},
    # wide enough for k-quants (rows of 256 and 768), untied like phi-3-mini: every matrix is really quantised
    "w256": {"model.hidden_size": 256, "model.intermediate_size": 768, "model.num_hidden_layers": 2,
             "model.num_attention_heads": 4, "model.tie_word_embeddings": False,
             "seq_len": 64, "micro_batch_size": 8, "max_steps": 150, "lr": 3e-3},
}


def train_small(work: Path, recipe: str) -> Path:
    """Train the perplexity model on OpenStax's first ~35 sections (Llama-2 pieces = phi-3-mini's ids)."""
    run = work / f"ppl-run-{recipe}"
    from phi3data.training.checkpoint import latest_checkpoint

    if latest_checkpoint(run / "checkpoints") is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_train_trainer import make_token_dir

        from phi3data.training import TrainConfig, Trainer

        tokens = make_token_dir(work / "ppl-tokens", max_tokens=120_000)
        steps = PPL_RECIPES[recipe]["max_steps"]
        cfg = TrainConfig.from_toml(ROOT / "model" / "train-tiny-cpu.toml", {
            **PPL_RECIPES[recipe], "data_path": str(tokens), "out_dir": str(run), "warmup_steps": 10,
            "eval_every": 0, "ckpt_every": steps, "log_every": 50})
        Trainer(cfg).train()
    return run


def perplexity_cost(work: Path, args: argparse.Namespace) -> None:
    import llama_cpp
    import torch

    from phi3data.export.gguf import export_gguf
    from phi3data.model.hf import load_hf, resolve_weights
    from phi3data.tokenization.tokenizers import load_tokenizer

    ckpt = resolve_weights(args.checkpoint or train_small(work, args.ppl_model))
    tok = load_tokenizer("phi3-mini")
    with gzip.open(SHARED / "textbooks/openstax.jsonl.gz", "rt") as f:
        docs = [json.loads(line)["text"] for line in f][60:76]  # same book, after the ~35 sections trained on
    seqs = [[tok.bos_id, *tok.encode_text(d)[:255]] for d in docs]

    def ppl(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
        x = logits[:-1].astype(np.float64)
        m = x.max(-1, keepdims=True)
        lse = np.log(np.exp(x - m).sum(-1)) + m[:, 0]
        return float((lse - x[np.arange(len(ids) - 1), ids[1:]]).sum()), len(ids) - 1

    model = load_hf(ckpt).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for ids in seqs:
            a, b = ppl(model(torch.tensor([ids]))[0][0].numpy(), ids)
            nll, n = nll + a, n + b
    results = {"PyTorch fp32": math.exp(nll / n)}
    sizes = {}
    for q in QUANTS:
        path = work / f"ppl-{q}.gguf"
        export_gguf(ckpt, path, quant=q, threads=args.threads)
        sizes[q] = path.stat().st_size
        llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_threads=args.threads, verbose=False)
        nll, n = 0.0, 0
        for ids in seqs:
            llm.reset()
            llm.eval(ids)
            a, b = ppl(np.array(llm.scores[: len(ids)]), ids)
            nll, n = nll + a, n + b
        llm.close()
        results[q] = math.exp(nll / n)
    print(f"\n## perplexity cost: {ckpt} ({model.cfg.hidden_size} wide, {model.cfg.num_hidden_layers} layers), "
          f"{n} held-out OpenStax tokens (16 sections)\n")
    print("| weights | perplexity | x fp32 | file MiB |\n|---|---:|---:|---:|")
    for k, v in results.items():
        size = f"{sizes[k] / 2**20:.2f}" if k in sizes else ""
        print(f"| {k} | {v:.3f} | {v / results['PyTorch fp32']:.4f} | {size} |")


def phi3_mini_sizes(work: Path, args: argparse.Namespace) -> None:
    """Each quant's size for phi-3-mini's shapes: the types llama.cpp picks for each tensor (read from a 32-layer,
    256-wide stand-in quantised here: its choices depend on the tensor's name, layer index and ftype, not its width
    once rows fit 256) times that tensor's real parameter count at phi-3-mini's width."""
    import torch

    from phi3data.export.gguf import export_gguf, tensor_types
    from phi3data.model.hf import save_hf
    from phi3data.model.model import Phi3, Phi3Config, num_parameters
    from phi3data.model.recipes import load_model_config

    mini = load_model_config("phi-3-mini")
    stand_in = Phi3Config(vocab_size=mini.vocab_size, hidden_size=256, intermediate_size=256,
                          num_hidden_layers=mini.num_hidden_layers, num_attention_heads=4,
                          max_position_embeddings=512, original_max_position_embeddings=512,
                          tie_word_embeddings=mini.tie_word_embeddings)
    ckpt = work / "standin-ckpt"
    if not (ckpt / "model.safetensors").exists():
        torch.manual_seed(0)
        save_hf(Phi3(stand_in), ckpt)
    real = {}  # GGUF tensor name -> parameter count at phi-3-mini's shape
    h, f, hd = mini.hidden_size, mini.intermediate_size, mini.head_dim
    qkv = (mini.num_attention_heads + 2 * mini.num_key_value_heads) * hd
    real["token_embd.weight"] = mini.vocab_size * h
    real["output.weight"] = mini.vocab_size * h
    real["output_norm.weight"] = h
    for i in range(mini.num_hidden_layers):
        real[f"blk.{i}.attn_norm.weight"] = h
        real[f"blk.{i}.ffn_norm.weight"] = h
        real[f"blk.{i}.attn_qkv.weight"] = qkv * h
        real[f"blk.{i}.attn_output.weight"] = h * h
        real[f"blk.{i}.ffn_up.weight"] = 2 * f * h
        real[f"blk.{i}.ffn_down.weight"] = f * h
    total = num_parameters(mini)["total"]
    assert sum(real.values()) == total, (sum(real.values()), total)
    print(f"\n## phi-3-mini's real shape ({total / 1e9:.3f} B parameters), computed, not built\n")
    print("| quant | GB (1e9 bytes) | GiB | bits/weight | types (share of weights) |\n|---|---:|---:|---:|---|")
    for q in QUANTS:
        if q == "f16":
            types = {name: ("F32" if name.endswith("norm.weight") else "F16") for name in real}
        else:
            path = work / f"standin-{q}.gguf"
            if not path.exists():
                export_gguf(ckpt, path, quant=q, threads=args.threads)
            types = tensor_types(path)
        bits = sum(real[name] * BPW[types[name]] for name in real)
        share: dict[str, float] = {}
        for name, count in real.items():
            share[types[name]] = share.get(types[name], 0) + count / total
        mix = ", ".join(f"{t} {s:.0%}" for t, s in sorted(share.items(), key=lambda kv: -kv[1]) if s >= 0.001)
        print(f"| {q} | {bits / 8 / 1e9:.2f} | {bits / 8 / 2**30:.2f} | {bits / total:.2f} | {mix} |")
    print(f"| (the report's 4 bits, no block scales) | {total * 4 / 8 / 1e9:.2f} | {total * 4 / 8 / 2**30:.2f} | "
          f"4.00 | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/phi3data-ondevice")
    parser.add_argument("--checkpoint", default=None, help="trained checkpoint or run for the perplexity part")
    parser.add_argument("--ppl-model", default="w256", choices=sorted(PPL_RECIPES),
                        help="recipe of the model trained for the perplexity part (without --checkpoint)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3, help="timed runs per side (the fastest is kept)")
    parser.add_argument("--prompt-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--parts", default="speed,ppl,mini")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        ids = json.loads(Path(args.prompt_file).read_text())
        print(json.dumps(worker(args.worker, args.path, ids, args.gen, args.threads, args.reps)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    t0 = time.time()
    if "speed" in parts:
        speed(work, args)
    if "ppl" in parts:
        perplexity_cost(work, args)
    if "mini" in parts:
        phi3_mini_sizes(work, args)
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
