"""Contrastive pretraining of the small ViT on easy-VQA images, with each image's "what" questions and answers as
its caption, against the packaged MiniLM kept frozen."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import pytest
import torch
from PIL import Image

from phi3data.model.clip_pretrain import (
    ContrastiveConfig,
    ContrastiveScorer,
    contrastive_loss,
    encode_captions,
    load_contrastive,
    retrieval_accuracy,
    train_contrastive,
)
from phi3data.model.vision import ViT, ViTConfig

TOWER = ViTConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4)
TRAIN = ContrastiveConfig(steps=60, batch_size=64, lr=5e-3, warmup_steps=5, embed_dim=64)


def easy_vqa_pairs(split: str, n: int) -> tuple[list[Image.Image], list[str]]:
    """The first ``n`` images of a split, each captioned by its questions whose answer is not yes/no."""
    import easy_vqa

    if split == "train":
        questions, paths = easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
    else:
        questions, paths = easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()
    by_image = defaultdict(list)
    for question, answer, image in zip(*questions, strict=True):
        if answer not in ("yes", "no"):
            by_image[image].append(f"{question} {answer}.")
    keys = sorted(by_image)[:n]
    return [Image.open(paths[k]) for k in keys], [" ".join(by_image[k]) for k in keys]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    train_images, train_captions = easy_vqa_pairs("train", 256)
    test_images, test_captions = easy_vqa_pairs("test", 64)
    probe = ViT(TOWER)
    vectors = encode_captions(train_captions + test_captions)
    return {"train": (probe.preprocess(train_images), vectors[:256], train_captions),
            "test": (probe.preprocess(test_images), vectors[256:], test_captions), "test_images": test_images}


def test_contrastive_training_improves_held_out_retrieval(data, tmp_path) -> None:
    pixels, vectors, captions = data["train"]
    assert len(set(captions)) < len(captions)  # repeated captions: the soft targets matter
    torch.manual_seed(0)
    untrained = train_contrastive(ViT(TOWER), pixels, captions, replace(TRAIN, steps=0), text_vectors=vectors).model
    torch.manual_seed(0)
    run = train_contrastive(ViT(TOWER), pixels, captions, TRAIN, text_vectors=vectors, out_dir=tmp_path / "tower")
    assert len(run.losses) == TRAIN.steps
    assert sum(run.losses[-10:]) < sum(run.losses[:10])

    held_out = data["test"]
    before_loss, after_loss = contrastive_loss(untrained, *held_out), contrastive_loss(run.model, *held_out)
    before_acc, after_acc = retrieval_accuracy(untrained, *held_out), retrieval_accuracy(run.model, *held_out)
    assert after_loss < before_loss
    assert after_acc > before_acc, (before_acc, after_acc)

    saved = load_contrastive(tmp_path / "tower")
    test_pixels, test_vectors, _ = held_out
    with torch.no_grad():
        torch.testing.assert_close(saved.image_embeddings(test_pixels), run.model.image_embeddings(test_pixels),
                                   atol=0, rtol=0)
        torch.testing.assert_close(saved.similarity(test_pixels, test_vectors),
                                   run.model.similarity(test_pixels, test_vectors), atol=0, rtol=0)
    assert (tmp_path / "tower" / "config.json").exists()  # the tower is a CLIPVisionModel directory

    # as the image_text_similarity stage's scorer: own captions score above the other images' captions
    scorer = ContrastiveScorer(tmp_path / "tower")
    images = scorer.embed_images(data["test_images"])
    texts = scorer.embed_texts(held_out[2])
    scores = images @ texts.T
    assert abs(float(scores.diagonal().mean()) - float(saved.similarity(test_pixels, test_vectors).mean())) < 1e-4
    assert scores.diagonal().mean() > scores.mean()


def test_contrastive_training_is_deterministic(data) -> None:
    pixels, vectors, captions = data["train"]
    short = replace(TRAIN, steps=4)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(train_contrastive(ViT(TOWER), pixels[:96], captions[:96], short, text_vectors=vectors[:96]))
    assert runs[0].losses == runs[1].losses
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="captions"):
        train_contrastive(ViT(TOWER), pixels[:3], captions[:2], short, text_vectors=vectors[:2])


def test_pretrain_tower_on_pair_parquet(tmp_path, capsys) -> None:
    """``python -m phi3data.model.clip_pretrain``: pairs parquet in, a [vision] tower directory out; a rerun keeps
    the finished tower, other settings are refused, conversations are not pairs."""
    from phi3data.model.clip_pretrain import RUN_FILE, main, pair_images_and_captions
    from phi3data.model.vision import load_vision_tower
    from phi3data.multimodal import easy_vqa

    easy_vqa.build(tmp_path / "records", "train", 40)
    images, captions = pair_images_and_captions([tmp_path / "records" / "pairs"])
    assert len(images) == len(captions) == 40 and all(c.startswith("a ") for c in captions)
    vit = tmp_path / "vit.toml"
    vit.write_text("[vision.vit]\nimage_size = 32\npatch_size = 16\nhidden_size = 32\nintermediate_size = 64\n"
                   "num_hidden_layers = 1\nnum_attention_heads = 2\n")
    args = [str(tmp_path / "records" / "pairs"), "--out", str(tmp_path / "tower"), "--vit-from", str(vit),
            "--steps", "4", "--batch-size", "16"]
    main(args)
    assert "40 pairs, 4 steps" in capsys.readouterr().out
    tower = load_vision_tower(tmp_path / "tower")
    assert tower.image_size == 32
    record = (tmp_path / "tower" / RUN_FILE).read_text()
    main(args)  # finished with the same settings: kept as it is
    assert (tmp_path / "tower" / RUN_FILE).read_text() == record
    with pytest.raises(ValueError, match="other settings"):
        main([*args[:-4], "--steps", "5", "--batch-size", "16"])
    with pytest.raises(ValueError, match="not image-text pairs"):
        main([str(tmp_path / "records" / "conversations"), "--out", str(tmp_path / "t2"), "--steps", "1"])
