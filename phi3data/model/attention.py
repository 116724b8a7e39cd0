"""Attention paths for the phi-3 model.

Every path takes ``q`` of shape (B, H, T, D) and ``k``/``v`` of shape (B, Hkv, T, D) with ``H % Hkv == 0``
(grouped-query attention) and returns (B, H, T, D).

* :func:`reference_attention` — dense, explicit mask, fp32 softmax: the exact answer every fast path is
  tested against.
* :func:`sdpa_attention` — ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
  kernels), causal with an optional sliding window.
* blocksparse (phi-3-small): 64-token blocks, ``local_blocks`` blocks of local context, plus every
  ``vert_stride``-th block as a "vertical" column; with ``homo_head=False`` each head's vertical columns are
  shifted by one block, so together the heads cover every block. Paths: reference (dense masked),
  FlexAttention (``flex_blocksparse_attention``) and the Triton kernel in ``blocksparse_triton``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

# Masks depend only on shape, pattern and device, and every layer of every forward pass asks for the same one,
# so they are built once and shared (read-only: callers combine them out of place). The cache is small: a
# blocksparse mask is (H, T, T) booleans (2 GiB at 32 heads x 8192 tokens), and evaluation pads each batch to its
# own length, so many lengths come and go; training keeps asking for one.
MASK_CACHE_SIZE = 4


@functools.lru_cache(maxsize=MASK_CACHE_SIZE)
def causal_mask(t: int, sliding_window: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (T, T) mask, True where query i may attend key j (j <= i, and i - j < window if windowed)."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    mask = j <= i
    if sliding_window is not None:
        mask &= j > i - sliding_window
    return mask


def blocksparse_block_layout(
    n_heads: int, n_blocks: int, local_blocks: int = 16, vert_stride: int = 8, homo_head: bool = False
) -> torch.Tensor:
    """Boolean (H, nq_blocks, nk_blocks) layout of the phi-3-small blocksparse pattern.

    Query block ``qb`` sees key block ``kb`` when ``kb <= qb`` and either ``qb - kb < local_blocks`` (local window)
    or ``kb`` is a vertical block for that head: ``(kb + h * step + 1) % vert_stride == 0`` with
    ``step = max(1, vert_stride // n_heads)`` (``step = 0`` when ``homo_head``: all heads share one pattern).
    """
    qb = torch.arange(n_blocks)[None, :, None]
    kb = torch.arange(n_blocks)[None, None, :]
    step = 0 if homo_head else max(1, vert_stride // n_heads)
    head = torch.arange(n_heads)[:, None, None]
    vertical = (kb + head * step + 1) % vert_stride == 0
    return (kb <= qb) & ((qb - kb < local_blocks) | vertical)


@functools.lru_cache(maxsize=MASK_CACHE_SIZE)
def blocksparse_token_mask(
    n_heads: int,
    t: int,
    block_size: int = 64,
    local_blocks: int = 16,
    vert_stride: int = 8,
    homo_head: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean (H, T, T) token mask: the block layout expanded to tokens, intersected with causality."""
    n_blocks = math.ceil(t / block_size)
    layout = blocksparse_block_layout(n_heads, n_blocks, local_blocks, vert_stride, homo_head).to(device)
    blocks = torch.arange(t, device=device) // block_size
    mask = layout[:, blocks][:, :, blocks]
    return mask & causal_mask(t, device=device)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Dense masked attention with an fp32 softmax. ``mask`` is boolean, broadcastable to (B, H, T, T)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention through PyTorch SDPA (flash kernel when there is no explicit mask)."""
    gqa = q.shape[1] != k.shape[1]
    t = q.shape[2]
    if mask is None and (sliding_window is None or sliding_window >= t):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if mask is None:
        mask = causal_mask(t, sliding_window, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


@functools.lru_cache(maxsize=16)
def _flex_block_mask(
    n_heads: int, t: int, block_size: int, local_blocks: int, vert_stride: int, homo_head: bool, device: str
):
    from torch.nn.attention.flex_attention import create_block_mask

    step = 0 if homo_head else max(1, vert_stride // n_heads)

    def mask_mod(b, h, q_idx, kv_idx):
        qb = q_idx // block_size
        kb = kv_idx // block_size
        vertical = (kb + h * step + 1) % vert_stride == 0
        return (kv_idx <= q_idx) & ((qb - kb < local_blocks) | vertical)

    return create_block_mask(mask_mod, None, n_heads, t, t, device=device, BLOCK_SIZE=block_size)


def flex_blocksparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    block_size: int = 64,
    local_blocks: int = 16,
    vert_stride: int = 8,
    homo_head: bool = False,
) -> torch.Tensor:
    """Blocksparse attention through FlexAttention (torch 2.13: forward only on CPU, fwd+bwd on GPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    bm = _flex_block_mask(q.shape[1], q.shape[2], block_size, local_blocks, vert_stride, homo_head, str(q.device))
    return flex_attention(q, k, v, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def blocksparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    block_size: int = 64,
    local_blocks: int = 16,
    vert_stride: int = 8,
    homo_head: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """Dispatch blocksparse attention: ``impl`` is "reference", "sdpa" (dense SDPA with the token mask),
    "flex", "triton", or "auto" (Triton on CUDA, masked SDPA elsewhere)."""
    if impl == "auto":
        impl = "triton" if q.is_cuda else "sdpa"
    if impl == "triton":
        from phi3data.model.blocksparse_triton import blocksparse_attention_triton

        return blocksparse_attention_triton(q, k, v, scale, block_size, local_blocks, vert_stride, homo_head)
    if impl == "flex":
        return flex_blocksparse_attention(q, k, v, scale, block_size, local_blocks, vert_stride, homo_head)
    mask = blocksparse_token_mask(
        q.shape[1], q.shape[2], block_size, local_blocks, vert_stride, homo_head, device=q.device
    )
    if impl == "reference":
        return reference_attention(q, k, v, mask, scale)
    if impl == "sdpa":
        return sdpa_attention(q, k, v, scale, mask=mask)
    raise ValueError(f"unknown blocksparse attention impl {impl!r}: use auto, reference, sdpa, flex or triton")
