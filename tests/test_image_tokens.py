"""Image-text records -> token shards with images: phi-3 chat ids and LLaVA's two loss masks checked token by token,
image tokens expanded on load, the sidecar aligned after a reload, and bad records counted by reason."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SHARED, require_shared
from PIL import Image

from phi3data.multimodal.records import CONVERSATION_SCHEMA, make_conversations, make_pairs
from phi3data.multimodal.writers import write_parquet
from phi3data.tokenization.images import (
    IMAGE_TOKEN,
    SIDECAR_SUFFIX,
    ImageTokenDataset,
    ImageTokenizeConfig,
    SidecarWriter,
    collate_images,
    encode_image_chat,
    read_sidecar,
    tokenize_images,
)
from phi3data.tokenization.shards import TokenShard, list_shards
from phi3data.tokenization.tokenizers import get_tokenizer

HF_TOKENIZER = SHARED / "tokenizers" / "phi3" / "derived_hf_from_gguf" / "tokenizer.json"
PLACEHOLDER_ID = 32002  # <|placeholder1|> in phi-3-mini's published vocabulary


def _photo(name: str, size: int = 48, fmt: str = "PNG") -> bytes:
    """A real photo from scikit-image's bundled data, shrunk, as encoded bytes."""
    from skimage import data

    array = getattr(data, name)()
    img = Image.fromarray(array).convert("RGB").resize((size, size))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return {name: _photo(name) for name in ("astronaut", "camera", "coffee", "chelsea")}


def _conversation(photos) -> dict:
    return {"id": "two-photos", "images": [photos["astronaut"], photos["chelsea"]], "messages": [
        {"role": "system", "content": "You describe photos briefly and accurately."},
        {"role": "user", "content": "<|image|>\nWho is in this picture?"},
        {"role": "assistant", "content": "An astronaut in a white spacesuit, holding a helmet, with a flag behind."},
        {"role": "user", "content": "And in this one?\n<|image|>"},
        {"role": "assistant", "content": "A tabby cat looking up, its whiskers bright against the fur."},
        {"role": "user", "content": "Which of the two is indoors?"},
        {"role": "assistant", "content": "Neither photo clearly shows a room; the cat's background is dark."},
    ]}


def _tokenize(records: Path, out: Path, **config) -> Path:
    tokenize_images([records], out, ImageTokenizeConfig(**config), workers=1)
    return out


@pytest.fixture(scope="module")
def conversation_shards(tmp_path_factory, photos) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("image-tokens")
    records = write_parquet(make_conversations([_conversation(photos)]), root / "records" / "talk.parquet")
    return {mask: _tokenize(records, root / mask, mask=mask) for mask in ("assistant", "caption")}


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of every maximal run of ones."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_ids_match_the_reference_tokenizer_and_masks_hold_the_assistant_text(conversation_shards, photos):
    from tokenizers import Tokenizer as RustTokenizer

    messages = _conversation(photos)["messages"]
    rendered = "".join(f"<|{m['role']}|>\n{m['content'].replace('<|image|>', IMAGE_TOKEN)}<|end|>\n"
                       for m in messages) + "<|endoftext|>"
    reference = RustTokenizer.from_file(str(require_shared(HF_TOKENIZER))).encode(rendered, add_special_tokens=False)
    tok = get_tokenizer("phi3-mini")
    answers = [m["content"] for m in messages if m["role"] == "assistant"]

    shard = TokenShard.open(list_shards(conversation_shards["assistant"])[0])
    ids, mask = shard.document(0).astype(np.int64), np.asarray(shard.mask)
    assert ids.tolist() == reference.ids
    assert np.flatnonzero(ids == PLACEHOLDER_ID).size == 2 and not mask[ids == PLACEHOLDER_ID].any()
    spans = [tok.decode(ids[a:b]) for a, b in _runs(mask)]
    assert spans == [f"{a}<|end|>" for a in answers[:-1]] + [f"{answers[-1]}<|end|><|endoftext|>"]
    for position, token in enumerate(reference.tokens):  # token by token: trained exactly inside an answer
        inside = any(a <= position < b for a, b in _runs(mask))
        assert bool(mask[position]) == inside, (position, token)

    caption = TokenShard.open(list_shards(conversation_shards["caption"])[0])
    assert caption.document(0).tolist() == ids.tolist()
    assert [tok.decode(ids[a:b]) for a, b in _runs(np.asarray(caption.mask))] == [
        f"{answers[-1]}<|end|><|endoftext|>"]
    manifest = json.loads((conversation_shards["caption"] / "manifest.json").read_text())
    assert (manifest["mask_kind"], manifest["images"], manifest["documents"]) == ("caption", 2, 1)


def test_an_image_inside_a_reply_is_never_trained_on():
    tok = get_tokenizer("phi3-mini")
    messages = [{"role": "user", "content": "Draw a circle."},
                {"role": "assistant", "content": "Here it is: <|image|> a red circle."}]
    for mask in ("assistant", "caption"):
        ids, trained, positions = encode_image_chat(messages, 1, tok, mask=mask)
        assert positions.tolist() == np.flatnonzero(ids == PLACEHOLDER_ID).tolist() and len(positions) == 1
        assert trained[positions[0]] == 0 and trained[positions[0] - 1] == 1 and trained[positions[0] + 1] == 1
        trained_text = " ".join(tok.decode(ids[trained == 1]).split())
        assert trained_text == "Here it is: a red circle.<|end|><|endoftext|>"


def test_each_image_token_expands_to_the_encoder_token_count(conversation_shards):
    shard = TokenShard.open(list_shards(conversation_shards["assistant"])[0])
    base, base_mask = shard.document(0).astype(np.int64), np.asarray(shard.mask)
    n = 7
    sample = ImageTokenDataset(conversation_shards["assistant"], n)[0]
    ids, labels, starts = sample["input_ids"].numpy(), sample["labels"].numpy(), sample["image_starts"].numpy()
    assert len(ids) == len(base) + 2 * (n - 1) and len(labels) == len(ids)
    assert starts.tolist() == [p + k * (n - 1) for k, p in enumerate(np.flatnonzero(base == PLACEHOLDER_ID))]
    in_image = np.zeros(len(ids), dtype=bool)
    for s in starts:
        assert (ids[s:s + n] == PLACEHOLDER_ID).all()
        in_image[s:s + n] = True
    assert (labels[in_image] == -100).all()
    keep = ~in_image
    keep[starts] = True  # one copy of each run stands for the stored token
    assert ids[keep].tolist() == base.tolist()
    assert labels[keep].tolist() == np.where(base_mask == 1, base, -100).tolist()

    batch = collate_images([sample, ImageTokenDataset(conversation_shards["caption"], n)[0]], pad_id=0)
    assert batch["input_ids"].shape == (2, len(ids)) and batch["image_positions"].tolist() == [
        [0, int(starts[0])], [0, int(starts[1])], [1, int(starts[0])], [1, int(starts[1])]]
    assert torch.equal(batch["targets"][:, :-1], batch["labels"][:, 1:])
    assert (batch["targets"][:, -1] == -100).all() and len(batch["images"]) == 4


def test_sidecar_stays_aligned_after_a_reload(tmp_path, photos, monkeypatch):
    monkeypatch.setattr(SidecarWriter, "BATCH_ROWS", 2)  # the sidecar is written in several record batches
    records = [
        {"id": "a", "images": [photos["astronaut"]], "messages": [
            {"role": "user", "content": "<|image|>\nDescribe the photo."},
            {"role": "assistant", "content": "An astronaut portrait."}]},
        {"id": "b", "images": [photos["camera"], photos["astronaut"]], "messages": [
            {"role": "user", "content": "<|image|> and <|image|>: what differs?"},
            {"role": "assistant", "content": "The first is grey and shows a cameraman."}]},
        {"id": "c", "images": [], "messages": [
            {"role": "user", "content": "No picture this time: what is 2 + 3?"},
            {"role": "assistant", "content": "5"}]},
    ]
    pairs = [{"image": photos["coffee"], "text": "A cup of coffee on a saucer."}]
    root = tmp_path / "records"
    write_parquet(make_conversations(records), root / "talk.parquet")
    write_parquet(make_pairs(pairs), root / "pairs.parquet")
    out = _tokenize(root, tmp_path / "tokens", mask="assistant", caption_prompt="Describe the image.")
    stems = list_shards(out)
    assert len(stems) == 2
    for stem in stems:
        info = json.loads(stem.with_name(stem.name + ".json").read_text())["images"]
        assert stem.with_name(stem.name + SIDECAR_SUFFIX).name == info["sidecar"]
    talk = next(s for s in stems if s.name.startswith("talk"))
    assert json.loads(talk.with_name(talk.name + ".json").read_text())["images"] | {"sidecar": None} == {
        "count": 3, "unique": 2, "image_token": IMAGE_TOKEN, "image_token_id": PLACEHOLDER_ID, "sidecar": None}
    sidecar = read_sidecar(talk.with_name(talk.name + SIDECAR_SUFFIX)).to_pylist()
    assert [(r["document"], r["image"], r["bytes_row"], r["bytes"] is not None) for r in sidecar] == [
        (0, 0, 0, True), (1, 0, 1, True), (1, 1, 0, False)]  # the astronaut's bytes are stored once

    def to_tensor(img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(img.resize((16, 16)), dtype=np.uint8)).permute(2, 0, 1)

    expected = {"a": [photos["astronaut"]], "b": [photos["camera"], photos["astronaut"]], "c": []}
    loaded = ImageTokenDataset(talk, 3)
    tensors = ImageTokenDataset(talk, 3, transform=to_tensor)
    assert len(loaded) == 3
    for i, record_id in enumerate(("a", "b", "c")):
        sample = loaded[i]
        assert sample["id"] == (record_id if expected[record_id] else None)
        assert len(sample["images"]) == len(expected[record_id]) == len(sample["image_starts"])
        for got, data in zip(sample["images"], expected[record_id]):
            assert np.array_equal(got, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        for got, data in zip(tensors[i]["images"], expected[record_id]):
            assert torch.equal(got, to_tensor(Image.open(io.BytesIO(data)).convert("RGB")))
    batch = collate_images([tensors[0], tensors[1], tensors[2]])
    assert batch["images"].shape == (3, 3, 16, 16) and batch["image_positions"][:, 0].tolist() == [0, 1, 1]

    pair = ImageTokenDataset(next(s for s in stems if s.name.startswith("pairs")), 4)[0]
    tok = get_tokenizer("phi3-mini")
    assert tok.decode(pair["labels"][pair["labels"] != -100]) == "A cup of coffee on a saucer.<|end|><|endoftext|>"
    assert "Describe the image." in tok.decode(pair["input_ids"])


def test_bad_records_are_counted_and_the_rest_goes_through(tmp_path, photos):
    def talk(record_id, content, images, answer="Yes."):
        return {"id": record_id, "images": images, "image_ids": [None] * len(images), "url": None,
                "source": "test", "metadata": None,
                "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}

    jpeg = _photo("coffee", fmt="JPEG")
    rows = [
        talk("good-1", "<|image|>\nIs this a person?", [photos["astronaut"]]),
        talk("two-placeholders", "<|image|><|image|> same?", [photos["camera"]]),
        talk("missing", "<|image|>\nWhat is it?", [None]),
        talk("truncated", "<|image|>\nWhat is it?", [jpeg[: len(jpeg) // 2]]),
        talk("not-an-image", "<|image|>\nWhat is it?", [b"GIF89a but not really an image"]),
        talk("token-in-text", f"<|image|> and the literal {IMAGE_TOKEN}?", [photos["camera"]]),
        talk("too-long", "<|image|><|image|> compare.", [photos["camera"], photos["coffee"]]),
        {**talk("no-answer", "<|image|>\nHello?", [photos["camera"]]),
         "messages": [{"role": "user", "content": "<|image|>\nHello?"}]},
        talk("good-2", "<|image|>\nIs this a camera operator?", [photos["camera"]]),
    ]
    root = tmp_path / "records"
    write_parquet(pa.Table.from_pylist(rows, schema=CONVERSATION_SCHEMA), root / "a-talk.parquet")
    pairs = [{"image": photos["coffee"], "text": "Coffee."}, {"image": photos["chelsea"], "text": " "}]
    write_parquet(make_pairs(pairs), root / "b-pairs.parquet")
    (root / "c-broken.parquet").write_bytes(b"PAR1 this is not a parquet file")
    out = _tokenize(root, tmp_path / "tokens", image_tokens=576, max_tokens=1000)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejects"] == {"empty_caption": 1, "missing_image": 1, "no_target": 1, "placeholder_mismatch": 2,
                                   "too_many_tokens": 1, "truncated": 1, "undecodable": 1,
                                   "unreadable_file": 1}
    assert (manifest["documents"], manifest["images"]) == (3, 3)
    talk_stem = next(s for s in list_shards(out) if s.name.startswith("a-talk"))
    rejected = [json.loads(line) for line in talk_stem.with_name(talk_stem.name + ".rejects.jsonl").open()]
    assert [(r["id"], r["reason"]) for r in rejected] == [
        ("two-placeholders", "placeholder_mismatch"), ("missing", "missing_image"), ("truncated", "truncated"),
        ("not-an-image", "undecodable"), ("token-in-text", "placeholder_mismatch"),
        ("too-long", "too_many_tokens"), ("no-answer", "no_target")]
    kept = ImageTokenDataset(talk_stem, 576)
    assert [kept[i]["id"] for i in range(len(kept))] == ["good-1", "good-2"]

    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".json" and p.is_file()}
    summary = tokenize_images([root], out, ImageTokenizeConfig(image_tokens=576, max_tokens=1000), workers=1)
    assert summary.shards_skipped == summary.shards_total == 3
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".json" and p.is_file()} == before
    with pytest.raises(ValueError, match="another config"):
        tokenize_images([root], out, ImageTokenizeConfig(mask="caption"), workers=1)


def test_synthetic_charts_tokenized_from_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from phi3data.cli import app

    charts, tokens = tmp_path / "charts", tmp_path / "tokens"
    made = CliRunner().invoke(app, ["synth-images", "--kind", "charts", "--count", "2", "--seed", "3", "--workers",
                                    "1", "--no-progress", "--output", str(charts)])
    assert made.exit_code == 0, made.output
    result = CliRunner().invoke(app, ["tokenize", str(charts), "--images", "--mask", "assistant", "--image-tokens",
                                      "4", "--workers", "1", "--no-progress", "--output", str(tokens)])
    assert result.exit_code == 0, result.output
    records = pq.read_table(next(charts.glob("charts-*.parquet"))).to_pylist()
    data = ImageTokenDataset(tokens, 4)
    tok = get_tokenizer("phi3-mini")
    assert len(data) == len(records) == 2
    for i, record in enumerate(records):
        sample = data[i]
        assert sample["id"] == record["id"] and sample["images"][0].shape == (360, 480, 3)
        trained = tok.decode(sample["labels"][sample["labels"] != -100])
        answers = [qa["answer"] for qa in json.loads(record["metadata"])["qa"]]
        assert trained == "<|end|>".join(answers) + "<|end|><|endoftext|>"


@pytest.mark.cluster
@pytest.mark.parametrize("engine", ["spark"])
def test_spark_writes_the_same_shards_as_local(engine, engine_up, tmp_path, photos):
    records = write_parquet(make_conversations([_conversation(photos)]), tmp_path / "records" / "talk.parquet")
    write_parquet(make_pairs([{"image": photos["coffee"], "text": "Coffee."}]), tmp_path / "records" / "pairs.parquet")
    outputs = {}
    for name in ("local", engine):
        tokenize_images([records.parent], tmp_path / name, ImageTokenizeConfig(mask="caption"), engine=name,
                        workers=2)
        outputs[name] = {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()
                         if p.is_file() and p.suffix != ".json" and not p.name.startswith(".")}
    assert len(outputs["local"]) == 10 and outputs["local"] == outputs[engine]
