"""Classifier throughput, side by side on the same documents and cores, in one run.

1. raw fastText batch predict (the anchor) vs phi3data's ``edu_score`` stage with the same model file;
   goal: stage >= 0.9x the anchor's throughput.
2. sentence-transformers ``encode`` + the same linear head (the anchor) vs phi3data's embedding classifier
   (int8 ONNX, length-sorted batches); goal: >= 2x.

Run:  python -m bench.classify [--docs 1400] [--embed-docs 300] [--write docs/benchmarks_classify.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DCLM = SHARED / "quality" / "dclm_majority_labeled.jsonl"
OPENSTAX = SHARED / "textbooks" / "openstax.jsonl.gz"


def documents(n: int) -> list[str]:
    """DCLM web documents and OpenStax textbook sections, interleaved, first n."""
    from phi3data.classifiers.data import read_documents

    web = [d["text"] for d in read_documents(DCLM)]
    books = [d["text"] for d in read_documents(OPENSTAX)]
    mixed = [t for pair in zip(web, books) for t in pair] + web[len(books):] + books[len(web):]
    return mixed[:n]


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def train_dclm(kind: str, out: Path, extra: dict) -> Path:
    from phi3data.classifiers.data import SourceConfig
    from phi3data.classifiers.train import ClassifierSection, TrainConfig, train_from_config

    config = TrainConfig(classifier=ClassifierSection(name=f"bench_{kind}", kind=kind, output=str(out)),
                         source=[SourceConfig(path=str(DCLM), label_key="label")], **extra)
    return train_from_config(config, output=out).output


def bench_fasttext(texts: list[str], workdir: Path, repeats: int) -> dict:
    import fasttext

    from phi3data.classifiers.fasttext_classifier import prepare, scores_from
    from phi3data.documents import make_batch
    from phi3data.pipelines.stages.edu import EduScore, EduScoreParams

    model_dir = train_dclm("fasttext", workdir / "ft", {"fasttext": {"min_count": 1, "lr": 0.3, "epoch": 25}})
    raw_model = fasttext.load_model(str(model_dir / "model.bin"))

    def raw() -> np.ndarray:
        lines = prepare(texts, lowercase=True, max_chars=20_000)
        try:  # fastText's own Python batch predict
            labels, probs = raw_model.predict([line[:-1] for line in lines], k=-1)
        except ValueError:  # its numpy-2 wrapper issue: fall back to the C++ binding it wraps
            labels, probs = raw_model.f.multilinePredict(lines, -1, 0.0, "replace")
        return scores_from(labels, probs, "binary")

    stage = EduScore(EduScoreParams(model=str(model_dir)))
    stage.ensure_setup()
    batches = [make_batch({"id": str(i + j), "text": t} for j, t in enumerate(texts[i:i + 256]))
               for i in range(0, len(texts), 256)]

    def ours() -> np.ndarray:
        return np.concatenate([stage.process(b).batch.column("edu_score").to_numpy() for b in batches])

    raw_s, raw_scores = best_of(repeats, raw)
    ours_s, our_scores = best_of(repeats, ours)
    assert np.allclose(raw_scores, our_scores, atol=1e-6), "the stage must give the raw model's scores"
    return {"docs": len(texts), "raw_s": raw_s, "ours_s": ours_s, "ratio": raw_s / ours_s}


def bench_embedding(texts: list[str], workdir: Path, threads: int) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import __version__ as st_version

    from phi3data.classifiers.embedding_classifier import torch_model_dir
    from phi3data.classifiers.saved import load_classifier

    torch.set_num_threads(threads)
    model_dir = train_dclm("embedding", workdir / "emb", {"embedding": {"max_tokens": 256, "threads": threads}})
    ours_clf = load_classifier(model_dir)[0]
    ours_clf.encoder.encode(texts[:8])  # load the session before timing

    st = SentenceTransformer(str(torch_model_dir()), device="cpu")
    st.max_seq_length = 256
    st.encode(texts[:8])

    def anchor() -> np.ndarray:
        embeddings = st.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
        return ours_clf.scores_from_embeddings(embeddings)

    anchor_s, anchor_scores = best_of(1, anchor)
    ours_s, our_scores = best_of(1, lambda: ours_clf.predict(texts))
    correlation = float(np.corrcoef(anchor_scores, our_scores)[0, 1])
    return {"docs": len(texts), "anchor_s": anchor_s, "ours_s": ours_s, "ratio": anchor_s / ours_s,
            "score_correlation": correlation, "sentence_transformers": st_version}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1400)
    parser.add_argument("--embed-docs", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--write", type=Path, default=None, help="Write the figures to this Markdown file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    texts = documents(args.docs)
    chars = sum(len(t) for t in texts)
    with tempfile.TemporaryDirectory() as tmp:
        ft = bench_fasttext(texts, Path(tmp), args.repeats)
        print(f"fastText: {ft['docs']} docs ({chars / 1e6:.1f} M chars): raw predict {ft['raw_s']:.3f}s, "
              f"edu_score stage {ft['ours_s']:.3f}s -> ratio {ft['ratio']:.2f}x (goal >= 0.9x)")
        em = bench_embedding(texts[:args.embed_docs], Path(tmp), args.threads)
        print(f"embedding: {em['docs']} docs: sentence-transformers {em['sentence_transformers']} encode + head "
              f"{em['anchor_s']:.2f}s, phi3data int8 ONNX {em['ours_s']:.2f}s -> ratio {em['ratio']:.2f}x "
              f"(goal >= 2x); score correlation {em['score_correlation']:.3f}")
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(f"""# Classifier benchmarks (bench/classify.py)

Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; both sides of each row
ran in the same process on the same documents (DCLM web documents interleaved with OpenStax sections).

| benchmark | anchor | phi3data | docs | anchor s | phi3data s | ratio (anchor/phi3data) | goal |
|---|---|---|---|---|---|---|---|
| fastText scoring | fasttext batch predict (+ same line prep) | `edu_score` stage, 256-doc Arrow batches \
| {ft['docs']} | {ft['raw_s']:.3f} | {ft['ours_s']:.3f} | {ft['ratio']:.2f}x | >= 0.9x |
| embedding scoring | sentence-transformers {em['sentence_transformers']} encode (fp32, batch 32) + head \
| int8 ONNX, length-sorted batches + head | {em['docs']} | {em['anchor_s']:.2f} | {em['ours_s']:.2f} \
| {em['ratio']:.2f}x | >= 2x |

fastText: best of {args.repeats} runs; the stage's scores equal the raw model's. Embedding: one run each, both
truncate at 256 tokens; the int8 model's scores correlate {em['score_correlation']:.3f} with the fp32 anchor's.
""", encoding="utf-8")
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
