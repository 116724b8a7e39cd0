"""Synthetic image-text data: answers re-derived from the tables, renders read back by a real OCR model, and
byte-identical, resumable output for a seed (``phi3data synth-images``)."""

from __future__ import annotations

import gzip
import io
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import SHARED, require_shared
from PIL import Image
from typer.testing import CliRunner

from phi3data.cli import app
from phi3data.multimodal.records import IMAGE_PLACEHOLDER, image_id, pair_id
from phi3data.multimodal.synthetic import SynthConfig, chart_record, generate, ocr_record, table_record

TEXTBOOKS = SHARED / "textbooks" / "openstax.jsonl.gz"


@pytest.fixture(scope="module")
def ocr():
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError:
        pytest.fail("rapidocr_onnxruntime is missing: pip install -e '.[multimodal]' (it reads the renders back)")
    return RapidOCR()


def _read_back(ocr, png: bytes) -> str:
    """Everything the OCR model reads in an image, lower-cased, without whitespace (it often drops spaces)."""
    result, _ = ocr(png)
    return re.sub(r"\s+", "", " ".join(line[1] for line in result or [])).lower()


def _turns(record: dict) -> list[tuple[str, str]]:
    messages = record["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
    assert messages[0]["content"].startswith(IMAGE_PLACEHOLDER + "\n")
    assert sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages) == 1
    return [(messages[i]["content"].removeprefix(IMAGE_PLACEHOLDER + "\n"), messages[i + 1]["content"])
            for i in range(0, len(messages), 2)]


def _expected_chart_answer(question: str, categories: list[str], values: list[int]) -> str:
    """The answer to a chart question, worked out here from the table alone."""
    table = dict(zip(categories, values))
    if "highest value" in question:
        return max(table, key=table.get)
    if "lowest value" in question:
        return min(table, key=table.get)
    if m := re.fullmatch(r"What is the value of (.+)\?", question):
        return str(table[m[1]])
    if m := re.fullmatch(r"What is the difference between the values of (.+) and (.+)\?", question):
        return str(abs(table[m[1]] - table[m[2]]))
    if question.startswith("How many"):
        return str(len(table))
    if m := re.fullmatch(r"Did the value go up or down from (\d+) to (\d+)\?", question):
        return "up" if table[m[2]] > table[m[1]] else "down"
    raise AssertionError(f"unexpected question {question!r}")


def test_chart_answers_follow_from_the_table_and_the_values_are_legible(ocr):
    records = [chart_record(7, i) for i in range(8)]
    assert {r["metadata"]["table"]["chart"] for r in records} == {"bar", "line", "pie"}
    for record in records:
        table = record["metadata"]["table"]
        assert len(set(table["values"])) == len(table["values"])  # distinct, so max/min answers are unique
        turns = _turns(record)
        kinds = [q["kind"] for q in record["metadata"]["qa"]]
        assert {"max", "min", "value", "difference", "count"} <= set(kinds)
        assert ("trend" in kinds) == (table["chart"] == "line")
        for question, answer in turns:
            assert answer == _expected_chart_answer(question, table["categories"], table["values"]), question
        with Image.open(io.BytesIO(record["images"][0])) as img:
            assert img.format == "PNG" and img.size == (480, 360)
    bar = next(r for r in records if r["metadata"]["table"]["chart"] == "bar")
    seen = _read_back(ocr, bar["images"][0])
    table = bar["metadata"]["table"]
    for token in [table["title"], *table["categories"], *map(str, table["values"])]:
        assert re.sub(r"\s+", "", token).lower() in seen, (token, seen)


def test_table_transcription_and_lookups_match_the_cells(ocr):
    for index in range(4):
        record = table_record(3, index)
        table = record["metadata"]["table"]
        header, rows = table["header"], table["rows"]
        (first_q, transcript), *lookups = _turns(record)
        assert "Transcribe" in first_q
        assert transcript.split("\n") == [" | ".join(r) for r in [header, *rows]]
        by_item = {row[0]: dict(zip(header, row)) for row in rows}
        for question, answer in lookups:
            if m := re.fullmatch(r"What is the (\w+) of (\w+)\?", question):
                assert answer == by_item[m[2]][m[1]]
            elif m := re.fullmatch(r"Which item has the highest (\w+)\?", question):
                assert answer == max(by_item, key=lambda item: int(by_item[item][m[1]]))
            else:
                assert question.startswith("How many rows") and answer == str(len(rows))
    seen = _read_back(ocr, record["images"][0])
    cells = [cell for row in [header, *rows] for cell in row]
    assert sum(cell.lower() in seen for cell in cells) >= 0.9 * len(cells), seen


def test_ocr_images_hold_a_textbook_paragraph_that_ocr_reads_back(ocr):
    require_shared(TEXTBOOKS)
    record = ocr_record(11, 0)
    text = record["text"]
    with gzip.open(TEXTBOOKS, "rt", encoding="utf-8") as handle:
        book = next(row for row in map(json.loads, handle) if text in re.sub(r"[ \t]+", " ", row["text"]))
    assert book["metadata"]["source"] == record["metadata"]["book"]
    seen = _read_back(ocr, record["image"])
    words = [w for w in (re.sub(r"\W", "", w).lower() for w in text.split()) if w]
    found = sum(w in seen for w in words)
    assert found >= 0.8 * len(words), f"OCR read {found}/{len(words)} words: {seen}"


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if not p.name.startswith(".")}


def test_same_seed_same_bytes_and_a_rerun_redoes_only_missing_shards(tmp_path):
    args = ["synth-images", "--kind", "tables", "--count", "5", "--shard-records", "2", "--no-progress"]
    for name, workers in (("a", "1"), ("b", "2")):  # one process, or shards spread over two
        result = CliRunner().invoke(app, [*args, "--seed", "4", "--workers", workers, "--output", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert first == second and len([n for n in first if n.endswith(".parquet")]) == 3
    other = CliRunner().invoke(app, [*args, "--seed", "5", "--workers", "1", "--output", str(tmp_path / "c")])
    assert other.exit_code == 0
    assert set(_files(tmp_path / "c").values()).isdisjoint(v for n, v in first.items() if n.endswith(".parquet"))

    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    middle = tmp_path / "a" / manifest["shards"][1]["file"]
    middle.unlink()
    summary = generate(SynthConfig(kind="tables", seed=4, shard_records=2), 5, tmp_path / "a")
    assert (summary.shards_total, summary.shards_skipped) == (3, 2)
    assert _files(tmp_path / "a") == second

    table = pq.read_table(middle).to_pylist()
    assert [json.loads(r["metadata"])["index"] for r in table] == [2, 3]
    for row in table:
        assert row["image_ids"] == [image_id(b) for b in row["images"]]
    with pytest.raises(ValueError, match="another kind, seed or config"):
        generate(SynthConfig(kind="tables", seed=9, shard_records=2), 5, tmp_path / "a")


def test_ocr_shards_are_pairs_named_by_content(tmp_path):
    require_shared(TEXTBOOKS)
    generate(SynthConfig(kind="ocr", seed=2), 2, tmp_path)
    rows = pq.read_table(next(tmp_path.glob("ocr-*.parquet"))).to_pylist()
    assert len(rows) == 2
    for row in rows:
        assert row["image_id"] == image_id(row["image"]) and row["id"] == pair_id(row["image_id"], row["text"])
