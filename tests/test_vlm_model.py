"""The VLM: in-repo ViT against transformers' CLIPVisionModel, CLIP / SigLIP towers from a local directory, image
features at the placeholder positions, LLaVA stages and the feature cache, and the LlavaForConditionalGeneration
export (logits parity on tiny random configurations, real photos from scikit-image)."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from phi3data.export.llava import llava_config, load_llava, save_llava
from phi3data.model import Phi3, Phi3Config
from phi3data.model.vision import CLIP_MEAN, SIGLIP_MEAN, ViT, ViTConfig, load_vision_tower, save_vit, tower_identity
from phi3data.model.vlm import VLM, ImageFeatureCache, configure_stage

IMAGE_TOKEN = 200


def photos(n: int) -> list[Image.Image]:
    from skimage import data

    arrays = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.camera()][:n]
    return [Image.fromarray(a) for a in arrays]  # camera is greyscale, rocket is not square


def tiny_vit(**kw) -> ViT:
    base = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4)
    return ViT(ViTConfig(**{**base, **kw}))


def tiny_phi3(**kw) -> Phi3:
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, original_max_position_embeddings=128, pad_token_id=0, eos_token_id=2)
    return Phi3(Phi3Config(**{**base, **kw}))


def tiny_vlm(projector: str = "mlp2x_gelu", seed: int = 0, **phi3) -> VLM:
    torch.manual_seed(seed)
    return VLM(tiny_vit(), tiny_phi3(**phi3), projector, image_token_id=IMAGE_TOKEN).eval()


def prompt(vlm: VLM, before: list[int], after: list[int]) -> list[int]:
    return before + [IMAGE_TOKEN] * vlm.n_tokens + after


def test_vit_is_a_clip_vision_model(tmp_path) -> None:
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    vit = tiny_vit().eval()
    save_vit(vit, tmp_path / "vit")
    hf, info = CLIPVisionModel.from_pretrained(tmp_path / "vit", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixels = vit.preprocess(photos(3))
    with torch.no_grad():
        out = hf.eval()(pixel_values=pixels, output_hidden_states=True)
        torch.testing.assert_close(vit(pixels), out.hidden_states[-2][:, 1:], atol=1e-5, rtol=0)
        torch.testing.assert_close(vit.pooled(pixels), out.pooler_output, atol=1e-5, rtol=0)
        again = load_vision_tower(tmp_path / "vit")
        assert isinstance(again, ViT) and again.n_tokens == 16
        torch.testing.assert_close(again(pixels), vit(pixels), atol=0, rtol=0)
        keep_cls = load_vision_tower(tmp_path / "vit", select_feature="cls_patch", feature_layer=-1)
        assert keep_cls.n_tokens == 17
        torch.testing.assert_close(keep_cls(pixels), out.hidden_states[-1], atol=1e-5, rtol=0)


def saved_transformers_tower(path, kind: str):
    """A tiny random CLIPVisionModel or SiglipVisionModel, saved by transformers into ``path``."""
    import transformers

    torch.manual_seed(0)
    arch = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                patch_size=8)
    if kind == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**arch)).eval()
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**arch)).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_transformers_tower_from_local_dir(tmp_path, kind: str) -> None:
    model = saved_transformers_tower(tmp_path / kind, kind)
    tower = load_vision_tower(tmp_path / kind)
    pixels = tower.preprocess([_png(photo) for photo in photos(2)])  # encoded bytes
    with torch.no_grad():
        expected = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        if kind == "clip":
            expected = expected[:, 1:]  # LLaVA's "patch": the class token dropped
        features = tower(pixels)
    assert tower.n_tokens == 16 == features.shape[1]
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=0)
    # the identity (the feature cache's key) follows the weights and settings, not the directory they were read from
    (tmp_path / kind).rename(tmp_path / "moved")
    assert tower_identity(load_vision_tower(tmp_path / "moved")) == tower_identity(tower)
    assert tower_identity(load_vision_tower(tmp_path / "moved", feature_layer=-1)) != tower_identity(tower)
    assert tower.image_mean == (SIGLIP_MEAN if kind == "siglip" else CLIP_MEAN)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_phi3_inputs_embeds_path_equals_ids() -> None:
    torch.manual_seed(0)
    lm = tiny_phi3().eval()
    idx = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        by_ids, _ = lm(idx)
        by_embeds, _ = lm(None, inputs_embeds=lm.model.embed_tokens(idx))
    torch.testing.assert_close(by_ids, by_embeds, atol=0, rtol=0)


def test_image_features_fill_the_placeholders_in_order() -> None:
    vlm = tiny_vlm()
    n = vlm.n_tokens
    ids = torch.tensor([prompt(vlm, [1, 5, 6], [7, 8]), [1, 9] + [IMAGE_TOKEN] * n + [3, 4, 5]])
    pixels = vlm.vision_tower.preprocess(photos(2))
    with torch.no_grad():
        x = vlm.embed(ids, vlm.vision_features(pixels))
        projected = vlm.projector(vlm.vision_tower(pixels))
        plain = vlm.language_model.model.embed_tokens(ids)
        torch.testing.assert_close(x[0, 3:3 + n], projected[0], atol=0, rtol=0)
        torch.testing.assert_close(x[1, 2:2 + n], projected[1], atol=0, rtol=0)
        text = ids != IMAGE_TOKEN
        torch.testing.assert_close(x[text], plain[text], atol=0, rtol=0)

        logits, _ = vlm(ids, pixels)
        swapped, _ = vlm(ids, pixels.flip(0))  # each sample now sees the other's image
        # causal: positions before the image are unchanged, the image and everything after it are not
        torch.testing.assert_close(logits[0, :3], swapped[0, :3], atol=0, rtol=0)
        assert (logits[0, 3:] - swapped[0, 3:]).abs().amax(-1).min() > 0
        # the same through an explicit mask over arbitrary ids, and through precomputed features
        masked_ids = torch.where(ids == IMAGE_TOKEN, 0, ids)
        by_mask, _ = vlm(masked_ids, pixels, image_mask=ids == IMAGE_TOKEN)
        by_features, _ = vlm(ids, vision_features=vlm.vision_tower(pixels))
        by_list, _ = vlm(ids, list(pixels))  # one (3, S, S) tensor per image, as a collate of mixed sizes gives
    torch.testing.assert_close(by_mask, logits, atol=0, rtol=0)
    torch.testing.assert_close(by_features, logits, atol=0, rtol=0)
    torch.testing.assert_close(by_list, logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="image positions"):
        vlm(ids, pixels[:1])
    with pytest.raises(ValueError, match="image positions"):
        vlm(ids[:, :-8])  # no pixels for placeholders that are there


def test_training_loss_reaches_projector_not_frozen_tower() -> None:
    vlm = tiny_vlm().train()
    ids = torch.tensor([prompt(vlm, [1, 5], [7, 8, 9, 10])])
    targets = torch.full_like(ids, -100)
    targets[0, -5:-1] = ids[0, -4:]
    groups = configure_stage(vlm, "pretrain")
    assert {g["name"] for g in groups} == {"projector", "projector.no_decay"}
    assert all(g["lr"] == 1e-3 for g in groups)
    before = {k: v.clone() for k, v in vlm.state_dict().items()}
    optimizer = torch.optim.AdamW(groups)
    _, loss = vlm(ids, vlm.vision_tower.preprocess(photos(1)), targets)
    loss.backward()
    optimizer.step()
    changed = {k for k, v in vlm.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("projector.") for k in changed)
    assert all(p.grad is None for p in vlm.vision_tower.parameters())
    assert all(p.grad is None for p in vlm.language_model.parameters())

    groups = configure_stage(vlm, "finetune", weight_decay=0.1)
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for p in [*vlm.projector.parameters(), *vlm.language_model.parameters()]}
    assert {g["lr"] for g in groups} == {2e-5}
    with pytest.raises(ValueError, match="unknown stage"):
        configure_stage(vlm, "pretrian")


def test_feature_cache_encodes_each_image_once(tmp_path) -> None:
    vlm = tiny_vlm()
    images = [_png(p) for p in photos(3)]
    ids = [f"{i}{'0' * 63}" for i in range(3)]
    cache = ImageFeatureCache(tmp_path, vlm.vision_tower)
    first = cache.features(ids[:2], images[:2])
    assert (cache.hits, cache.misses) == (0, 2)
    both = cache.features(ids, images)
    assert (cache.hits, cache.misses) == (2, 3)
    with torch.no_grad():  # in the cache's batches (two, then the missing one): a matmul's result may depend on
        # the batch it is computed in, in the last bit (seen with two threads)
        direct = torch.cat([vlm.vision_tower(vlm.vision_tower.preprocess(images[:2])),
                            vlm.vision_tower(vlm.vision_tower.preprocess(images[2:]))])
    torch.testing.assert_close(both, direct, atol=0, rtol=0)
    torch.testing.assert_close(first, direct[:2], atol=0, rtol=0)
    assert not list(tmp_path.rglob(".tmp-*"))
    # another feature layer is another tower: its own directory, no stale features
    other = ImageFeatureCache(tmp_path, load_vision_tower(_saved(vlm, tmp_path), feature_layer=-1))
    assert other.dir != cache.dir and tower_identity(other.tower) != tower_identity(vlm.vision_tower)
    other.features(ids[:1], images[:1])
    assert other.misses == 1
    with pytest.raises(ValueError, match="content id"):
        cache.path("../escape")
    with pytest.raises(ValueError, match=f"image {'f' * 64}: .*cannot be decoded"):  # a truncated PNG
        cache.features(["f" * 64], [images[0][:200]])
    assert not cache.path("f" * 64).exists()


def _saved(vlm: VLM, tmp_path):
    return save_vit(vlm.vision_tower, tmp_path / "tower")


@pytest.mark.parametrize("projector,tied", [("mlp2x_gelu", False), ("linear", True)])
def test_llava_export_matches_transformers(tmp_path, projector: str, tied: bool) -> None:
    from transformers import LlavaForConditionalGeneration

    vlm = tiny_vlm(projector, seed=1, tie_word_embeddings=tied)
    out = save_llava(vlm, tmp_path / "llava")
    cfg = llava_config(vlm)
    assert cfg["vision_config"]["model_type"] == "clip_vision_model" and cfg["text_config"]["model_type"] == "phi3"
    hf, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    ids = torch.tensor([prompt(vlm, [1, 17, 33], [40, 41, 42]), prompt(vlm, [1, 90, 91], [92, 93, 94])])
    pixels = vlm.vision_tower.preprocess(photos(2))
    with torch.no_grad():
        ours, _ = vlm(ids, pixels)
        theirs = hf(input_ids=ids, pixel_values=pixels).logits
        assert ours.shape == theirs.shape == (2, ids.shape[1], 256)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        back, _ = load_llava(out).eval()(ids, pixels)
    torch.testing.assert_close(back, ours, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_llava_export_of_transformers_towers(tmp_path, kind: str) -> None:
    from transformers import LlavaForConditionalGeneration

    saved_transformers_tower(tmp_path / kind, kind)
    tower = load_vision_tower(tmp_path / kind)
    torch.manual_seed(1)
    vlm = VLM(tower, tiny_phi3(), "mlp2x_gelu", image_token_id=IMAGE_TOKEN).eval()
    out = save_llava(vlm, tmp_path / "llava")
    # SigLIP has no class token: transformers must keep every patch ("full"), CLIP drops the first ("default")
    assert llava_config(vlm)["vision_feature_select_strategy"] == ("default" if kind == "clip" else "full")
    hf, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([prompt(vlm, [1, 17], [40, 41])])
    pixels = tower.preprocess(photos(1))
    with torch.no_grad():
        torch.testing.assert_close(vlm(ids, pixels)[0], hf.eval()(input_ids=ids, pixel_values=pixels).logits,
                                   atol=1e-5, rtol=0)


def test_llava_export_refuses_phi3_small_options(tmp_path) -> None:
    vlm = tiny_vlm(hidden_act="gegelu")
    with pytest.raises(ValueError, match="phi-3-small"):
        save_llava(vlm, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_trains_on_image_token_shards(tmp_path) -> None:
    """The contract with the image tokenizer: shards expanded to the tower's token count feed the VLM as they are."""
    from phi3data.multimodal.records import make_conversations
    from phi3data.multimodal.writers import write_parquet
    from phi3data.tokenization.images import ImageTokenDataset, ImageTokenizeConfig, collate_images, tokenize_images

    pictures = [_png(p.resize((48, 48))) for p in photos(2)]
    conversation = {"id": "two-photos", "images": pictures, "messages": [
        {"role": "user", "content": "<|image|>\nWhat is in this picture?"},
        {"role": "assistant", "content": "An astronaut in a white spacesuit."},
        {"role": "user", "content": "And here?\n<|image|>"},
        {"role": "assistant", "content": "A cup of coffee on a saucer."}]}
    records = write_parquet(make_conversations([conversation]), tmp_path / "records" / "talk.parquet")
    tokenize_images([records], tmp_path / "tokens", ImageTokenizeConfig(mask="assistant"), workers=1)
    torch.manual_seed(0)
    vlm = VLM(tiny_vit(), tiny_phi3(vocab_size=32064))  # phi-3's ids; the default image token id is the tokenizer's
    data = ImageTokenDataset(tmp_path / "tokens", vlm.n_tokens, transform=vlm.vision_tower.transform)
    assert data.image_token_id == vlm.image_token_id
    batch = collate_images([data[0]])
    assert int((batch["input_ids"] == vlm.image_token_id).sum()) == 2 * vlm.n_tokens
    assert (batch["targets"][batch["input_ids"] == vlm.image_token_id] == -100).all()
    configure_stage(vlm, "finetune")
    _, loss = vlm(batch["input_ids"], batch["images"], batch["targets"])
    loss.backward()
    assert torch.isfinite(loss) and vlm.projector.linear_1.weight.grad.abs().sum() > 0
