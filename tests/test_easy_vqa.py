"""easy-VQA as phi3data records: captions from questions (and pixels), conversations, test triples."""

import pyarrow.parquet as pq
import pytest

from phi3data.multimodal import easy_vqa
from phi3data.multimodal.records import IMAGE_PLACEHOLDER, image_id, record_kind


def test_pixel_attributes_agree_with_the_questions():
    told = easy_vqa.question_attributes("train")
    checked = 0
    for number in sorted(told)[:1500]:
        seen = easy_vqa.pixel_attributes(easy_vqa.image_bytes("train", number))
        for kind, value in told[number].items():
            assert seen[kind] == value, (number, kind)
            checked += 1
    assert checked > 500


def test_pairs_carry_a_colour_and_shape_caption():
    pairs = easy_vqa.pair_records("train", limit=20)
    assert record_kind(pairs) == "pair" and pairs.num_rows == 20
    row = pairs.slice(0, 1).to_pylist()[0]
    assert row["text"] == "a blue rectangle"  # image 0: "what is the blue shape?" -> "rectangle"
    assert row["image_id"] == image_id(easy_vqa.image_bytes("train", 0))
    captions = pairs.column("text").to_pylist()
    assert all(c.split()[1] in easy_vqa.COLORS and c.split()[2] in easy_vqa.SHAPES for c in captions)


def test_conversations_one_per_question():
    convs = easy_vqa.conversation_records("train", limit=3)
    expected = [(q, a) for q, a, n in easy_vqa.questions("train") if n < 3]
    assert record_kind(convs) == "conversation" and convs.num_rows == len(expected)
    got = [(m[0]["content"], m[1]["content"]) for m in convs.column("messages").to_pylist()]
    assert got == [(f"{IMAGE_PLACEHOLDER}\n{q}", a) for q, a in expected]


def test_test_triples_and_build(tmp_path):
    triples = easy_vqa.test_triples()
    assert len(triples) == 9673
    data, question, answer = triples[0]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and question.endswith("?") and answer in easy_vqa.questions("test")[0]
    paths = easy_vqa.build(tmp_path, "test", limit=4)
    assert pq.read_table(paths["pairs"]).num_rows == 4
    assert pq.read_table(paths["conversations"]).num_rows == sum(n < 4 for *_, n in easy_vqa.questions("test"))
    with pytest.raises(ValueError, match="split"):
        easy_vqa.questions("validation")
