"""phi-3-small blocksparse attention: the layout, and every CPU path against the dense reference."""

from __future__ import annotations

import pytest
import torch

from phi3data.model import Phi3, Phi3Config
from phi3data.model.attention import (
    blocksparse_attention,
    blocksparse_block_layout,
    blocksparse_token_mask,
    causal_mask,
    reference_attention,
)


def test_layout_phi3_small_pattern() -> None:
    layout = blocksparse_block_layout(n_heads=32, n_blocks=128, local_blocks=16, vert_stride=8, homo_head=False)
    # causal at block level, local window of 16 blocks always present
    assert not layout.triu(1).any()
    for qb in (0, 20, 127):
        for kb in range(max(0, qb - 15), qb + 1):
            assert layout[:, qb, kb].all()
    # vertical stride 8: head 0 keeps blocks 7, 15, 23 ...; each next head is offset by one block
    far = layout[:, 127, :100]
    assert far[0].nonzero().flatten().tolist() == list(range(7, 100, 8))
    assert far[1].nonzero().flatten().tolist() == list(range(6, 100, 8))
    assert far[7].nonzero().flatten().tolist() == list(range(0, 100, 8))
    assert torch.equal(far[8], far[0])
    # at 8192 tokens the pattern does about a third of causal attention's block work
    frac = layout.float().sum() / (32 * 128 * 129 / 2)
    assert 0.30 < frac < 0.36
    homo = blocksparse_block_layout(32, 128, 16, 8, homo_head=True)
    assert torch.equal(homo[0], homo[5])


def test_token_mask_is_causal_and_block_structured() -> None:
    mask = blocksparse_token_mask(4, 100, block_size=8, local_blocks=2, vert_stride=3)
    assert mask.shape == (4, 100, 100)
    assert not (mask & ~causal_mask(100)).any()
    assert mask[:, torch.arange(100), torch.arange(100)].all()  # every token sees itself


@pytest.mark.parametrize("impl", ["sdpa", "flex"])
@pytest.mark.parametrize("shape", [(2, 4, 4, 96, 16), (1, 8, 2, 130, 32)])
def test_fast_paths_match_reference_forward(impl: str, shape: tuple[int, ...]) -> None:
    b, h, hkv, t, d = shape
    torch.manual_seed(0)
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    kw = dict(block_size=16, local_blocks=2, vert_stride=3, homo_head=False)
    ref = blocksparse_attention(q, k, v, d**-0.5, impl="reference", **kw)
    out = blocksparse_attention(q, k, v, d**-0.5, impl=impl, **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    # and it really is sparse: differs from plain causal attention
    dense = reference_attention(q, k, v, causal_mask(t), d**-0.5)
    assert (dense - ref).abs().max() > 1e-2


def test_sdpa_path_backward_matches_reference() -> None:
    torch.manual_seed(0)
    q = torch.randn(1, 4, 80, 16, requires_grad=True)
    k = torch.randn(1, 2, 80, 16, requires_grad=True)
    v = torch.randn(1, 2, 80, 16, requires_grad=True)
    kw = dict(block_size=16, local_blocks=2, vert_stride=2)
    g = torch.randn(1, 4, 80, 16)
    ga = torch.autograd.grad(blocksparse_attention(q, k, v, 0.25, impl="reference", **kw), (q, k, v), g)
    gb = torch.autograd.grad(blocksparse_attention(q, k, v, 0.25, impl="sdpa", **kw), (q, k, v), g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def tiny_small_config(**kw) -> Phi3Config:
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        hidden_act="gegelu",
        gegelu_limit=20.0,
        mup_embedding_multiplier=10.0,
        mup_width_multiplier=8.0,
        mup_attn_multiplier=1.0,
        mup_use_scaling=True,
        blocksparse=True,
        blocksparse_block_size=16,
        blocksparse_num_local_blocks=2,
        blocksparse_vert_stride=4,
        max_position_embeddings=512,
        original_max_position_embeddings=512,
        pad_token_id=0,
    )
    base.update(kw)
    return Phi3Config(**base)


def test_phi3_small_model_options() -> None:
    torch.manual_seed(0)
    cfg = tiny_small_config(blocksparse_impl="reference")
    model = Phi3(cfg).eval()
    assert [layer.self_attn.blocksparse for layer in model.model.layers] == [False, True, False, True]
    assert model.model.layers[0].self_attn.scale == pytest.approx(1 / 8)  # muP: 1/head_dim
    idx = torch.randint(0, 256, (2, 100))
    with torch.no_grad():
        ref, _ = model(idx)
        for impl in ("sdpa", "flex"):
            model.cfg.blocksparse_impl = impl
            torch.testing.assert_close(model(idx)[0], ref, atol=2e-5, rtol=1e-4)
    # muP width multiplier divides the logits
    model.cfg.blocksparse_impl = "reference"
    model.cfg.mup_width_multiplier = 1.0
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], ref * 8.0, atol=1e-4, rtol=1e-5)


def test_gegelu_clamps() -> None:
    from phi3data.model.model import gegelu

    x = torch.tensor([[100.0, 100.0, -3.0, -100.0]])
    out = gegelu(x, limit=20.0)
    # pair 0: gelu input clamped to 20, linear clamped to 20 -> quick_gelu(20) * 21
    assert out[0, 0].item() == pytest.approx(20 * torch.sigmoid(torch.tensor(1.702 * 20)).item() * 21, rel=1e-6)
    # pair 1: linear clamped to -20 -> factor (-20 + 1)
    assert out[0, 1].item() == pytest.approx(-3 * torch.sigmoid(torch.tensor(-3 * 1.702)).item() * -19, rel=1e-5)


def test_phi3_small_trains_on_cpu() -> None:
    torch.manual_seed(0)
    model = Phi3(tiny_small_config(blocksparse_impl="sdpa"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 256, (4, 65))
    losses = []
    for _ in range(25):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
