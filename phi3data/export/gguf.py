"""Export a phi-3 checkpoint to GGUF, the file llama.cpp runs (architecture ``phi3`` as llama.cpp names it).

The layout follows llama.cpp's own converter for ``Phi3ForCausalLM`` (``convert_hf_to_gguf.py``) and its ``phi3``
loader: fused ``attn_qkv`` and fused ``ffn_up`` (gate then up, split by llama.cpp's SwiGLU), RMSNorm weights in
f32, NeoX-style RoPE (no q/k permutation), LongRoPE's ``rope_factors_long`` / ``rope_factors_short`` plus the
original context length and attention factor. With tied embeddings no ``output`` tensor is written: llama.cpp's
phi3 loader reuses ``token_embd`` when ``output`` is absent.

The vocabulary is phi-3-mini's (32,064 SentencePiece pieces with the chat tokens and the chat template), copied
from a vocabulary GGUF (default: the shared ``tokenizers/phi3/ggml-vocab-phi-3.gguf``).

Quantisations: ``f16`` is written directly (2-D weights f16, norms and rope factors f32); ``q8_0``, ``q4_0`` and
``q4_k_m`` are made by llama.cpp's own quantiser from a temporary f16 file (:mod:`phi3data.export.quantize`), so
they are the files ``llama-quantize`` would make, with its choice of higher-precision tensors and its fallbacks
for rows that are not a multiple of a k-quant's 256-value block (at the CPU ladder's widths, 64 to 192, most
``q4_k_m`` tensors fall back to Q5_0).

Known differences in llama.cpp, not the export's: its phi3 ignores ``sliding_window`` (written as metadata, as
llama.cpp's converter does; phi-3-mini's 2047-token window is not applied past 2047 tokens), and it picks the long
or short LongRoPE factors by its context size (``n_ctx`` > the original context, padded up to 256), not by the
sequence length as transformers and our model do.

Everything that can be checked is checked before a byte is written; the file is written under a temporary name
in the output's directory and renamed into place, so OUTPUT is either the whole file or absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phi3data.export.quantize import FTYPES

QUANTS = ("f16", *FTYPES)
ARCH = "phi3"


class ExportRefused(ValueError):
    """The checkpoint cannot be exported as asked (a user error: the message says why)."""


@dataclass
class ExportResult:
    path: Path
    quant: str
    size_bytes: int
    n_tensors: int


def default_vocab_gguf() -> Path:
    from phi3data.paths import tokenizers_dir

    return tokenizers_dir() / "phi3" / "ggml-vocab-phi-3.gguf"


def read_vocab(path: str | Path | None = None) -> dict[str, tuple[Any, Any, Any]]:
    """The ``tokenizer.*`` fields of a vocabulary GGUF: name -> (value, value type, array item type or None)."""
    import gguf

    path = Path(path) if path is not None else default_vocab_gguf()
    if not path.exists():
        raise FileNotFoundError(f"tokenizer GGUF {path} not found (phi-3-mini's is shared/data/tokenizers/phi3/"
                                f"ggml-vocab-phi-3.gguf; set PHI3DATA_TOKENIZERS or pass tokenizer=)")
    reader = gguf.GGUFReader(path)
    fields = {}
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        fields[name] = (field.contents(), vtype, sub)
    if "tokenizer.ggml.tokens" not in fields:
        raise ExportRefused(f"{path} holds no tokenizer.ggml.tokens: not a vocabulary GGUF")
    return fields


def check_exportable(cfg, vocab_size: int) -> None:
    """Raise :class:`ExportRefused` with the reason when llama.cpp's phi3 cannot represent ``cfg``."""
    reasons = []
    if not cfg.hf_compatible:
        options = [name for name, on in (
            ("hidden_act=gegelu", cfg.hidden_act != "silu"), ("norm_type=layernorm", cfg.norm_type != "rmsnorm"),
            ("linear_bias", cfg.linear_bias), ("blocksparse attention", cfg.blocksparse),
            ("muP multipliers", cfg.mup_use_scaling or cfg.mup_embedding_multiplier != 1.0
             or cfg.mup_width_multiplier != 1.0)) if on]
        reasons.append(f"it uses phi-3-small options llama.cpp's phi3 does not implement ({', '.join(options)})")
    if cfg.vocab_size != vocab_size:
        reasons.append(f"its vocab_size {cfg.vocab_size} does not match the tokenizer's {vocab_size} tokens")
    if cfg.rope_scaling is not None and cfg.max_position_embeddings <= cfg.original_max_position_embeddings:
        reasons.append("LongRoPE needs max_position_embeddings > original_max_position_embeddings "
                       "(llama.cpp picks the long factors only for a context beyond the original one)")
    if cfg.head_dim % 2:
        reasons.append(f"head_dim {cfg.head_dim} is odd (RoPE rotates pairs)")
    if reasons:
        raise ExportRefused(f"cannot export {cfg.name!r} to GGUF: " + "; ".join(reasons))


def _attention_factor(cfg) -> float:
    from phi3data.model.model import Rotary

    return float(Rotary(cfg).scaling)


def _tensors(model) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, array) for every tensor, in llama.cpp's order: float16 matrices, float32 vectors."""
    import gguf
    import torch

    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    sd = model.state_dict()

    def arr(t: torch.Tensor) -> np.ndarray:
        a = t.detach().to(torch.float32).cpu().numpy()
        return a.astype(np.float16) if a.ndim == 2 else a

    out = [(names[T.TOKEN_EMBD] + ".weight", arr(sd["model.embed_tokens.weight"]))]
    cfg = model.cfg
    if cfg.rope_scaling is not None:
        for kind, key in ((T.ROPE_FACTORS_LONG, "long_factor"), (T.ROPE_FACTORS_SHORT, "short_factor")):
            out.append((names[kind] + ".weight", np.asarray(cfg.rope_scaling[key], dtype=np.float32)))
    per_layer = ((T.ATTN_NORM, "input_layernorm"), (T.ATTN_QKV, "self_attn.qkv_proj"),
                 (T.ATTN_OUT, "self_attn.o_proj"), (T.FFN_NORM, "post_attention_layernorm"),
                 (T.FFN_UP, "mlp.gate_up_proj"), (T.FFN_DOWN, "mlp.down_proj"))
    for i in range(cfg.num_hidden_layers):
        for kind, ours in per_layer:
            out.append((names[kind].format(bid=i) + ".weight", arr(sd[f"model.layers.{i}.{ours}.weight"])))
    out.append((names[T.OUTPUT_NORM] + ".weight", arr(sd["model.norm.weight"])))
    if not cfg.tie_word_embeddings:
        out.append((names[T.OUTPUT] + ".weight", arr(sd["lm_head.weight"])))
    known = {names[t].format(bid=i) for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.PHI3]
             for i in range(cfg.num_hidden_layers)}
    unknown = [n for n, _ in out if n.removesuffix(".weight") not in known]
    assert not unknown, f"tensor names outside llama.cpp's phi3 architecture: {unknown}"
    return out


def write_f16(model, path: Path, vocab: dict[str, tuple[Any, Any, Any]], name: str | None = None) -> int:
    """Write ``model`` as an f16 GGUF at ``path`` (overwritten); returns the number of tensors."""
    import gguf

    cfg = model.cfg
    writer = gguf.GGUFWriter(path, ARCH)
    try:
        writer.add_name(name or cfg.name)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        # 0 = no sliding window, as llama.cpp's converter writes it (llama.cpp's phi3 ignores a window anyway)
        writer.add_sliding_window(cfg.sliding_window or 0)
        if cfg.rope_scaling is not None:
            writer.add_rope_scaling_attn_factors(_attention_factor(cfg))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, (value, vtype, sub) in vocab.items():
            writer.add_key_value(key, value, vtype, sub_type=sub)
        tensors = _tensors(model)
        for tensor_name, array in tensors:
            writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return len(tensors)


def export_gguf(
    checkpoint_dir: str | Path,
    output: str | Path,
    quant: str = "f16",
    tokenizer: str | Path | None = None,
    threads: int | None = None,
    name: str | None = None,
) -> ExportResult:
    """Export a phi-3 checkpoint (HF directory, trainer checkpoint, or run directory) as one GGUF file.

    ``quant``: ``f16``, ``q8_0``, ``q4_0`` or ``q4_k_m``. ``tokenizer``: a vocabulary GGUF to copy the
    ``tokenizer.*`` fields from (default phi-3-mini's). Refuses (:class:`ExportRefused`) before writing anything
    when llama.cpp cannot represent the model; writes atomically (never a partial file under ``output``).
    """
    from phi3data.export.quantize import quantize_gguf, require_quantiser
    from phi3data.io.writers import commit, tmp_path_for
    from phi3data.model.hf import load_config, load_hf, resolve_weights

    if quant not in QUANTS:
        raise ExportRefused(f"unknown quantisation {quant!r}: choose one of {', '.join(QUANTS)}")
    output = Path(output)
    if output.is_dir():
        raise IsADirectoryError(f"output {output} is a directory: give a file name such as {output / 'model.gguf'}")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"output directory {output.parent} does not exist")
    if quant != "f16":
        require_quantiser()  # fail now, before the f16 pass, when the quantiser is missing
    ckpt = resolve_weights(checkpoint_dir)
    vocab = read_vocab(tokenizer)
    vocab_size = len(vocab["tokenizer.ggml.tokens"][0])
    check_exportable(load_config(ckpt), vocab_size)  # before loading the weights (a phi-3-small model may be large)
    model = load_hf(ckpt)

    tmp = tmp_path_for(output)  # temp names the runner's stale-file cleanup knows
    f16_tmp: Path | None = None
    try:
        if quant == "f16":
            n = write_f16(model, tmp, vocab, name)
        else:
            f16_tmp = tmp_path_for(output.with_name(output.name + ".f16"))
            n = write_f16(model, f16_tmp, vocab, name)
            del model
            quantize_gguf(f16_tmp, tmp, quant, threads)
        commit(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if f16_tmp is not None:
            f16_tmp.unlink(missing_ok=True)
    return ExportResult(path=output, quant=quant, size_bytes=output.stat().st_size, n_tensors=n)


def tensor_types(path: str | Path) -> dict[str, str]:
    """GGUF tensor name -> its ggml type name (``F16``, ``Q4_K``, ``Q5_0`` ...), read back from the file."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
