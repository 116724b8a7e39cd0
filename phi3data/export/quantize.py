"""llama.cpp's own quantiser, called through llama-cpp-python's C API (``llama_model_quantize``).

It turns an f16 GGUF into a quantised one exactly as ``llama-quantize`` would, including llama.cpp's choice of
which tensors stay in higher precision (for ``q4_k_m``: ``output`` in Q6_K, half of ``attn_v`` / ``ffn_down`` in
Q6_K) and its fallbacks for tensors whose rows do not fit a type's block size (k-quants need rows that are a
multiple of 256: a Q4_K tensor whose row is not falls back to Q5_0, Q6_K to Q8_0; see :data:`K_QUANT_FALLBACK`).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

# quant name -> llama.cpp's LLAMA_FTYPE_MOSTLY_* name; f16 is written directly and never goes through the quantiser
FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}

# llama.cpp's substitutes for a k-quant tensor whose row length is not a multiple of 256 (QK_K)
K_QUANT_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


class QuantizeError(RuntimeError):
    """llama.cpp's quantiser failed (its own log says why)."""


def require_quantiser():
    """The ``llama_cpp`` module, or a RuntimeError saying how to install it (the CLI shows it as a user error)."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise RuntimeError("quantising a GGUF needs llama.cpp's quantiser: pip install 'llama-cpp-python>=0.3.36'") \
            from exc
    return llama_cpp


def quantize_gguf(src: Path, dst: Path, quant: str, threads: int | None = None) -> None:
    """Quantise the f16 GGUF ``src`` into ``dst`` with llama.cpp's quantiser (``quant`` is a key of :data:`FTYPES`)."""
    if quant not in FTYPES:
        raise ValueError(f"unknown quantisation {quant!r}: choose one of {', '.join(FTYPES)}")
    llama_cpp = require_quantiser()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[quant])
    params.nthread = threads or os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    if rc != 0:
        raise QuantizeError(f"llama.cpp could not quantise {src} to {quant} (llama_model_quantize returned {rc})")
