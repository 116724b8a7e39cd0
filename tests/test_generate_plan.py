"""Generation plans on the real data: deterministic expansion, quotas, template hashes, refusals, seed rejects."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import JSONL_DIR, ROOT, SHARED, require_shared

from phi3data.config import ConfigError
from phi3data.generators.plan import cell_key, estimate, expand, load_plan, sample_prompts

PLAN = ROOT / "generators" / "textbooks.toml"
SERVER = "http://127.0.0.1:8080/v1"
OPENSTAX = SHARED / "textbooks" / "openstax.jsonl.gz"
GSM8K = SHARED / "eval" / "gsm8k" / "train.jsonl.gz"


@pytest.fixture(scope="module")
def web_run(tmp_path_factory) -> Path:
    """A real `phi3data run` output: pipelines/web_quality.toml over the shared JSONL web documents."""
    from phi3data.pipelines.recipe import load_recipe
    from phi3data.pipelines.runner import run_pipeline

    out = tmp_path_factory.mktemp("web_run")
    run_pipeline(load_recipe(ROOT / "pipelines" / "web_quality.toml"), require_shared(JSONL_DIR), out,
                 engine="local", workers=1, progress=False)
    return out / "data"


def keys(expansion) -> list[str]:
    return [r.key(SERVER, expansion.plan.model) for r in expansion.requests]


def copy_recipes(dest: Path) -> Path:
    """generators/ copied elsewhere (so its templates can be edited); returns the copied textbooks plan."""
    shutil.copytree(ROOT / "generators", dest / "generators")
    return dest / "generators" / "textbooks.toml"


def write_plan(folder: Path, seeds: str, templates: dict[str, str], head: str = "") -> Path:
    """A small plan in ``folder`` with one template file per style."""
    (folder / "t").mkdir(parents=True, exist_ok=True)
    for style, text in templates.items():
        (folder / "t" / f"{style}.j2").write_text(text, encoding="utf-8")
    styles = "\n".join(f'{style} = "t/{style}.j2"' for style in templates)
    plan = folder / "plan.toml"
    plan.write_text(f'name = "small"\nmodel = "m"\nseed = 3\n{head}\n[sampling]\nmax_tokens = 64\n\n'
                    f'[styles]\n{styles}\n\n[audiences]\nkids = "young children"\nexperts = "researchers"\n\n{seeds}',
                    encoding="utf-8")
    return plan


def test_textbooks_plan_is_deterministic_covers_every_cell_and_ignores_cwd(web_run, tmp_path, monkeypatch):
    plan = load_plan(PLAN)
    exp = expand(plan, seed_paths={"web": web_run})
    assert [r.index for r in exp.requests] == list(range(len(exp.requests)))
    assert 100 <= len(exp.requests) <= 300  # small enough for a 135M model on a CPU
    assert exp.seed_rejects == {} and exp.seeds_read["openstax"] == 919 and exp.seeds_read["web"] == 49
    # every cell of both matrices is there with its quota
    counts = Counter(cell_key(r.cell) for r in exp.requests)
    assert counts == Counter(exp.cells)
    web_cells = {k for k in exp.cells if k.startswith("web/")}
    assert len(web_cells) == 4 * 3 and all(exp.cells[k] == 8 for k in web_cells)
    books = {r.cell["topic"] for r in exp.requests if r.cell["source"] == "openstax"}
    assert len(books) == 6 and all(b.startswith("openstax/") for b in books)
    assert sum(v for k, v in exp.cells.items() if k.startswith("openstax/")) == 6 * 2 * 2 * 2
    # within a cell, the drawn seeds differ while the pool lasts; every request has its own sampling seed
    for cell in web_cells:
        ids = [r.seed_id for r in exp.requests if cell_key(r.cell) == cell]
        assert len(set(ids)) == len(ids)
    assert len({r.params["seed"] for r in exp.requests}) == len(exp.requests)
    assert all(r.params["max_tokens"] == 320 and r.messages[0]["role"] == "system" for r in exp.requests)
    first_openstax = next(r for r in exp.requests if r.cell["source"] == "openstax")
    assert first_openstax.extra["title"] in first_openstax.messages[-1]["content"]
    assert "- " in first_openstax.messages[-1]["content"]  # the outline's headings

    again = expand(load_plan(PLAN), seed_paths={"web": web_run})
    assert keys(again) == keys(exp)
    # from another working directory, with the recipes copied elsewhere: the same requests
    moved = copy_recipes(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path)
    assert keys(expand(load_plan(moved), seed_paths={"web": web_run})) == keys(exp)

    reseeded = moved.read_text(encoding="utf-8").replace("seed = 20240422", "seed = 7")
    moved.write_text(reseeded, encoding="utf-8")
    other = expand(load_plan(moved), seed_paths={"web": web_run})
    assert Counter(cell_key(r.cell) for r in other.requests) == counts
    assert [r.seed_id for r in other.requests] != [r.seed_id for r in exp.requests]
    assert [r.params["seed"] for r in other.requests] != [r.params["seed"] for r in exp.requests]


def test_seed_path_comes_from_the_plan_root_or_base_dir(web_run, tmp_path):
    plan = load_plan(PLAN)
    with pytest.raises(ConfigError, match=r"textbooks.toml:\d+: seeds\[0\].path: seed data not found.*--seed web="):
        expand(plan, base_dir=tmp_path)
    (tmp_path / "out" / "quickstart" / "web_quality").mkdir(parents=True)
    shutil.copytree(web_run, tmp_path / "out" / "quickstart" / "web_quality" / "data")
    via_base = expand(plan, base_dir=tmp_path)
    assert keys(via_base) == keys(expand(plan, seed_paths={"web": web_run}))
    with pytest.raises(ConfigError, match="no seed source named webb"):
        expand(plan, seed_paths={"webb": web_run})


def test_changed_template_changes_hash_and_keys_of_its_requests(web_run, tmp_path):
    moved = copy_recipes(tmp_path)
    before = expand(load_plan(moved), seed_paths={"web": web_run})
    wikihow = moved.parent / "templates" / "wikihow.j2"
    wikihow.write_text(wikihow.read_text(encoding="utf-8") + "Keep each step short.\n", encoding="utf-8")
    after = expand(load_plan(moved), seed_paths={"web": web_run})
    assert len(after.requests) == len(before.requests)
    changed = 0
    for old, new in zip(before.requests, after.requests, strict=True):
        assert old.cell == new.cell and old.seed_id == new.seed_id
        if old.cell["style"] == "wikihow":
            changed += 1
            assert new.template_hash != old.template_hash and new.template_id == old.template_id == "wikihow"
            assert new.key(SERVER, "m") != old.key(SERVER, "m")
        else:
            assert new.key(SERVER, "m") == old.key(SERVER, "m")
    assert changed == 3 * 8


def test_estimate_and_sample_match_the_expansion(web_run):
    exp = expand(load_plan(PLAN), seed_paths={"web": web_run})
    est = estimate(exp, chars_per_token=4.0, price_in_per_m=1.0, price_out_per_m=2.0)
    assert est["prompts"] == len(exp.requests)
    assert est["max_completion_tokens"] == 320 * len(exp.requests)
    expected_in = sum(math.ceil(sum(len(m["content"]) for m in r.messages) / 4.0) for r in exp.requests)
    assert est["prompt_tokens"] == expected_in
    assert est["cost"] == pytest.approx(expected_in / 1e6 + 2 * 320 * len(exp.requests) / 1e6)
    assert {k: v["prompts"] for k, v in est["cells"].items()} == exp.cells
    assert sum(v["prompt_tokens"] for v in est["cells"].values()) == expected_in
    sample = sample_prompts(exp, 5)
    assert [r.index for r in sample] == [r.index for r in sample_prompts(exp, 5)]
    assert len({r.index for r in sample}) == 5 and {r.cell["source"] for r in sample} == {"web", "openstax"}


def test_gsm8k_problems_with_gold_answers_and_quotas(tmp_path):
    seeds = (f'[[seeds]]\nname = "gsm8k"\nkind = "problems"\npath = "{GSM8K}"\ntopic = "grade-school math"\n'
             'styles = ["worked"]\naudiences = ["kids", "experts"]\nquota = 3\nlimit = 200\n'
             '[seeds.quotas]\n"grade-school math/experts/worked" = 5\n')
    plan = write_plan(tmp_path, seeds, {"worked": "Solve for {{ audience }}, step by step:\n{{ question }}\n"})
    exp = expand(load_plan(plan))
    assert exp.cells == {"gsm8k/grade-school math/kids/worked": 3, "gsm8k/grade-school math/experts/worked": 5}
    assert exp.seeds_read == {"gsm8k": 200} and len(exp.requests) == 8
    assert len({r.seed_id for r in exp.requests}) == 8  # 200 problems: no problem twice
    for req in exp.requests:
        assert req.seed_text in req.messages[-1]["content"]
        assert req.extra["gold_final"].replace(",", "").lstrip("-").isdigit()
        assert req.extra["gold_answer"].endswith(req.extra["gold_final"])


def test_malformed_seed_records_are_counted_not_dropped_silently(tmp_path):
    with gzip.open(GSM8K, "rt", encoding="utf-8") as handle:
        lines = [next(handle).rstrip("\n") for _ in range(4)]
    broken = lines[:2] + ['{"question": "half a line', json.dumps({"question": "no answer here"}), "[1, 2]"] + lines[2:]
    seed_file = tmp_path / "problems.jsonl"
    seed_file.write_text("\n".join(broken) + "\n", encoding="utf-8")
    seeds = ('[[seeds]]\nname = "p"\nkind = "problems"\npath = "problems.jsonl"\ntopic = "math"\n'
             'styles = ["worked"]\naudiences = ["kids"]\nquota = 4\n')
    plan = write_plan(tmp_path, seeds, {"worked": "{{ question }}"})
    exp = expand(load_plan(plan))
    assert exp.seed_rejects == {"malformed_json": 1, "missing_answer": 1, "malformed_record": 1}
    assert exp.source_rejects == {"p": exp.seed_rejects} and exp.seeds_read == {"p": 4}
    assert len({r.seed_id for r in exp.requests}) == 4
    assert estimate(exp)["seed_rejects"] == exp.seed_rejects


def test_topic_list_seeds_one_cell_per_topic(tmp_path):
    (tmp_path / "topics.txt").write_text("# topics\nphotosynthesis\nvolcanoes\n\nfractions\nvolcanoes\n")
    seeds = ('[[seeds]]\nname = "topics"\nkind = "topics"\npath = "topics.txt"\nstyles = ["lesson"]\n'
             'audiences = ["kids", "experts"]\nquota = 2\n')
    plan = write_plan(tmp_path, seeds, {"lesson": "Teach {{ topic }} to {{ audience }}."})
    exp = expand(load_plan(plan))
    assert sorted({r.cell["topic"] for r in exp.requests}) == ["fractions", "photosynthesis", "volcanoes"]
    assert len(exp.requests) == 3 * 2 * 2
    assert exp.requests[0].messages == ({"role": "user", "content": "Teach fractions to young children."},)
    assert len({r.key(SERVER, "m") for r in exp.requests}) == len(exp.requests)  # repeats differ by their seed


def refused(tmp_path: Path, seeds: str, templates: dict[str, str], head: str = "") -> str:
    plan = write_plan(tmp_path, seeds, templates, head)
    with pytest.raises(ConfigError) as err:
        expand(load_plan(plan))
    return str(err.value)


TOPICS = '[[seeds]]\nname = "s"\nkind = "topics"\ntopics = ["a", "b"]\naudiences = ["kids"]\n'


def test_unknown_style_is_refused_with_file_line_and_field(tmp_path):
    msg = refused(tmp_path, TOPICS + 'styles = ["lesson", "wikihw"]\n', {"lesson": "{{ topic }}"})
    line = (tmp_path / "plan.toml").read_text().splitlines().index('styles = ["lesson", "wikihw"]') + 1
    assert msg.startswith(f"{tmp_path / 'plan.toml'}:{line}: seeds[0].styles: unknown style 'wikihw'")


def test_empty_cell_is_refused(tmp_path):
    seeds = (f'[[seeds]]\nname = "books"\nkind = "outlines"\npath = "{OPENSTAX}"\ntopic_field = "metadata.source"\n'
             'topics = ["openstax/us-history", "openstax/chemistry"]\nstyles = ["lesson"]\naudiences = ["kids"]\n')
    msg = refused(tmp_path, seeds, {"lesson": "{{ extract }}"})
    line = (tmp_path / "plan.toml").read_text().splitlines().index(
        'topics = ["openstax/us-history", "openstax/chemistry"]') + 1
    assert msg.startswith(f"{tmp_path / 'plan.toml'}:{line}: seeds[0].topics: empty cell")
    assert "'openstax/chemistry'" in msg
    msg = refused(tmp_path / "q", TOPICS + 'styles = ["lesson"]\n[seeds.quotas]\n"a/kids/lesson" = 0\n',
                  {"lesson": "{{ topic }}"})
    assert "seeds[0].quotas: empty cell 'a/kids/lesson'" in msg and "plan.toml:" in msg


def test_missing_template_variable_names_the_template_line(tmp_path):
    msg = refused(tmp_path, TOPICS + 'styles = ["lesson"]\n',
                  {"lesson": "Teach {{ topic }}\nto {{ audience }},\nusing {{ extract }}."})
    assert msg.startswith(f"{tmp_path / 't' / 'lesson.j2'}:3: styles.lesson: template variable 'extract'")
    assert "seeds[0] (s, kind topics)" in msg


def test_broken_template_syntax_names_the_template_line(tmp_path):
    broken = "Teach {{ topic }}\n{% if audience %}\n{{ }\n"
    msg = refused(tmp_path, TOPICS + 'styles = ["lesson"]\n', {"lesson": broken})
    assert msg.startswith(f"{tmp_path / 't' / 'lesson.j2'}:3: styles.lesson: template does not parse")


def test_plan_never_holds_a_server_or_key(tmp_path):
    msg = refused(tmp_path, TOPICS + 'styles = ["lesson"]\n', {"lesson": "{{ topic }}"},
                  head='base_url = "http://127.0.0.1:8080/v1"')
    assert "plan.toml:4: base_url: a plan holds no server" in msg
    msg = refused(tmp_path / "x", TOPICS + 'styles = ["lesson"]\nquota = 0\n', {"lesson": "{{ topic }}"})
    assert "seeds.0.quota" in msg


def test_system_prompt_and_json_schema_travel_with_each_request(tmp_path):
    schema = {"type": "object", "properties": {"lesson": {"type": "string"}}, "required": ["lesson"]}
    (tmp_path / "lesson.schema.json").write_text(json.dumps(schema), encoding="utf-8")
    head = 'system = "You teach."\nschema = "lesson.schema.json"'
    plan = load_plan(write_plan(tmp_path, TOPICS + 'styles = ["lesson"]\n', {"lesson": "{{ topic }}"}, head))
    exp = expand(plan)
    assert [r.messages[0] for r in exp.requests] == [{"role": "system", "content": "You teach."}] * 2
    assert all(r.schema == schema for r in exp.requests)
    inline = write_plan(tmp_path / "inline", TOPICS + 'styles = ["lesson"]\n', {"lesson": "{{ topic }}"},
                        'schema = { type = "object", properties = { lesson = { type = "string" } } }')
    assert keys(expand(load_plan(inline))) != keys(exp)
    assert expand(load_plan(inline)).requests[0].schema == {"type": "object",
                                                             "properties": {"lesson": {"type": "string"}}}
