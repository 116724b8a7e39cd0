"""Post-generation stages for synthetic corpora (synthetic_cleanup, truncated, regurgitation) and the
pipelines/synthetic.toml recipe, on generations built from real OpenStax sections."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, SHARED, require_shared

from phi3data.documents import make_batch
from phi3data.pipelines import as_arrow_udf
from phi3data.pipelines.recipe import RecipeError, load_recipe
from phi3data.pipelines.runner import run_pipeline
from phi3data.pipelines.stages.synthetic import clean_reply, provenance

OPENSTAX = SHARED / "textbooks" / "openstax.jsonl.gz"
RECIPE = ROOT / "pipelines" / "synthetic.toml"
SEED_ID = "openstax/anatomy-physiology/m45986"  # "Functions of Human Life"
COPIED_IDS = ("openstax/introduction-philosophy/m00003", "openstax/us-history/m50015",
              "openstax/principles-economics-bundle/m57413")
# A hand-written paraphrase of the seed's "A human body consists of trillions of cells ..." paragraph.
PARAPHRASE = (
    "Your body is made of trillions of cells, and they are arranged so that separate compartments stay apart "
    "inside it. Those compartments shield cells from dangers in the outside world and keep them wet and fed. "
    "They also keep the fluids inside you away from the huge numbers of microbes living on your surfaces, such "
    "as the lining of tubes that open to the outside. Your gut, for instance, holds more bacteria than there are "
    "human cells in your whole body. Even so, those bacteria count as outside the body, and they must not be "
    "allowed to move freely through it.")


@pytest.fixture(scope="module")
def sections() -> dict[str, str]:
    with gzip.open(require_shared(OPENSTAX), "rt") as f:
        return {row["id"]: row["text"] for row in map(json.loads, f)}


@pytest.fixture(scope="module")
def seed(sections) -> str:
    return sections[SEED_ID]


@pytest.fixture(scope="module")
def seed_paragraph(seed) -> str:
    return next(p for p in seed.split("\n\n") if p.startswith("A human body consists of trillions of cells"))


def longest_paragraph(text: str) -> str:
    return max(text.split("\n\n"), key=len).strip()


def run_stage(stage_spec: dict, batch: pa.Table):
    recipe = load_recipe({"pipeline": {"name": "t"}, "stage": [stage_spec]})
    return recipe.build_stages()[0].process(batch)


# --- synthetic_cleanup --------------------------------------------------------------------------------------


def test_cleanup_leaves_real_textbook_sections_unchanged(sections):
    # no false positives on 919 real OpenStax sections (one starts "Great Awakening ...", one has "Feel free to
    # experiment with this code" at a paragraph's end)
    assert len(sections) > 900
    changed = [doc_id for doc_id, text in sections.items() if clean_reply(text) != text.strip()]
    assert changed == []


@pytest.mark.parametrize("reply", [
    "Sure! Here is a textbook section about the functions of human life for high-school students:\n\n{p}",
    "Certainly, here's a course unit on body organization:\n\n{p}\n\nI hope this helps!",
    "Of course!\nHere is the rewritten passage:\n\n---\n\n{p}\n\n---\n\nLet me know if you'd like any changes.",
    "As an AI language model, I cannot examine a human body. {p}",
    "I'd be happy to write that section for you.\n\n{p}\n\nIf you have any other questions, feel free to ask!",
    "Title: Organization of the Human Body\n\n# Organization of the Human Body\n\n{p}",
    "Absolutely! {p} I hope this helps you understand how the body is organized.",
    "Here's a lesson for college students on how cells are organized:\n{p}\nHappy learning!\nGood luck with your "
    "exam!",
])
def test_cleanup_strips_formulaic_openings_and_closings(reply, seed_paragraph):
    expected = seed_paragraph
    if reply.startswith("Title:"):
        expected = f"# Organization of the Human Body\n\n{seed_paragraph}"
    assert clean_reply(reply.format(p=seed_paragraph)) == expected


def test_cleanup_keeps_content_that_only_looks_formulaic(seed_paragraph):
    # a list introduced by "Here are ..." that names no reply ("section", "lesson" ...) is content
    laws = "Here are the three laws of motion:\n\n1. An object at rest stays at rest."
    assert clean_reply(laws) == laws
    # an interjection without "!" opens a real sentence
    assert clean_reply(f"Certainly, {seed_paragraph}") == f"Certainly, {seed_paragraph}"
    # a title label that the next line does not restate keeps the title
    assert clean_reply(f"Title: Organization\n\n{seed_paragraph}") == f"Organization\n\n{seed_paragraph}"


def test_cleanup_stage_replaces_texts_and_drops_empty_replies(seed_paragraph):
    batch = make_batch([
        {"id": "a", "text": f"Sure! Here is the section:\n\n{seed_paragraph}\n\nNote: this is a fictional example."},
        {"id": "b", "text": "Sure! Here is the section you asked for:\n\nI hope this helps!"},
        {"id": "c", "text": "As an AI language model, I cannot write about real patients."},
        {"id": "d", "text": seed_paragraph},
    ])
    out = run_stage({"type": "synthetic_cleanup", "extra_patterns": [r"^Note: this is a fictional.*$"]}, batch)
    assert out.batch.column("id").to_pylist() == ["a", "d"]
    assert out.batch.column("text").to_pylist() == [seed_paragraph, seed_paragraph]
    assert dict(out.drops) == {"synthetic_cleanup:empty_after_cleanup": 2}


def test_cleanup_bad_pattern_is_a_recipe_error():
    with pytest.raises(RecipeError, match="extra_patterns"):
        load_recipe({"pipeline": {"name": "t"}, "stage": [{"type": "synthetic_cleanup", "extra_patterns": ["("]}]})


# --- truncated ----------------------------------------------------------------------------------------------


def generated(doc_id: str, text: str, finish_reason: str = "stop", seed_text: str | None = None) -> dict:
    """A row as `phi3data generate` writes it."""
    return {"id": doc_id, "text": text, "url": None, "source": "generate:textbooks",
            "metadata": {"finish_reason": finish_reason, "seed_text": seed_text, "template_id": "textbook_section",
                         "cell": {"topic": "human anatomy", "audience": "high school", "style": "textbook"}}}


def test_truncated_drops_or_counts(seed_paragraph):
    batch = make_batch([generated("a", seed_paragraph), generated("b", seed_paragraph, finish_reason="length"),
                        {"id": "c", "text": seed_paragraph}, generated("d", PARAPHRASE, finish_reason="length")])
    dropped = run_stage({"type": "truncated"}, batch)
    assert dropped.batch.column("id").to_pylist() == ["a", "c"]
    assert dict(dropped.drops) == {"truncated:truncated": 2}
    counted = run_stage({"type": "truncated", "action": "count"}, batch)
    assert counted.batch.column("id").to_pylist() == ["a", "b", "c", "d"]
    assert counted.batch.column("truncated").to_pylist() == [False, True, False, True]
    assert not counted.drops


# --- regurgitation ------------------------------------------------------------------------------------------


def test_regurgitation_copy_vs_paraphrase(seed, seed_paragraph):
    first_sentence = seed_paragraph.split(". ")[0] + "."
    shouted = seed_paragraph.upper().replace(",", " ;").replace("—", " - ").replace(".", "!")
    batch = make_batch([
        generated("copy", seed_paragraph, seed_text=seed),
        generated("copy_case_punct", shouted, seed_text=seed),  # case and punctuation do not hide a copy
        generated("paraphrase", PARAPHRASE, seed_text=seed),
        generated("one_sentence_quoted", f"{PARAPHRASE} {first_sentence}", seed_text=seed),
        generated("no_seed", seed_paragraph),
        generated("copy_of_other_seed", seed_paragraph, seed_text=PARAPHRASE),
    ])
    out = run_stage({"type": "regurgitation"}, batch)
    assert out.batch.column("id").to_pylist() == ["paraphrase", "one_sentence_quoted", "no_seed",
                                                  "copy_of_other_seed"]
    assert dict(out.drops) == {"regurgitation:regurgitated": 2}
    assert out.batch.schema.field("seed_overlap").type == pa.float64()
    overlap = dict(zip(out.batch.column("id").to_pylist(), out.batch.column("seed_overlap").to_pylist()))
    assert overlap["paraphrase"] == 0.0
    assert 0.0 < overlap["one_sentence_quoted"] < 0.3
    assert overlap["no_seed"] is None
    assert overlap["copy_of_other_seed"] == 0.0
    # every row keeps its overlap when nothing is dropped; the copies overlap fully
    kept_all = run_stage({"type": "regurgitation", "max_overlap": 1.0}, batch)
    assert kept_all.batch.column("seed_overlap").to_pylist()[:2] == [1.0, 1.0]


def test_regurgitation_n_sets_the_run_length(seed, seed_paragraph):
    # a paraphrase shares short phrases with its seed, which 3-grams count and 8-grams do not
    batch = make_batch([generated("paraphrase", PARAPHRASE, seed_text=seed)])
    short = run_stage({"type": "regurgitation", "n": 3, "max_overlap": 1.0}, batch)
    default = run_stage({"type": "regurgitation", "max_overlap": 1.0}, batch)
    assert short.batch.column("seed_overlap")[0].as_py() > 0.0
    assert default.batch.column("seed_overlap")[0].as_py() == 0.0


def test_provenance_reads_generate_and_reader_shapes():
    inner = {"finish_reason": "length", "seed_text": "x"}
    assert provenance(json.dumps(inner)) == inner
    # a Parquet input read by `phi3data run` nests the metadata column's JSON under "metadata"
    nested = provenance(json.dumps({"metadata": json.dumps(inner), "source": "generate:textbooks"}))
    assert nested == {**inner, "source": "generate:textbooks"}
    assert provenance(None) == {} and provenance("not json") == {} and provenance("[1]") == {}


# --- the recipe ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generate_output(tmp_path_factory, sections, seed, seed_paragraph):
    """Two Parquet shards in generate's output schema, and the ids the recipe should keep."""
    other = sections["openstax/introduction-python-programming/m00002"]
    rows = [
        generated("para", f"Certainly! Here's a lesson on how the body is organized:\n\n{PARAPHRASE}\n\n"
                          "I hope this helps!", seed_text=seed),
        generated("quoted", f"{PARAPHRASE} {seed_paragraph.split('. ')[0]}.", seed_text=seed),
        generated("no_seed", f"Sure! Here is a section for beginners:\n\n{longest_paragraph(other)}"),
        generated("copy", f"Sure! Here is a textbook section about the human body:\n\n{seed_paragraph}\n\n"
                          "Let me know if you want exercises.", seed_text=seed),
        generated("truncated", PARAPHRASE, finish_reason="length", seed_text=seed),
        generated("empty", "Sure! Here is the section you asked for:\n\nI hope this helps!", seed_text=seed),
        generated("short", "Here is a short story:\n\nThe cell divides in two.", seed_text=seed),
    ]
    rows += [generated(f"copy:{doc_id}", longest_paragraph(sections[doc_id]), seed_text=sections[doc_id])
             for doc_id in COPIED_IDS]
    for row in rows:
        assert len(row["text"].split()) > 50 or row["id"] in ("empty", "short")
    root = tmp_path_factory.mktemp("generated")
    (root / "data").mkdir()
    batch = make_batch(rows)
    pq.write_table(batch.slice(0, 5), root / "data" / "shard-00000.parquet")
    pq.write_table(batch.slice(5), root / "data" / "shard-00001.parquet")
    return root / "data", ["no_seed", "para", "quoted"]


def test_synthetic_recipe_on_the_local_engine(tmp_path, generate_output, sections):
    input_dir, kept_ids = generate_output
    summary = run_pipeline(load_recipe(RECIPE), input_dir, tmp_path / "out", engine="local", workers=1,
                           progress=False)
    kept = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "out" / "data").glob("*.parquet")))
    kept = kept.sort_by("id")
    assert kept.column("id").to_pylist() == kept_ids
    texts = dict(zip(kept.column("id").to_pylist(), kept.column("text").to_pylist()))
    assert texts["para"] == PARAPHRASE  # the reply's opening and closing were stripped
    assert texts["no_seed"] == longest_paragraph(sections["openstax/introduction-python-programming/m00002"])
    # the provenance survives the reader (which nests generate's metadata JSON one level down)
    assert [provenance(m)["finish_reason"] for m in kept.column("metadata").to_pylist()] == ["stop"] * 3
    assert kept.column("seed_overlap").to_pylist()[0] is None  # no_seed
    drops = {}
    for stage in summary.stats["stages"]:
        drops.update(stage["drops"])
    assert drops == {"synthetic_cleanup:empty_after_cleanup": 1, "truncated:truncated": 1,
                     "regurgitation:regurgitated": 4, "length:too_few_words": 1}
    assert summary.stats["documents_read"] == 10 and summary.stats["documents_out"] == 3


def test_synthetic_recipe_as_arrow_udf_matches_the_runner(tmp_path, generate_output):
    input_dir, kept_ids = generate_output
    run_pipeline(load_recipe(RECIPE), input_dir, tmp_path / "out", engine="local", workers=1, progress=False)
    runner = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "out" / "data").glob("*.parquet")))
    runner = runner.sort_by("id")
    udf = as_arrow_udf(RECIPE)
    table = pa.concat_tables(pq.read_table(p) for p in sorted(input_dir.glob("*.parquet")))
    in_process = udf(table).sort_by("id")
    assert in_process.column("id").to_pylist() == kept_ids
    for column in ("id", "text", "seed_overlap"):
        assert in_process.column(column).to_pylist() == runner.column(column).to_pylist()
    assert "seed_overlap" in udf.output_schema().names
