"""A Triton blocksparse attention kernel (forward and backward) for phi-3-small's attention pattern.

The pattern is described per head by a block layout (see ``attention.blocksparse_block_layout``); the kernel
receives it as look-up tables:

* ``lut[h, qb, :cnt[h, qb]]`` — the key blocks query block ``qb`` of head ``h`` attends to, ascending, so the
  diagonal block (the only one needing the causal mask) comes last;
* ``lut_t[h, kb, :cnt_t[h, kb]]`` — the query blocks that attend to key block ``kb`` (for dK / dV).

Work scales with the number of non-empty blocks: at 8192 tokens, 16 local blocks and vertical stride 8, that is
about a third of causal attention. Kernel tile = layout block (64 tokens for phi-3-small). Flash-attention style:
online softmax in fp32, log-sum-exp kept for the backward pass, which recomputes the probabilities.

On CPU the kernel runs under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from phi3data.model.attention import blocksparse_block_layout

LOG2E = 1.4426950408889634


@functools.lru_cache(maxsize=32)
def _luts(n_heads: int, n_blocks: int, local_blocks: int, vert_stride: int, homo_head: bool, device: str):
    layout = blocksparse_block_layout(n_heads, n_blocks, local_blocks, vert_stride, homo_head)

    def pack(lay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cnt = lay.sum(-1).to(torch.int32)
        order = torch.where(lay, torch.arange(n_blocks), n_blocks).sort(dim=-1).values
        lut = order[..., : int(cnt.max())].to(torch.int32)
        return lut.contiguous().to(device), cnt.contiguous().to(device)

    lut, cnt = pack(layout)
    lut_t, cnt_t = pack(layout.transpose(1, 2))
    return lut, cnt, lut_t, cnt_t


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    O,  # noqa: E741
    LSE,
    LUT,
    CNT,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    sob,
    soh,
    sot,
    H,
    G,
    T,
    NB,
    MAXN,
    qk_scale,
    BLOCK: tl.constexpr,
    D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_n0 = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < T
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * skb + hk * skh
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, D], dtype=tl.float32)
    n = tl.load(CNT + h * NB + pid_m)
    lut_row = LUT + (h * NB + pid_m) * MAXN
    # off-diagonal blocks: full, no mask
    for i in range(0, n - 1):
        kb = tl.load(lut_row + i)
        offs_n = kb * BLOCK + offs_n0
        k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :])
        v = tl.load(v_base + offs_n[:, None] * skt + offs_d[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    # diagonal block: causal mask (also masks keys past the end of the sequence)
    offs_n = pid_m * BLOCK + offs_n0
    col_ok = offs_n < T
    k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_base + offs_n[:, None] * skt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(
        O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
        acc.to(O.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(LSE + bh * T + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    LUT,
    CNT,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    H,
    G,
    T,
    NB,
    MAXN,
    qk_scale,
    sm_scale,
    BLOCK: tl.constexpr,
    D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_n0 = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < T
    q_ptrs = b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :]
    q = tl.load(Q + q_ptrs, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_ptrs, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * skb + hk * skh
    dq = tl.zeros([BLOCK, D], dtype=tl.float32)
    n = tl.load(CNT + h * NB + pid_m)
    lut_row = LUT + (h * NB + pid_m) * MAXN
    for i in range(0, n):
        kb = tl.load(lut_row + i)
        offs_n = kb * BLOCK + offs_n0
        col_ok = offs_n < T
        k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * skt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        ok = (offs_m[:, None] >= offs_n[None, :]) & row_ok[:, None]
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + q_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    LUT_T,
    CNT_T,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    H,
    HKV,
    G,
    T,
    NB,
    MAXN,
    qk_scale,
    sm_scale,
    BLOCK: tl.constexpr,
    D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_m0 = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < T
    kv_ptrs = b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :]
    k = tl.load(K + kv_ptrs, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + kv_ptrs, mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK, D], dtype=tl.float32)
    for g in range(0, G):
        h = hk * G + g
        bh = b * H + h
        n = tl.load(CNT_T + h * NB + pid_n)
        lut_row = LUT_T + (h * NB + pid_n) * MAXN
        for i in range(0, n):
            qb = tl.load(lut_row + i)
            offs_m = qb * BLOCK + offs_m0
            row_ok = offs_m < T
            q_ptrs = b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :]
            q = tl.load(Q + q_ptrs, mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + q_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh * T + offs_m, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            ok = (offs_m[:, None] >= offs_n[None, :]) & row_ok[:, None]
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    tl.store(DK + kv_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


# (num_warps, num_stages) per kernel; tuned on an H100 for block 64, head_dim 128 (docs/benchmarks_training.md)
LAUNCH = {"fwd": (4, 2), "dq": (4, 2), "dkdv": (4, 2)}


def _launch_opts(kernel: str) -> dict[str, int]:
    if not torch.cuda.is_available():
        return {}
    warps, stages = LAUNCH[kernel]
    return {"num_warps": warps, "num_stages": stages}


class _BlocksparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, block, local_blocks, vert_stride, homo_head):
        b, h, t, d = q.shape
        hkv = k.shape[1]
        if d not in (16, 32, 64, 128, 256):
            raise ValueError(f"blocksparse triton kernel needs head_dim in 16..256 (power of 2), got {d}")
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        nb = math.ceil(t / block)
        lut, cnt, lut_t, cnt_t = _luts(h, nb, local_blocks, vert_stride, homo_head, str(q.device))
        o = torch.empty_like(q)
        lse = torch.empty((b, h, t), device=q.device, dtype=torch.float32)
        _fwd_kernel[(nb, b * h)](
            q,
            k,
            v,
            o,
            lse,
            lut,
            cnt,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            o.stride(0),
            o.stride(1),
            o.stride(2),
            h,
            h // hkv,
            t,
            nb,
            lut.shape[-1],
            scale * LOG2E,
            BLOCK=block,
            D=d,
            **_launch_opts("fwd"),
        )
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.cfg = (scale, block, local_blocks, vert_stride, homo_head)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        scale, block, local_blocks, vert_stride, homo_head = ctx.cfg
        b, h, t, d = q.shape
        hkv = k.shape[1]
        nb = math.ceil(t / block)
        lut, cnt, lut_t, cnt_t = _luts(h, nb, local_blocks, vert_stride, homo_head, str(q.device))
        do = do.contiguous()
        delta = (o.float() * do.float()).sum(-1)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _bwd_dq_kernel[(nb, b * h)](
            q,
            k,
            v,
            do,
            dq,
            lse,
            delta,
            lut,
            cnt,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            h,
            h // hkv,
            t,
            nb,
            lut.shape[-1],
            scale * LOG2E,
            scale,
            BLOCK=block,
            D=d,
            **_launch_opts("dq"),
        )
        _bwd_dkdv_kernel[(nb, b * hkv)](
            q,
            k,
            v,
            do,
            dk,
            dv,
            lse,
            delta,
            lut_t,
            cnt_t,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            h,
            hkv,
            h // hkv,
            t,
            nb,
            lut_t.shape[-1],
            scale * LOG2E,
            scale,
            BLOCK=block,
            D=d,
            **_launch_opts("dkdv"),
        )
        return dq, dk, dv, None, None, None, None, None


def blocksparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    block_size: int = 64,
    local_blocks: int = 16,
    vert_stride: int = 8,
    homo_head: bool = False,
) -> torch.Tensor:
    """phi-3-small blocksparse causal attention. q: (B, H, T, D); k, v: (B, Hkv, T, D). Differentiable."""
    return _BlocksparseAttention.apply(q, k, v, scale, block_size, local_blocks, vert_stride, homo_head)
