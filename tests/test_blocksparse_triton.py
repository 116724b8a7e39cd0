"""The Triton blocksparse kernel (forward + backward) against the dense reference, under TRITON_INTERPRET=1.

The interpreter must be switched on before triton is imported, so each check runs in a fresh subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

KERNEL_CHECK = textwrap.dedent("""
    import os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    from phi3data.model.attention import blocksparse_attention
    from phi3data.model.blocksparse_triton import blocksparse_attention_triton
    torch.manual_seed(0)
    # (B, H, Hkv, T, D, block, local, vert_stride, homo_head)
    cases = [
        (2, 4, 2, 100, 16, 16, 2, 2, False),   # GQA 2:1, T not a multiple of the block
        (1, 8, 2, 128, 32, 16, 3, 4, False),   # GQA 4:1 (phi-3-small ratio)
        (1, 2, 2, 96, 16, 16, 16, 8, True),    # homo-head pattern, local window covers everything
        (1, 4, 4, 64, 16, 32, 1, 2, False),    # 32-token blocks
    ]
    for b, h, hkv, t, d, blk, loc, vs, homo in cases:
        q = torch.randn(b, h, t, d, requires_grad=True)
        k = torch.randn(b, hkv, t, d, requires_grad=True)
        v = torch.randn(b, hkv, t, d, requires_grad=True)
        do = torch.randn(b, h, t, d)
        scale = d ** -0.5
        out = blocksparse_attention_triton(q, k, v, scale, blk, loc, vs, homo)
        grads = torch.autograd.grad(out, (q, k, v), do)
        ref = blocksparse_attention(q, k, v, scale, blk, loc, vs, homo, impl="reference")
        ref_grads = torch.autograd.grad(ref, (q, k, v), do)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for name, a, r in zip("qkv", grads, ref_grads):
            torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")
        print("ok", (b, h, hkv, t, d, blk, loc, vs, homo), flush=True)
""")

MODEL_CHECK = textwrap.dedent("""
    import torch
    from phi3data.model import Phi3, Phi3Config
    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=1, hidden_act="gegelu", mup_use_scaling=True,
                     mup_embedding_multiplier=10.0, mup_width_multiplier=8.0, blocksparse=True,
                     blocksparse_block_size=16, blocksparse_num_local_blocks=2, blocksparse_vert_stride=2,
                     blocksparse_impl="triton", pad_token_id=0)
    model = Phi3(cfg)
    idx = torch.randint(0, 128, (2, 81))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    g_triton = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.cfg.blocksparse_impl = "reference"
    _, ref_loss = model(idx[:, :-1], idx[:, 1:])
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5, (loss.item(), ref_loss.item())
    for a, p in zip(g_triton, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)
    print("model ok", loss.item(), flush=True)
""")


def _run_interpreted(code: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"kernel check failed:\\n{proc.stdout}\\n{proc.stderr}"
    return proc.stdout


def test_triton_kernel_matches_reference_fwd_bwd() -> None:
    out = _run_interpreted(KERNEL_CHECK)
    assert out.count("ok") == 4


def test_triton_kernel_inside_phi3_small_model() -> None:
    out = _run_interpreted(MODEL_CHECK)
    assert "model ok" in out
