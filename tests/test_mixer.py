"""The mixer: weights and token budgets, phases, unique vs repeated tokens, repetition warnings, determinism."""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest

from phi3data.tokenization.dataset import PackedDataset
from phi3data.tokenization.mixer import MixError, RepetitionWarning, build_mix, load_mix, parse_mix, report_table
from phi3data.tokenization.runner import TokenizeConfig, tokenize
from phi3data.tokenization.shards import open_shards

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    for p in (SHARED / "web/jsonl", SHARED / "quality/dclm_majority_labeled.jsonl"):
        if not p.exists():
            pytest.fail(f"missing {p}: these tests read the shared data in ../shared/data (see ../shared/README.md)")
    root = tmp_path_factory.mktemp("mix_sources")
    tokenize([SHARED / "web/jsonl"], root / "web", TokenizeConfig(), workers=1)
    tokenize([SHARED / "quality/dclm_majority_labeled.jsonl"], root / "dclm", TokenizeConfig(), workers=1)
    return {"web": root / "web", "dclm": root / "dclm"}


def _recipe(sources: dict[str, Path], web_tokens: int = 60_000) -> dict:
    return {"name": "test", "seed": 3, "max_epochs": 2.0, "shard_tokens": 100_000, "phases": [
        {"name": "phase1", "tokens": 300_000, "sources": [
            {"name": "dclm", "path": str(sources["dclm"]), "weight": 0.8},
            {"name": "web", "path": str(sources["web"]), "weight": 0.2}]},
        {"name": "phase2", "sources": [
            {"name": "dclm", "path": str(sources["dclm"]), "tokens": 200_000},
            {"name": "web", "path": str(sources["web"]), "tokens": web_tokens}]},
    ]}


def test_mix_budgets_epochs_and_outputs(tmp_path, sources):
    web_unique = sum(len(s.tokens) for s in open_shards(sources["web"]))
    dclm_unique = sum(len(s.tokens) for s in open_shards(sources["dclm"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reports = build_mix(parse_mix(_recipe(sources)), tmp_path / "mix")
    p1, p2 = reports
    rows1 = {r["source"]: r for r in p1["sources"]}
    rows2 = {r["source"]: r for r in p2["sources"]}
    assert rows1["dclm"]["budget"] == 240_000 and rows1["web"]["budget"] == 60_000
    for r in (*rows1.values(), *rows2.values()):
        assert r["tokens"] >= r["budget"]  # whole documents: at least the budget ...
        assert r["tokens"] - r["budget"] < 40_000  # ... and less than one more document over it
    assert rows1["web"]["unique_available"] == web_unique and rows1["dclm"]["unique_available"] == dclm_unique
    # phase 1 reads each source from the start: all new unless the budget exceeds the source
    assert rows1["web"]["new_unique"] == min(rows1["web"]["tokens"], web_unique)
    # phase 2 continues where phase 1 stopped, so repetition is cumulative
    consumed = rows1["web"]["tokens"] + rows2["web"]["tokens"]
    assert rows2["web"]["epochs"] == pytest.approx(consumed / web_unique, abs=1e-3)
    assert rows2["web"]["repeated"] == rows2["web"]["tokens"] - rows2["web"]["new_unique"]
    assert rows1["web"]["new_unique"] + rows2["web"]["new_unique"] == min(consumed, web_unique)
    flagged = {r["source"] for r in (*rows1.values(), *rows2.values()) if r["warning"]}
    assert flagged == {r["source"] for r in (*rows1.values(), *rows2.values()) if r["epochs"] > 2.0}
    assert len([w for w in caught if issubclass(w.category, RepetitionWarning)]) == sum(
        1 for r in (*rows1.values(), *rows2.values()) if r["warning"])
    for report in reports:
        out = tmp_path / "mix" / report["phase"]
        shards = open_shards(out)
        assert sum(len(s.tokens) for s in shards) == report["tokens"]
        assert sum(len(s) for s in shards) == report["documents"]
        assert len(PackedDataset(out, seq_len=128)) > 100
    assert report_table(p1).row_count == 2


def test_repetition_past_the_limit_warns(tmp_path, sources):
    web_unique = sum(len(s.tokens) for s in open_shards(sources["web"]))
    with pytest.warns(RepetitionWarning, match="web is repeated"):
        reports = build_mix(parse_mix(_recipe(sources, web_tokens=3 * web_unique)), tmp_path / "mix", dry_run=True)
    web = next(r for r in reports[1]["sources"] if r["source"] == "web")
    assert web["epochs"] > 2.0 and web["repeated"] > web_unique and web["warning"]
    assert not (tmp_path / "mix").exists()  # dry run writes nothing


def test_mix_is_deterministic(tmp_path, sources):
    recipe = parse_mix(_recipe(sources))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RepetitionWarning)
        build_mix(recipe, tmp_path / "a")
        build_mix(recipe, tmp_path / "b")
    for phase in ("phase1", "phase2"):
        a = [np.asarray(s.tokens) for s in open_shards(tmp_path / "a" / phase)]
        b = [np.asarray(s.tokens) for s in open_shards(tmp_path / "b" / phase)]
        assert len(a) == len(b) and all((x == y).all() for x, y in zip(a, b))


def test_bad_recipes_are_explained(sources):
    good = _recipe(sources)
    with pytest.raises(MixError, match="exactly one of weight or tokens"):
        parse_mix({"phases": [{"name": "p", "tokens": 10, "sources": [{"path": "x", "weight": 1, "tokens": 5}]}]})
    with pytest.raises(MixError, match="need the phase's total"):
        parse_mix({"phases": [{"name": "p", "sources": [{"path": "x", "weight": 1}]}]})
    with pytest.raises(MixError, match=r"epochs: unknown field"):
        parse_mix({**good, "epochs": 3})
    with pytest.raises(MixError, match=r"phases\.0\.sources\.0\.wieght: unknown field"):
        parse_mix({"phases": [{"name": "p", "tokens": 10, "sources": [{"path": "x", "wieght": 1}]}]})
    with pytest.raises(MixError, match="at least one"):
        parse_mix({"name": "x"})
    with pytest.raises(MixError, match="not a tokenized directory"):
        build_mix(parse_mix({"phases": [{"name": "p", "sources": [{"path": "/nonexistent", "tokens": 5}]}]}),
                  Path("/tmp/unused"), dry_run=True)


def test_example_recipes_parse():
    recipes = sorted((ROOT / "mixes").glob("*.toml"))
    assert recipes, "mixes/ should hold example mix recipes"
    for path in recipes:
        recipe = load_mix(path)
        assert recipe.phases and tomllib.loads(path.read_text())["name"] == recipe.name


def test_chat_and_plain_sources_in_one_phase_are_refused(tmp_path, sources):
    """Mixing masked (SFT) and unmasked shards would drop the loss mask silently; the mixer says so instead."""
    import json

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."},
                                                      {"role": "assistant", "content": str(i)}]}) + "\n"
                            for i in range(50)))
    tokenize([chat], tmp_path / "chat", TokenizeConfig(chat=True), workers=1)
    recipe = {"name": "sft", "seed": 0, "phases": [{"name": "p", "sources": [
        {"name": "chat", "path": str(tmp_path / "chat"), "weight": 0.5},
        {"name": "web", "path": str(sources["web"]), "weight": 0.5}], "tokens": 2_000}]}
    with pytest.raises(MixError, match="loss mask"):
        build_mix(parse_mix(recipe), tmp_path / "mix")


def test_mix_does_not_depend_on_where_the_data_lies(tmp_path, sources):
    """The shuffle is seeded by source name and content: the same token directories copied elsewhere give the same
    mix, byte for byte (it used to be seeded by the absolute path)."""
    import shutil

    moved = {name: Path(shutil.copytree(path, tmp_path / "elsewhere" / name)) for name, path in sources.items()}
    here = build_mix(parse_mix(_recipe(sources)), tmp_path / "mix_here")
    there = build_mix(parse_mix(_recipe(moved)), tmp_path / "mix_there")
    assert [r["documents"] for r in here] == [r["documents"] for r in there]
    for phase in ("phase1", "phase2"):
        a, b = open_shards(tmp_path / "mix_here" / phase), open_shards(tmp_path / "mix_there" / phase)
        assert [s.stem.name for s in a] == [s.stem.name for s in b]
        assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(a, b, strict=True))
    # a different source name is a different stream
    renamed = _recipe(sources)
    renamed["phases"][0]["sources"][1]["name"] = "web2"
    renamed["phases"][1]["sources"][1]["name"] = "web2"
    other = build_mix(parse_mix(renamed), tmp_path / "mix_renamed")
    first = open_shards(tmp_path / "mix_here" / "phase1")[0].tokens
    assert not np.array_equal(first, open_shards(tmp_path / "mix_renamed" / "phase1")[0].tokens) or \
        [r["documents"] for r in other] != [r["documents"] for r in here]
