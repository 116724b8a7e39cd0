"""The phi-3 model against transformers' Phi3ForCausalLM (random weights, fp32, no hub access)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Phi3ForCausalLM
from transformers import Phi3Config as HFPhi3Config

from phi3data.model import Phi3, Phi3Config, num_parameters
from phi3data.model.hf import config_to_hf, load_hf, save_hf

LONGROPE = {
    "type": "longrope",
    "short_factor": [1.0 + 0.05 * i for i in range(8)],
    "long_factor": [1.5 + 0.3 * i for i in range(8)],
}

CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=128),
    "longrope": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_scaling=LONGROPE,
        max_position_embeddings=256,
        original_max_position_embeddings=32,
    ),
    "sliding_window": dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=9),
    "tied": dict(num_attention_heads=4, tie_word_embeddings=True, rope_theta=500000.0),
}


def small_config(**kw) -> Phi3Config:
    base = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        max_position_embeddings=256,
        original_max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )
    base.update(kw)
    return Phi3Config(**base)


def hf_twin(model: Phi3) -> Phi3ForCausalLM:
    d = config_to_hf(model.cfg)
    d.pop("architectures")
    d.pop("model_type")
    hf = Phi3ForCausalLM(HFPhi3Config(**d)).eval()
    hf.load_state_dict(model.state_dict(), strict=not model.cfg.tie_word_embeddings)
    return hf


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("attn_impl", ["sdpa", "reference"])
def test_logits_match_transformers(name: str, attn_impl: str) -> None:
    torch.manual_seed(0)
    model = Phi3(small_config(attn_impl=attn_impl, **CONFIGS[name])).eval()
    hf = hf_twin(model)
    lengths = (17, 70) if name == "longrope" else (23,)  # 70 > original_max 32: the long factors
    for t in lengths:
        idx = torch.randint(0, 512, (2, t))
        with torch.no_grad():
            ours, _ = model(idx)
            theirs = hf(idx).logits
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_longrope_short_and_long_factors_differ() -> None:
    torch.manual_seed(0)
    model = Phi3(small_config(**CONFIGS["longrope"])).eval()
    idx = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        short, _ = model(idx[:, :32])
        long, _ = model(idx)
    # switching to the long factors for a 40-token input changes even the first positions' logits
    assert (short - long[:, :32]).abs().max() > 1e-3


def test_sliding_window_changes_output() -> None:
    torch.manual_seed(0)
    a = Phi3(small_config(num_attention_heads=4)).eval()
    b = Phi3(small_config(num_attention_heads=4, sliding_window=5)).eval()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        la, lb = a(idx)[0], b(idx)[0]
    torch.testing.assert_close(la[:, :5], lb[:, :5], atol=1e-6, rtol=0)
    assert (la[:, 6:] - lb[:, 6:]).abs().max() > 1e-4


def test_saved_checkpoint_loads_in_transformers_and_generates(tmp_path) -> None:
    torch.manual_seed(0)
    model = Phi3(
        small_config(
            num_attention_heads=8,
            num_key_value_heads=2,
            rope_scaling=LONGROPE,
            hidden_size=128,
            max_position_embeddings=256,
            original_max_position_embeddings=32,
        )
    ).eval()
    save_hf(model, tmp_path / "ckpt")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(hf).__name__ == "Phi3ForCausalLM"
    idx = torch.randint(3, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)
        out = hf.generate(idx, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 20)
    # greedy continuation equals our own argmax decoding
    seq = idx
    with torch.no_grad():
        for _ in range(8):
            nxt = model(seq)[0][:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(seq, out)
    # and loads back into ours bit for bit
    again = load_hf(tmp_path / "ckpt").eval()
    with torch.no_grad():
        assert torch.equal(again(idx)[0], model(idx)[0])


def test_transformers_checkpoint_loads_into_ours(tmp_path) -> None:
    torch.manual_seed(1)
    cfg = HFPhi3Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=2,
    )
    hf = Phi3ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    assert ours.cfg.num_key_value_heads == 2
    idx = torch.randint(0, 300, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_count_formula(name: str) -> None:
    cfg = small_config(**CONFIGS[name])
    model = Phi3(cfg)
    n = num_parameters(cfg)
    assert n["total"] == model.num_parameters()
    assert n["non_embedding"] == model.num_parameters(non_embedding=True)
    assert n["total"] == sum(p.numel() for p in hf_twin(model).parameters())


def test_layernorm_and_bias_options_count_and_work() -> None:
    """phi-3-small's LayerNorm-with-bias and projection biases: counted by the formula, and live in the forward."""
    cfg = small_config(norm_type="layernorm", linear_bias=True, num_attention_heads=4, num_key_value_heads=2)
    model = Phi3(cfg).eval()
    n = num_parameters(cfg)
    assert n["total"] == model.num_parameters() and n["non_embedding"] == model.num_parameters(non_embedding=True)
    plain = num_parameters(small_config(num_attention_heads=4, num_key_value_heads=2))
    assert n["total"] > plain["total"]
    assert isinstance(model.model.norm, torch.nn.LayerNorm) and model.model.layers[0].mlp.down_proj.bias is not None
    idx = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        before = model(idx)[0]
        model.model.layers[1].self_attn.o_proj.bias.fill_(0.5)
        model.model.norm.bias.fill_(0.1)
        assert not torch.allclose(model(idx)[0], before)
    assert not cfg.hf_compatible
    with pytest.raises(ValueError, match="norm_type"):
        small_config(norm_type="batchnorm")


def test_phi3_small_options_refuse_hf_export(tmp_path) -> None:
    model = Phi3(small_config(hidden_act="gegelu", mup_use_scaling=True, blocksparse=True))
    with pytest.raises(ValueError, match="phi-3-small"):
        save_hf(model, tmp_path / "x")
