"""The phi-3 model against transformers' Phi3ForCausalLM (random weights, fp32, no hub access)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Phi3ForCausalLM
from transformers import Phi3Config as HFPhi3Config

from phi3data.model import Phi3, Phi3Config, num_parameters
from phi3data.model.hf import config_to_hf, load_hf, save_hf, save_native

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


def test_config_from_a_recipe_is_strict_and_from_a_checkpoint_lenient(tmp_path) -> None:
    from phi3data.config import ConfigError

    fields = small_config().to_dict() | {"hiden_size": 32}
    with pytest.raises(ConfigError, match=r"x\.toml: unknown field model\.hiden_size \(did you mean model\.hidden_"):
        Phi3Config.from_dict(fields, "x.toml", "model.")
    with pytest.raises(ConfigError, match="not divisible by 5 heads"):
        Phi3Config.from_dict({"hidden_size": 64, "num_attention_heads": 5})
    # a checkpoint written by another version keeps loading: keys this version lacks are kept aside
    torch.manual_seed(0)
    model = Phi3(small_config(num_attention_heads=4, hidden_act="gegelu")).eval()
    save_native(model, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "phi3data_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"retired_option": 3}))
    again = load_hf(tmp_path / "ckpt").eval()
    assert again.cfg.extra == {"retired_option": 3} and again.cfg.hidden_act == "gegelu"
    idx = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(again(idx)[0], model(idx)[0])
    with pytest.raises(ConfigError, match=r"unknown field atn_impl \(did you mean attn_impl\?\)"):
        load_hf(tmp_path / "ckpt", atn_impl="reference")


def test_sizes_ship_with_the_package_and_a_local_model_folder_wins(tmp_path, monkeypatch) -> None:
    from phi3data.model.recipes import ladder_sizes, load_model_config, packaged_sizes

    monkeypatch.chdir(tmp_path)  # no model/ here: the shipped sizes answer
    assert (packaged_sizes() / "phi-3-mini.toml").is_file()
    assert num_parameters(load_model_config("phi-3-mini"))["total"] == 3_821_079_552
    assert load_model_config("phi-3-small").blocksparse
    assert ladder_sizes("model/ladder-cpu.toml") == ladder_sizes("ladder-cpu") == ["s1", "s2", "s3", "s4"]
    assert load_model_config("ladder-cpu:s2").hidden_size == load_model_config("model/ladder-cpu.toml:s2").hidden_size
    assert load_model_config("ladder-gpu:m125", max_position_embeddings=1024).max_position_embeddings == 1024
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "ladder-cpu.toml").write_text("[sizes.s2]\nhidden_size = 32\nnum_attention_heads = 2\n")
    assert load_model_config("ladder-cpu:s2").hidden_size == 32
    with pytest.raises(FileNotFoundError, match="phi-9"):
        load_model_config("phi-9")
    with pytest.raises(FileNotFoundError):
        load_model_config("elsewhere/phi-3-mini.toml")  # a path is a path: no fallback to the shipped file


def test_meta_device_build_initialises_like_a_whole_build() -> None:
    """FSDP builds on the meta device, then materialises and initialises: the same weights from the same seed."""
    for kw in ({"tie_word_embeddings": True, "rope_scaling": LONGROPE, "original_max_position_embeddings": 32},
               {"norm_type": "layernorm", "linear_bias": True}):
        cfg = small_config(num_attention_heads=4, **kw)
        torch.manual_seed(5)
        whole = Phi3(cfg)
        torch.manual_seed(5)
        with torch.device("meta"):
            meta = Phi3(cfg)
        meta.to_empty(device="cpu")
        meta.init_weights()
        assert meta.state_dict().keys() == whole.state_dict().keys()
        for name, tensor in whole.state_dict().items():
            assert torch.equal(meta.state_dict()[name], tensor), name
        assert (meta.lm_head.weight is meta.model.embed_tokens.weight) == cfg.tie_word_embeddings
        idx = torch.randint(0, 512, (1, 40))
        with torch.no_grad():
            assert torch.equal(meta(idx)[0], whole(idx)[0])  # the RoPE buffers were recomputed too


def test_loss_without_grad_skips_the_gradient_work() -> None:
    """Under no_grad (evaluation) the chunked loss computes the loss alone: same value, one lm_head matmul."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = Phi3(small_config(num_attention_heads=4, mup_width_multiplier=2.0))
    model.loss_chunk = 7  # several chunks, the last one partial
    idx = torch.randint(0, 512, (2, 20))
    targets = idx.roll(-1, dims=1)
    targets[0, :5] = -100
    _, with_grad = model(idx, targets)
    assert with_grad.requires_grad
    with torch.no_grad():
        counters = {}
        for fused in (True, False):
            model.fused_loss = fused
            with FlopCounterMode(display=False) as counter:
                _, loss = model(idx, targets)
            counters[fused] = counter.get_total_flops()
            assert not loss.requires_grad
            torch.testing.assert_close(loss, with_grad.detach(), atol=1e-6, rtol=1e-6)
    # the chunked loss did no more matrix work than plain logits + cross-entropy (the gradient path: 3x the head)
    assert counters[True] == counters[False]


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_gradients_equal_plain_cross_entropy(tied: bool) -> None:
    """The chunked lm_head + loss (its gradients computed in the forward pass, in place) gives the same loss and
    the same gradient for every parameter as logits + cross-entropy through autograd: several chunks, the last
    one partial, ignored targets, a muP logit scale."""
    torch.manual_seed(0)
    model = Phi3(small_config(num_attention_heads=4, mup_width_multiplier=2.0, tie_word_embeddings=tied))
    model.loss_chunk = 7
    idx = torch.randint(0, 512, (2, 20))
    targets = idx.roll(-1, dims=1)
    targets[0, :5] = -100
    grads, losses = {}, {}
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        model.fused_loss = fused
        _, loss = model(idx, targets)
        loss.backward()
        losses[fused] = loss.detach()
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(losses[True], losses[False], atol=1e-6, rtol=1e-6)
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-6, rtol=1e-5, msg=name)
