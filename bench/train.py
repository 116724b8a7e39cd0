"""Trainer and attention-kernel benchmarks (issue 4). Prints tables; asserts nothing.

    python bench/train.py cpu   # our trainer vs transformers' Phi3ForCausalLM: same config, batch, optimizer
    python bench/train.py gpu   # blocksparse Triton kernel vs dense SDPA (flash); trainer MFU; bf16

CPU: both sides train the same phi-3 config on the same real tokens (OpenStax, Llama-2 SentencePiece) with
AdamW and grad clipping, one after the other in this process; tokens/s is measured after warm-up steps.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phi3data.model import Phi3Config  # noqa: E402
from phi3data.training import TrainConfig, Trainer  # noqa: E402
from phi3data.training.trainer import _param_groups  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def real_tokens(out: Path, max_tokens: int = 400_000) -> Path:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(SHARED / "tokenizers/llama2/tokenizer.model"))
    ids: list[int] = []
    with gzip.open(SHARED / "textbooks/openstax.jsonl.gz", "rt") as f:
        for line in f:
            ids += sp.encode(json.loads(line)["text"]) + [sp.eos_id()]
            if len(ids) >= max_tokens:
                break
    out.mkdir(parents=True, exist_ok=True)
    np.asarray(ids[:max_tokens], dtype="<u2").tofile(out / "tokens.bin")
    (out / "manifest.json").write_text(json.dumps({"dtype": "uint16"}))
    return out


def random_tokens(out: Path, n: int, vocab: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    np.random.default_rng(0).integers(0, vocab, n, dtype=np.uint16).tofile(out / "tokens.bin")
    (out / "manifest.json").write_text(json.dumps({"dtype": "uint16"}))
    return out


# ---------------------------------------------------------------------------------------------------- CPU
CPU_MODEL = dict(
    vocab_size=32064,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=512,
    original_max_position_embeddings=512,
    pad_token_id=0,
    eos_token_id=2,
)


def bench_cpu(args: argparse.Namespace) -> None:
    from transformers import Phi3Config as HFConfig
    from transformers import Phi3ForCausalLM

    from phi3data.model.hf import config_to_hf

    work = Path(args.work)
    data_dir = real_tokens(work / "tokens")
    seq, mb, warm, steps = args.seq_len, args.batch, args.warmup, args.steps
    cfg = TrainConfig(
        model=dict(CPU_MODEL),
        data_path=str(data_dir),
        out_dir=str(work / "ours"),
        seq_len=seq,
        micro_batch_size=mb,
        max_steps=10**6,
        warmup_steps=2,
        eval_every=0,
        ckpt_every=0,
        log_every=10**9,
        resume=False,
        compile=args.compile,
        val_windows=0,
    )
    trainer = Trainer(cfg)

    # transformers, same config / init seed / data order / optimizer / clipping
    torch.manual_seed(cfg.seed)
    hf_cfg = config_to_hf(Phi3Config(**CPU_MODEL))
    hf_cfg.pop("architectures"), hf_cfg.pop("model_type")
    model = Phi3ForCausalLM(HFConfig(**hf_cfg))
    model.config._attn_implementation = "sdpa"
    model.train()
    opt = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay),  # the same decay groups as our trainer
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )
    data = trainer.train_data
    hf_pos = [0]

    def hf_step() -> None:
        x, y = data.batch(hf_pos[0], mb)
        hf_pos[0] += mb
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sides = {
        "phi3data" + (" + torch.compile" if args.compile else ""): trainer.train_step,
        "transformers Phi3ForCausalLM": hf_step,
    }
    for step in sides.values():
        for _ in range(warm):
            step()
    # alternate timed rounds so machine noise hits both sides alike; report the median round
    per_round: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.rounds):
        for name, step in sides.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            per_round[name].append(steps * mb * seq / (time.perf_counter() - t0))
    results = {k: float(np.median(v)) for k, v in per_round.items()}

    base = results["transformers Phi3ForCausalLM"]
    n = sum(p.numel() for p in model.parameters())
    print(
        f"\nCPU training throughput: {n / 1e6:.1f}M-param phi-3 (h={CPU_MODEL['hidden_size']}, "
        f"L={CPU_MODEL['num_hidden_layers']}, vocab {CPU_MODEL['vocab_size']}), batch {mb} x {seq}, AdamW, "
        f"clip 1.0, {torch.get_num_threads()} threads; median of {args.rounds} alternating rounds of {steps} steps"
    )
    print(f"{'trainer':<34}{'tokens/s':>12}{'vs transformers':>18}")
    for name, tps in results.items():
        print(f"{name:<34}{tps:>12,.0f}{tps / base:>17.2f}x")


# ---------------------------------------------------------------------------------------------------- GPU
def bench_kernel(args: argparse.Namespace, rows: list[str]) -> None:
    import triton.testing as tt
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from phi3data.model.attention import blocksparse_attention
    from phi3data.model.blocksparse_triton import blocksparse_attention_triton

    dev = "cuda"
    h, hkv, d = 32, 8, 128  # phi-3-small: 32 query heads, 8 KV heads, head_dim 128
    bs = dict(block_size=64, local_blocks=16, vert_stride=8, homo_head=False)

    # correctness at real size (T=4096), bf16 kernel vs fp32 dense masked reference
    torch.manual_seed(0)
    t = 4096
    q = torch.randn(1, h, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, hkv, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, hkv, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(1, h, t, d, device=dev, dtype=torch.bfloat16)
    sc = d**-0.5
    out = blocksparse_attention_triton(q, k, v, sc, **bs)
    g = torch.autograd.grad(out, (q, k, v), do)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = blocksparse_attention(qf, kf, vf, sc, impl="reference", **bs)
    gr = torch.autograd.grad(ref, (qf, kf, vf), do.float())
    sd = blocksparse_attention(q, k, v, sc, impl="sdpa", **bs)  # bf16 masked SDPA: the yardstick for bf16 error
    gs = torch.autograd.grad(sd, (q, k, v), do)
    rows.append(f"correctness T={t} H={h}/{hkv} D={d} bf16 vs fp32 reference (max abs err; bf16 masked SDPA):")
    for name, a, b, c in (
        ("out", out, ref, sd),
        ("dq", g[0], gr[0], gs[0]),
        ("dk", g[1], gr[1], gs[1]),
        ("dv", g[2], gr[2], gs[2]),
    ):
        rows.append(
            f"  {name}: triton {(a.float() - b).abs().max().item():.3e}   sdpa {(c.float() - b).abs().max().item():.3e}"
            f"   ref max |x| {b.abs().max().item():.2f}"
        )
    del q, k, v, do, out, g, qf, kf, vf, ref, gr, sd, gs
    torch.cuda.empty_cache()

    rows.append("")
    rows.append(
        f"{'seq':>6} {'pass':>8} {'dense flash ms':>15} {'blocksparse ms':>15} {'speedup':>8} "
        f"{'flex ms':>9} {'triton TFLOP/s':>15}"
    )
    from phi3data.model.attention import blocksparse_block_layout

    def one_seq(t: int) -> None:
        b = args.kernel_batch
        q = torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, hkv, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, hkv, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        kr = k.detach().repeat_interleave(h // hkv, 1).requires_grad_()
        vr = v.detach().repeat_interleave(h // hkv, 1).requires_grad_()
        do = torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16)
        nb = t // 64
        frac_blocks = blocksparse_block_layout(h, nb, 16, 8).sum().item()
        flops_fwd = 4 * b * frac_blocks * 64 * 64 * d  # non-empty blocks x 2 matmuls

        def dense_fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=sc)

        def sparse_fwd():
            return blocksparse_attention_triton(q, k, v, sc, **bs)

        flex = None
        try:
            from torch.nn.attention.flex_attention import flex_attention

            from phi3data.model.attention import _flex_block_mask

            bm = _flex_block_mask(h, t, 64, 16, 8, False, str(q.device))
            flex_c = torch.compile(flex_attention)

            def flex():
                return flex_c(q, k, v, block_mask=bm, scale=sc, enable_gqa=True)

            flex()
        except Exception as e:  # noqa: BLE001
            rows.append(f"  (flex attention unavailable: {type(e).__name__}: {str(e)[:120]})")
            flex = None

        for pass_ in ("fwd", "fwd+bwd"):
            if pass_ == "fwd":
                fd, fs, ff = dense_fwd, sparse_fwd, flex
                fl = flops_fwd
            else:

                def fd():
                    torch.autograd.grad(dense_fwd(), (q, kr, vr), do)

                def fs():
                    torch.autograd.grad(sparse_fwd(), (q, k, v), do)

                ff = (lambda: torch.autograd.grad(flex(), (q, k, v), do)) if flex else None
                fl = flops_fwd * 3.5  # bwd = 2.5x fwd matmul work (recomputes QK^T)
            ms_d = tt.do_bench(fd, warmup=25, rep=100)
            ms_s = tt.do_bench(fs, warmup=25, rep=100)
            ms_f = tt.do_bench(ff, warmup=25, rep=100) if ff else float("nan")
            rows.append(
                f"{t:>6} {pass_:>8} {ms_d:>15.3f} {ms_s:>15.3f} {ms_d / ms_s:>7.2f}x {ms_f:>9.3f} "
                f"{fl / ms_s / 1e9:>15.1f}"
            )

    for t in args.seqs:
        one_seq(t)
        torch.cuda.empty_cache()
    rows.append(
        f"(batch {args.kernel_batch}, phi-3-small heads {h}/{hkv}, head_dim {d}, bf16; block work at 8192 = "
        f"{blocksparse_block_layout(h, 128, 16, 8).sum().item() / (h * 128 * 129 / 2):.1%} of causal)"
    )


def bench_mfu(args: argparse.Namespace, rows: list[str]) -> None:
    work = Path(args.work)
    data = random_tokens(work / "rand", 20_000_000, 32064)
    rows.append("")
    rows.append(f"{'model':<18}{'params':>10}{'batch':>12}{'compile':>9}{'tokens/s':>12}{'MFU':>8}")
    for ref, mb in args.mfu_models:
        for compile_ in (True,):
            cfg = TrainConfig(
                model=ref,
                data_path=str(data),
                out_dir=str(work / f"mfu-{ref}"),
                seq_len=2048,
                micro_batch_size=mb,
                max_steps=10**6,
                warmup_steps=10,
                eval_every=0,
                ckpt_every=0,
                log_every=10**9,
                resume=False,
                compile=compile_,
                val_windows=0,
            )
            tr = Trainer(cfg)
            for _ in range(args.mfu_warmup):
                tr.train_step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.mfu_steps):
                rec = tr.train_step()
            torch.cuda.synchronize()
            tps = args.mfu_steps * mb * 2048 / (time.perf_counter() - t0)
            mfu = tr.flops_per_token * tps / tr.peak
            n = tr.model.num_parameters()
            rows.append(
                f"{ref:<18}{n / 1e6:>9.0f}M{f'{mb}x2048':>12}{str(compile_):>9}{tps:>12,.0f}{mfu:>8.1%}"
                f"   loss {rec['loss']:.3f}"
            )
            print(rows[-1], flush=True)
            del tr
            torch.cuda.empty_cache()
    rows.append("(MFU = (6 N + 6 L h T) tokens/s / 989 TFLOP/s dense bf16; N = params without input embedding)")


def bench_gpu(args: argparse.Namespace) -> None:
    rows = [
        f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | "
        f"triton {__import__('triton').__version__}"
    ]
    try:
        if "kernel" in args.parts:
            bench_kernel(args, rows)
            print("\n".join(rows), flush=True)
        if "mfu" in args.parts:
            bench_mfu(args, rows)
    finally:
        text = "\n".join(rows)
        print("\n" + text, flush=True)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "bench_train_gpu.txt").write_text(text + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["cpu", "gpu"])
    p.add_argument("--work", default=str(ROOT / "bench" / "out" / "train"))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--compile", action="store_true", help="time our trainer with torch.compile")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--parts", nargs="+", default=["kernel", "mfu"])
    p.add_argument("--seqs", nargs="+", type=int, default=[8192, 16384])
    p.add_argument("--kernel-batch", type=int, default=2)
    p.add_argument("--mfu-steps", type=int, default=20)
    p.add_argument("--mfu-warmup", type=int, default=8)
    p.add_argument("--mfu-models", nargs="+", default=["ladder-gpu:m125:16", "ladder-gpu:m350:8"])
    args = p.parse_args()
    args.mfu_models = [(m.rsplit(":", 1)[0], int(m.rsplit(":", 1)[1])) for m in args.mfu_models]
    bench_cpu(args) if args.mode == "cpu" else bench_gpu(args)


if __name__ == "__main__":
    main()
