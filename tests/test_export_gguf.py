"""GGUF export (issue 14 parts 3 and 4): our phi-3 checkpoints as llama.cpp files, loaded back with
llama-cpp-python (logits, embedded tokenizer, quantised greedy output and perplexity, LongRoPE), refused or written
atomically, exported from the CLI, and served back by llama.cpp's server as a `phi3data generate` backend."""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, require_shared, running_llama_server

from phi3data.export.gguf import ExportRefused, export_gguf, tensor_types
from phi3data.model.hf import save_hf, save_native
from phi3data.model.model import Phi3, Phi3Config

ROOT = Path(__file__).resolve().parents[1]
TEXTBOOKS = SHARED / "textbooks" / "openstax.jsonl.gz"
VOCAB_GGUF = SHARED / "tokenizers" / "phi3" / "ggml-vocab-phi-3.gguf"

# Measured on the fixture's model (below; held-out perplexity ~1,000): perplexity ratios to f16 of 1.0006 (q8_0),
# 0.9992 (q4_0), 1.0002 (q4_k_m); next-token argmax agreement with f16 98.6%, 98.8%, 98.5%; greedy continuations
# identical. At this width the tied 32,064 x 64 embedding, most of the weights, stays Q8_0 in every file
# (llama.cpp keeps the output matrix in Q6_K, which falls back to Q8_0 for rows of 64). Bounds: 2% and 95%.
PPL_RATIO_BOUND = {"q8_0": 1.02, "q4_0": 1.02, "q4_k_m": 1.02}
GREEDY_TOKENS = 4  # greedy continuation tokens a 4-bit file must share with the f16 file
TOP1_AGREEMENT = {"q8_0": 0.95, "q4_0": 0.95, "q4_k_m": 0.95}  # next-token argmax agreement with f16, every position


def openstax_texts(first: int, count: int) -> list[str]:
    with gzip.open(require_shared(TEXTBOOKS), "rt", encoding="utf-8") as f:
        lines = f.readlines()
    return [json.loads(line)["text"] for line in lines[first:first + count]]


def phi3_tokenizer():
    from phi3data.tokenization.tokenizers import load_tokenizer

    return load_tokenizer("phi3-mini")


def llama(path: Path, n_ctx: int = 256):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=2, verbose=False)


def llama_logits(path: Path, ids: list[int], n_ctx: int = 256) -> np.ndarray:
    model = llama(path, n_ctx)
    try:
        model.eval(ids)
        return np.array(model.scores[: len(ids)], dtype=np.float32)
    finally:
        model.close()


def torch_logits(model: Phi3, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.tensor([ids]))[0][0].float().numpy()


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    x = logits[:-1].astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    nll = lse - x[np.arange(len(ids) - 1), ids[1:]]
    return float(math.exp(nll.mean()))


def greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    model = llama(path)
    try:
        out = []
        for token in model.generate(prompt, temp=0.0, top_k=1, reset=True):
            out.append(token)
            if len(out) == n:
                break
        return out
    finally:
        model.close()


# --- a trained tiny model (real text, phi-3-mini vocabulary) and its exports, once per module ---


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The ladder's smallest shape (hidden 64, 2 layers, phi-3-mini vocabulary, tied embeddings) trained for 140
    steps of 8 x 64 tokens on OpenStax's first sections (about 35 of them; the held-out text is sections 60-63 of
    the same book). About 1.5 minutes on 2 cores; it learns little more than which tokens are frequent (held-out
    perplexity near 1,000), enough to make quantisation error visible in perplexity and greedy choices."""
    from test_train_trainer import make_token_dir

    from phi3data.training import TrainConfig, Trainer

    base = tmp_path_factory.mktemp("trained")
    tokens = make_token_dir(base / "tokens", max_tokens=120_000)
    cfg = TrainConfig.from_toml(ROOT / "model" / "train-tiny-cpu.toml", {
        "model.hidden_size": 64, "model.intermediate_size": 176, "model.num_hidden_layers": 2,
        "data_path": str(tokens), "out_dir": str(base / "run"), "seq_len": 64, "micro_batch_size": 8,
        "max_steps": 140, "warmup_steps": 10, "lr": 1e-2, "eval_every": 0, "ckpt_every": 140, "log_every": 40})
    Trainer(cfg).train()
    return base / "run"


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(trained, out / f"tiny-{q}.gguf", quant=q).path for q in ("f16", "q8_0", "q4_0", "q4_k_m")}


@pytest.fixture(scope="module")
def trained_model(trained) -> Phi3:
    from phi3data.model.hf import load_hf, resolve_weights

    return load_hf(resolve_weights(trained)).eval()


@pytest.fixture(scope="module")
def held_out_ids() -> list[list[int]]:
    tok = phi3_tokenizer()
    return [[tok.bos_id, *tok.encode_text(text)[:200]] for text in openstax_texts(60, 4)]


# --- the f16 file is our model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_f16_logits_match_pytorch_fp32_on_real_text(exported, trained_model, held_out_ids):
    """llama.cpp running the f16 file gives our model's next-token logits within float16 rounding of the weights."""
    for ids in held_out_ids[:2]:
        ref = torch_logits(trained_model, ids)
        got = llama_logits(exported["f16"], ids)
        assert got.shape == ref.shape
        err = np.abs(got - ref).max()
        assert err < 0.01 * np.abs(ref).max() + 1e-3, f"max |logit diff| {err:.4g} vs max |logit| {np.abs(ref).max()}"
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.98
        assert perplexity(got, ids) == pytest.approx(perplexity(ref, ids), rel=2e-3)


@pytest.mark.slow
def test_quantised_files_follow_f16_greedily_and_cost_little_perplexity(exported, held_out_ids):
    """The 4-bit files (q4_0, q4_k_m) and q8_0 continue real prompts greedily as the f16 file does for the first
    tokens, and their held-out perplexity is within PPL_RATIO_BOUND of f16's."""
    prompts = [ids[:24] for ids in held_out_ids]
    reference = [greedy(exported["f16"], p, GREEDY_TOKENS) for p in prompts]
    f16_logits = [llama_logits(exported["f16"], ids) for ids in held_out_ids]
    f16_ppl = [perplexity(x, ids) for x, ids in zip(f16_logits, held_out_ids)]
    for quant in ("q8_0", "q4_0", "q4_k_m"):
        matches = [greedy(exported[quant], p, GREEDY_TOKENS) == ref for p, ref in zip(prompts, reference)]
        assert sum(matches) >= len(prompts) - 1, f"{quant}: greedy continuations {matches}"
        logits = [llama_logits(exported[quant], ids) for ids in held_out_ids]
        top1 = np.mean([(a.argmax(-1) == b.argmax(-1)).mean() for a, b in zip(logits, f16_logits)])
        assert top1 >= TOP1_AGREEMENT[quant], f"{quant}: next-token argmax agrees with f16 at {top1:.1%}"
        ppl = [perplexity(x, ids) for x, ids in zip(logits, held_out_ids)]
        ratio = float(np.mean(ppl) / np.mean(f16_ppl))
        assert 1 / PPL_RATIO_BOUND[quant] < ratio < PPL_RATIO_BOUND[quant], f"{quant}: perplexity ratio {ratio:.4f}"
    sizes = {q: p.stat().st_size for q, p in exported.items()}
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_k_m"] and sizes["q8_0"] > sizes["q4_0"]


@pytest.mark.slow
def test_embedded_tokenizer_tokenizes_like_ours_and_carries_the_chat_template(exported):
    import gguf

    tok = phi3_tokenizer()
    model = llama(exported["q4_0"])
    try:
        texts = [t[:3000] for t in openstax_texts(0, 2) + openstax_texts(905, 2)]
        texts += ["Grüße aus Köln: 3.14 ≠ π, naïve café — 東京 😀", "  two  spaces\tand\ttabs\n\nnew paragraph "]
        for text in texts:
            assert model.tokenize(text.encode("utf-8"), add_bos=False) == tok.encode_text(text), text[:80]
        chat = "<|user|>\nWhat is 2 + 2?<|end|>\n<|assistant|>\n"
        ids = model.tokenize(chat.encode(), add_bos=False, special=True)
        assert [i for i in ids if i >= 32000] == [32010, 32007, 32001]
        assert model.token_bos() == 1 and model.token_eos() == 32000 and model.n_vocab() == 32064
    finally:
        model.close()
    reader, source = gguf.GGUFReader(exported["f16"]), gguf.GGUFReader(require_shared(VOCAB_GGUF))
    assert reader.fields["tokenizer.chat_template"].contents() == source.fields["tokenizer.chat_template"].contents()
    assert reader.fields["general.architecture"].contents() == "phi3"
    assert reader.fields["phi3.context_length"].contents() == 512
    assert "output.weight" not in tensor_types(exported["f16"])  # tied: llama.cpp reuses token_embd


# --- k-quants, LongRoPE ------------------------------------------------------------------------------------------


def save_random(cfg: Phi3Config, path: Path, seed: int = 0) -> Phi3:
    torch.manual_seed(seed)
    model = Phi3(cfg).eval()
    save_hf(model, path)
    return model


def test_q4_k_m_falls_back_where_rows_do_not_fit_256_and_uses_k_quants_where_they_do(exported, tmp_path):
    """k-quants pack rows in blocks of 256. At the ladder's width (hidden 64) llama.cpp's quantiser falls back:
    Q4_K -> Q5_0 for rows of 64 and Q6_K -> Q8_0 for the tied embedding / output; ffn_down (rows of 176) too. A
    width of 256 gets the real q4_k_m mix: Q4_K, with Q6_K for the output and half of attn_v / ffn_down."""
    tiny = tensor_types(exported["q4_k_m"])
    assert tiny["token_embd.weight"] == "Q8_0" and tiny["blk.0.attn_qkv.weight"] == "Q5_0"
    assert not any(t.endswith("_K") for t in tiny.values())
    cfg = Phi3Config(vocab_size=32064, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=512, original_max_position_embeddings=512)
    model = save_random(cfg, tmp_path / "ckpt")
    types = tensor_types(export_gguf(tmp_path / "ckpt", tmp_path / "w256.gguf", quant="q4_k_m").path)
    assert types["output.weight"] == "Q6_K" and types["blk.1.attn_qkv.weight"] == "Q6_K"  # llama.cpp's more bits
    assert Counter(types.values())["Q4_K"] >= 4 and types["blk.0.ffn_norm.weight"] == "F32"
    ids = [1, *range(500, 540)]
    ref, got = torch_logits(model, ids), llama_logits(tmp_path / "w256.gguf", ids)
    # it runs and stays near: 4-bit random weights give ~15% relative logit error (measured), correlation ~0.99
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.3 and np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.95


def longrope_config() -> Phi3Config:
    half = 8  # head_dim 16
    return Phi3Config(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      original_max_position_embeddings=256, tie_word_embeddings=False,
                      rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(half)],
                                    "long_factor": [1.0 + 2.0 * i for i in range(half)]})


@pytest.mark.slow
def test_longrope_factors_are_exported_and_llama_cpp_matches_within_and_beyond_the_original_context(tmp_path):
    """rope_factors_long/short, the original context and the attention factor are in the file; llama.cpp (which
    picks the long factors when its context exceeds the original one; it pads n_ctx to 256) gives our logits on a
    sequence within the original 256 positions (n_ctx 256: short factors) and one beyond it (n_ctx 512: long)."""
    import gguf

    cfg = longrope_config()
    model = save_random(cfg, tmp_path / "ckpt")
    path = export_gguf(tmp_path / "ckpt", tmp_path / "long.gguf").path
    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    np.testing.assert_allclose(tensors["rope_factors_long.weight"], cfg.rope_scaling["long_factor"], rtol=1e-6)
    np.testing.assert_allclose(tensors["rope_factors_short.weight"], cfg.rope_scaling["short_factor"], rtol=1e-6)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("phi3.")}
    assert fields["phi3.rope.scaling.original_context_length"] == 256 and fields["phi3.context_length"] == 1024
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(256)))
    assert fields["phi3.attention.head_count_kv"] == 2 and "output.weight" in tensors
    g = torch.Generator().manual_seed(1)
    for length, n_ctx in ((200, 256), (400, 512)):
        ids = [1, *torch.randint(100, 30000, (length - 1,), generator=g).tolist()]
        ref, got = torch_logits(model, ids), llama_logits(path, ids, n_ctx=n_ctx)
        assert np.abs(got - ref).max() < 2e-3, (length, n_ctx, np.abs(got - ref).max())


# --- refusals and atomic writes ------------------------------------------------------------------------------


def test_models_llama_cpp_cannot_represent_are_refused_before_anything_is_written(tmp_path):
    small = Phi3Config(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, norm_type="layernorm", linear_bias=True,
                       hidden_act="gegelu", mup_embedding_multiplier=10.0, mup_width_multiplier=8.0,
                       mup_use_scaling=True, max_position_embeddings=128, original_max_position_embeddings=128)
    save_native(Phi3(small), tmp_path / "small")
    wrong_vocab = Phi3Config(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=4, max_position_embeddings=128, original_max_position_embeddings=128)
    save_hf(Phi3(wrong_vocab), tmp_path / "vocab")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExportRefused, match="phi-3-small options.*gegelu.*layernorm.*linear_bias.*muP"):
        export_gguf(tmp_path / "small", out / "a.gguf", quant="q4_k_m")
    with pytest.raises(ExportRefused, match="vocab_size 32000 does not match the tokenizer's 32064"):
        export_gguf(tmp_path / "vocab", out / "b.gguf")
    with pytest.raises(ExportRefused, match="unknown quantisation 'q3'"):
        export_gguf(tmp_path / "vocab", out / "c.gguf", quant="q3")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_gguf(tmp_path / "missing", out / "d.gguf")
    assert list(out.iterdir()) == []


def test_a_failing_quantisation_leaves_no_file_at_output(tmp_path, monkeypatch):
    """The quantiser writes a partial file and fails: OUTPUT keeps its old content, no temp file is left over."""
    import llama_cpp

    cfg = Phi3Config(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=4, max_position_embeddings=128, original_max_position_embeddings=128)
    save_random(cfg, tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.gguf").write_bytes(b"the previous export")

    def failing(src, dst, params):
        Path(dst.decode()).write_bytes(b"GGUF partial")
        return 1

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", failing)
    from phi3data.export.quantize import QuantizeError

    with pytest.raises(QuantizeError, match="could not quantise"):
        export_gguf(tmp_path / "ckpt", out / "new.gguf", quant="q4_0")
    with pytest.raises(QuantizeError):
        export_gguf(tmp_path / "ckpt", out / "old.gguf", quant="q4_k_m")
    assert sorted(p.name for p in out.iterdir()) == ["old.gguf"]
    assert (out / "old.gguf").read_bytes() == b"the previous export"


# --- the command -------------------------------------------------------------------------------------------------


def test_cli_exports_and_reports_path_size_and_quant_or_refuses_with_the_reason(tmp_path):
    from typer.testing import CliRunner

    from phi3data.cli import app

    cfg = Phi3Config(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=4, max_position_embeddings=128, original_max_position_embeddings=128,
                     tie_word_embeddings=True)
    save_random(cfg, tmp_path / "ckpt")
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(app, ["export", "gguf", str(tmp_path / "ckpt"), "--quant", "q8_0", "--output",
                                      str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert str(out) in result.output and "q8_0" in result.output and "MiB" in result.output
    assert set(tensor_types(out).values()) == {"Q8_0", "F32"}
    bad = Phi3Config(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=4, max_position_embeddings=128, original_max_position_embeddings=128)
    save_hf(Phi3(bad), tmp_path / "bad")
    refused = CliRunner().invoke(app, ["export", "gguf", str(tmp_path / "bad"), "--output", str(tmp_path / "x.gguf")])
    assert refused.exit_code == 2 and "error:" in refused.output and "vocab_size 32000" in refused.output
    assert not (tmp_path / "x.gguf").exists()


# --- served back: the exported model as a generation backend (issue 14 part 4) -----------------------------------


@pytest.mark.slow
def test_exported_model_served_by_llama_cpp_answers_phi3data_generate(exported, tmp_path):
    """llama.cpp's OpenAI-compatible server runs the q4_k_m export (its embedded chat template formats the
    messages); `phi3data generate` writes one row per planned request with this model's provenance, and a rerun
    sends nothing. The tiny model's text is gibberish: the round trip is what is tested."""
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from phi3data.cli import app

    alias = "phi3data-tiny-q4_k_m"
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "lesson.j2").write_text("Write a short lesson for {{ audience }} about {{ topic }}.\n",
                                              encoding="utf-8")
    plan = tmp_path / "plan.toml"
    plan.write_text('name = "lessons"\nmodel = "x"\nseed = 1\n\n[sampling]\nmax_tokens = 16\ntemperature = 0.0\n\n'
                    '[styles]\nlesson = "t/lesson.j2"\n\n[audiences]\nkids = "young children"\n'
                    'adults = "adults"\n\n[[seeds]]\nname = "books"\nkind = "outlines"\n'
                    'path = "{data}/textbooks/openstax.jsonl.gz"\ntopic_field = "metadata.source"\n'
                    'styles = ["lesson"]\naudiences = ["kids", "adults"]\nlimit = 2\n', encoding="utf-8")
    out = tmp_path / "out"
    with running_llama_server(tmp_path, model=exported["q4_k_m"], alias=alias, n_ctx=512) as url:
        args = ["generate", str(plan), "--output", str(out), "--base-url", url, "--model", alias,
                "--concurrency", "1", "--no-progress"]
        first = CliRunner().invoke(app, args, terminal_width=200)
        assert first.exit_code == 0, first.output + repr(first.exception)
        rows = pq.read_table(out / "data").to_pylist()
        planned = json.loads((out / "manifest.json").read_text())["requests"]
        assert planned >= 2 and len(rows) == planned
        for row in rows:
            meta = json.loads(row["metadata"])
            assert meta["model"] == alias and meta["plan"] == "lessons" and meta["cell"]["style"] == "lesson"
        again = CliRunner().invoke(app, args, terminal_width=200)
        assert again.exit_code == 0 and f"{planned} answered before, 0 sent now" in again.output
