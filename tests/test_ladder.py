"""Ablation ladder end to end on real text at toy scale: data split, tokenizer, training, evaluation, report,
and a kill -9 in the middle followed by a resume that gives exactly the uninterrupted results. The toy ladder
takes one size from a model recipe file, sets trainer options in [train] and reads a source with bad lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, SHARED

LADDER = """
[ladder]
name = "toy"
seeds = [0]
tokens_per_param = 1
min_tokens = 12_000
seq_len = 64
micro_batch_size = 8
lr = 3e-3

[tokenizer]
train_vocab = 512
sample_chars = 2_000_000

[sizes.a]
hidden_size = 16
num_hidden_layers = 1
num_attention_heads = 2
intermediate_size = 32

[sizes]
b = "toy-sizes:b"

[recipes.web]
sources = ["{web}", "{bad}"]

[recipes.textbooks]
sources = ["{books}"]

[eval]
tasks = ["arc_easy", "piqa"]
limit = 12
val_fraction = 0.1
val_max_docs = 20

[train]
grad_accum = 2
ckpt_every = 4
"""

SIZES = """
[sizes.b]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
intermediate_size = 64
tie_word_embeddings = true
"""

# two good documents, a line that is not JSON and a record without text
BAD_SOURCE = "\n".join([
    json.dumps({"id": "bad-source-1", "text": "Plants make sugar from light, water and carbon dioxide. " * 20}),
    '{"id": "bad-source-2", "text": "cut off',
    json.dumps({"id": "bad-source-3", "title": "no text field"}),
    json.dumps({"id": "bad-source-4", "text": "Water boils at a lower temperature high in the mountains. " * 20}),
]) + "\n"


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "ladder.toml"
    (tmp_path / "toy-sizes.toml").write_text(SIZES)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(BAD_SOURCE)
    path.write_text(LADDER.format(web=SHARED / "web" / "jsonl", books=SHARED / "textbooks" / "openstax.jsonl.gz",
                                  bad=bad))
    return path


def _ablate(config: Path, out: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "phi3data.cli", "ablate", str(config), "--output", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _results(out: Path) -> dict[str, dict]:
    found = {}
    for path in sorted((out / "runs").rglob("result.json")):
        r = json.loads(path.read_text())
        found[r["run"]] = {"validation": r["validation"], "tasks": r["tasks"], "tokens": r["tokens"]}
    return found


@pytest.fixture(scope="module")
def full_ladder(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ladder")
    out = tmp / "full"
    proc = _ablate(_config(tmp), out)
    stdout, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, stdout
    return out


def test_ladder_trains_evaluates_and_reports(full_ladder):
    plan = json.loads((full_ladder / "plan.json").read_text())
    assert len(plan["runs"]) == 4 and plan["vocab_size"] == 512
    results = _results(full_ladder)
    assert set(results) == {"web/a/seed0", "web/b/seed0", "textbooks/a/seed0", "textbooks/b/seed0"}
    for run in results.values():
        assert 0 < run["validation"]["bits_per_byte"] < 8
        for task in run["tasks"].values():
            assert task["n"] == 12 and len(task["p_gold"]) == 12
            assert all(0 <= p <= 1 for p in task["p_gold"]) and len(set(task["p_gold"])) > 1
    # the validation set is shared and held out of every recipe's training text
    val = {json.loads(line)["id"] for line in (full_ladder / "data" / "validation.jsonl").open()}
    for recipe in ("web", "textbooks"):
        train = {json.loads(line)["id"] for line in (full_ladder / "data" / recipe / "train.jsonl").open()}
        assert val and not (val & train)
    report = (full_ladder / "report.md").read_text()
    assert "byte-level BPE with 512 tokens" in report and "## Verdict" in report
    assert "textbooks vs web" in report
    for png in ("scaling_benchmark.png", "scaling_bits_per_byte.png"):
        assert (full_ladder / png).read_bytes()[:4] == b"\x89PNG"
    fits = json.loads((full_ladder / "fits.json").read_text())
    assert set(fits["benchmark"]) == {"web", "textbooks"}


def test_ladder_counts_unreadable_source_records(full_ladder):
    plan = json.loads((full_ladder / "plan.json").read_text())
    assert plan["data"]["recipes"]["web"]["rejects"] == {"malformed_json": 1, "missing_text": 1}
    assert plan["data"]["recipes"]["textbooks"]["rejects"] == {}
    ids = set()
    for name in ("web/train.jsonl", "validation.jsonl"):
        ids |= {json.loads(line)["id"] for line in (full_ladder / "data" / name).open()}
    assert {"bad-source-1", "bad-source-4"} <= ids and not {"bad-source-2", "bad-source-3"} & ids
    report = (full_ladder / "report.md").read_text()
    assert "unreadable source records, skipped: web: malformed_json 1, missing_text 1; textbooks: none" in report


def test_ladder_train_table_reaches_the_trainer(full_ladder):
    """[train] grad_accum and ckpt_every are in every run's saved trainer config, and the token budget counts the
    accumulated micro-batches (8 sequences x 64 tokens x 2 per step)."""
    plan = json.loads((full_ladder / "plan.json").read_text())
    for run in plan["runs"]:
        assert run["tokens"] == run["steps"] * 8 * 64 * 2
        states = sorted((full_ladder / "runs" / run["run"] / "checkpoints").glob("step_*/state.json"))
        saved = json.loads(states[-1].read_text())["train_config"]
        assert saved["grad_accum"] == 2 and saved["ckpt_every"] == 4 and saved["max_steps"] == run["steps"]
    assert "trainer settings: ckpt_every = 4, grad_accum = 2" in (full_ladder / "report.md").read_text()


def test_ladder_evaluates_on_its_device(full_ladder):
    """device = "auto" trains and evaluates on the GPU when there is one, else on the CPU."""
    import torch

    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    for path in (full_ladder / "runs").glob("*/*/*/result.json"):
        assert json.loads(path.read_text())["eval_device"] == expected


def test_recipe_size_gives_the_inline_model(full_ladder):
    """Size b, named as a model recipe, is the model an inline table with the same fields gives."""
    from phi3data.scaling.ladder import load_ladder, run_plan

    plan = json.loads((full_ladder / "plan.json").read_text())
    assert plan["config"]["sizes"]["b"]["recipe"] == "toy-sizes:b"
    by_recipe = {r["size"]: r["model"] for r in plan["runs"]}
    inline = LADDER.replace('[sizes]\nb = "toy-sizes:b"', SIZES.replace("tie_word_embeddings = true\n", ""))
    config = full_ladder.parent / "inline.toml"
    config.write_text(inline.format(web="w", books="b", bad="x"))
    models = {r["size"]: r["model"] for r in run_plan(load_ladder(config), plan["vocab_size"])}
    assert models == by_recipe
    checkpoint = json.loads((full_ladder / "runs" / "web" / "b" / "seed0" / "result.json").read_text())["checkpoint"]
    saved = json.loads((Path(checkpoint) / "config.json").read_text())
    assert (saved["hidden_size"], saved["num_hidden_layers"], saved["intermediate_size"]) == (32, 2, 64)


def _interrupted_run(out: Path) -> bool:
    """True once some run is done and another has stopped mid-training (a checkpoint short of its last step).

    Runs are ``runs/<recipe>/<size>/<seed>``; fixed-depth globs never descend into the checkpoint temp
    directories the ladder is renaming while we look, and anything that vanishes mid-look reads as "not yet".
    """
    runs = out / "runs"
    try:
        if not any(runs.glob("*/*/*/result.json")):
            return False
        for path in runs.glob("*/*/*/checkpoints/step_*/state.json"):
            state = json.loads(path.read_text())
            if state["step"] < state["train_config"]["max_steps"] and not (path.parents[2] / "result.json").exists():
                return True
    except (OSError, ValueError):  # a checkpoint pruned or half-visible while we read it
        return False
    return False


def test_killed_ladder_resumes_to_the_same_results(full_ladder, tmp_path):
    out = tmp_path / "killed"
    proc = _ablate(_config(tmp_path), out, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not _interrupted_run(out):
        time.sleep(0.005)
    assert proc.poll() is None, "the ladder finished before it could be killed"
    # freeze the ladder the moment a run is mid-training, so what we count is what the kill interrupts
    os.killpg(proc.pid, signal.SIGSTOP)
    interrupted = _interrupted_run(out)
    finished_before = len(list((out / "runs").glob("*/*/*/result.json")))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert interrupted and 1 <= finished_before < 4
    again = _ablate(_config(tmp_path), out)
    stdout, _ = again.communicate(timeout=900)
    assert again.returncode == 0, stdout
    assert _results(out) == _results(full_ladder)


def test_changed_config_is_refused_in_an_existing_ladder(full_ladder, tmp_path):
    from phi3data.scaling.ladder import load_ladder, run_ladder

    config = _config(tmp_path)
    config.write_text(config.read_text().replace("tokens_per_param = 1", "tokens_per_param = 2"))
    with pytest.raises(ValueError, match="another configuration"):
        run_ladder(load_ladder(config), full_ladder)


def test_a_page_shared_by_recipes_is_held_out_of_all_of_them(tmp_path):
    """Recipes that contain the same documents (heuristic is a subset of raw) hold out the same pages."""
    from phi3data.scaling.ladder import LadderConfig, prepare_data

    books = str(SHARED / "textbooks" / "openstax.jsonl.gz")
    web = str(SHARED / "web" / "jsonl")
    cfg = LadderConfig(ladder={"name": "t"}, sizes={"a": {"hidden_size": 16, "num_hidden_layers": 1,
                                                         "num_attention_heads": 2, "intermediate_size": 32}},
                       recipes={"books": {"sources": [books]}, "books_web": {"sources": [web, books]}},
                       eval={"val_fraction": 0.1, "val_max_docs": 10_000})
    info = prepare_data(cfg, tmp_path)
    val = {json.loads(line)["id"] for line in (tmp_path / "data" / "validation.jsonl").open()}
    train = {name: {json.loads(line)["id"] for line in (tmp_path / "data" / name / "train.jsonl").open()}
             for name in ("books", "books_web")}
    assert val and not val & (train["books"] | train["books_web"])
    assert train["books"] < train["books_web"]  # the shared textbook sections split the same way in both
    assert info["validation_documents"] == len(val)
    # a capped validation set is the smallest held-out ids, though the sources are streamed, never held whole
    capped = prepare_data(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"val_max_docs": 7})}),
                          tmp_path / "capped")
    kept = [json.loads(line)["id"] for line in (tmp_path / "capped" / "data" / "validation.jsonl").open()]
    assert kept == sorted(val)[:7] and capped["validation_documents"] == 7
    assert capped["recipes"]["books"]["held_out"] + capped["recipes"]["books"]["documents"] == \
        info["recipes"]["books"]["held_out"] + len(train["books"])


def test_ladder_sources_resolve_to_the_same_absolute_paths(tmp_path, monkeypatch):
    """`phi3data ablate` (relative to the working directory) and the quickstart (its own resolver) must build the
    same configuration, or one cannot resume the other's ladder."""
    from phi3data.scaling.ladder import load_ladder

    config = tmp_path / "ladder.toml"
    (tmp_path / "toy-sizes.toml").write_text(SIZES)
    config.write_text(LADDER.format(web="out/quickstart/web", books="../shared/books.jsonl", bad="bad.jsonl"))
    monkeypatch.chdir(tmp_path)
    by_cwd = load_ladder(config)
    assert by_cwd.recipes["web"].sources == [str(tmp_path / "out" / "quickstart" / "web"), str(tmp_path / "bad.jsonl")]
    assert by_cwd.recipes["textbooks"].sources == [str((tmp_path / ".." / "shared" / "books.jsonl").resolve())]
    by_resolver = load_ladder(config, lambda s: str(tmp_path / s))
    assert by_resolver.model_dump() == by_cwd.model_dump()


def test_ladder_config_errors_name_the_file_and_field(tmp_path):
    from phi3data.config import ConfigError
    from phi3data.scaling.ladder import load_ladder

    config = _config(tmp_path)
    text = config.read_text()
    cases = [
        (text.replace("grad_accum = 2", "grad_acum = 2"), r"unknown field train.grad_acum \(did you mean"),
        (text.replace("grad_accum = 2", "seq_len = 32"), r"train.seq_len: set by \[ladder\] seq_len"),
        (text.replace("grad_accum = 2", "grad_accum = 0"), r"train.grad_accum: must be a positive integer"),
        (text.replace("grad_accum = 2", "grad_accum = 2\ndtype = 'bf61'"), r"train.dtype: Input should be"),
        (text.replace("grad_accum = 2", "grad_accum = 2\ndistributed = 'fdsp'"), r"train.distributed: Input should"),
        (text.replace('"toy-sizes:b"', '"toy-sizes:c"'), r"sizes.b.base: .*toy-sizes.toml: size 'c' not in toy-sizes"),
        (text.replace("hidden_size = 16", "hidden_sise = 16"), r"sizes.a: unknown field hidden_sise"),
        (text.replace("hidden_size = 16", "hidden_size = 15"), r"sizes.a: hidden_size 15 is not divisible"),
        (text.replace("hidden_size = 16", "hidden_size = 16\nvocab_size = 9"), r"sizes.a.vocab_size: set by"),
        (text.replace('tasks = ["arc_easy", "piqa"]', 'tasks = ["gsm8k"]'), r"eval.tasks"),
        (text.replace("seq_len = 64", "seq_len = 'long'"), r"ladder.seq_len"),
    ]
    for bad, message in cases:
        config.write_text(bad)
        with pytest.raises(ConfigError, match=message) as caught:
            load_ladder(config)
        assert str(config) in str(caught.value)


def test_size_recipe_with_overrides(tmp_path):
    """``{base = ..., field = ...}``: the recipe's fields with overrides; the ladder's vocabulary and context."""
    from phi3data.scaling.ladder import load_ladder, run_plan

    config = _config(tmp_path)
    (tmp_path / "toy-sizes.toml").write_text(SIZES + "max_position_embeddings = 4096\nvocab_size = 32064\n")
    config.write_text(config.read_text().replace('b = "toy-sizes:b"',
                                                 'b = {base = "toy-sizes:b", num_hidden_layers = 3}'))
    cfg = load_ladder(config)
    model = next(r["model"] for r in run_plan(cfg, 512) if r["size"] == "b")
    assert model["num_hidden_layers"] == 3 and model["hidden_size"] == 32 and model["tie_word_embeddings"]
    assert model["vocab_size"] == 512 and model["max_position_embeddings"] == 128


PHASED_LADDER = """
[ladder]
name = "phased toy"
seeds = [0]
tokens_per_param = 1
min_tokens = 8_000
seq_len = 64
micro_batch_size = 8
lr = 3e-3

[tokenizer]
train_vocab = 384
sample_chars = 1_000_000

[sizes.a]
hidden_size = 16
num_hidden_layers = 1
num_attention_heads = 2
intermediate_size = 32

[sizes.b]
hidden_size = 24
num_hidden_layers = 1
num_attention_heads = 2
intermediate_size = 48

[recipes.mixed]
description = "web and textbooks in one shuffled stream"
sources = ["{web}", "{books}"]

[recipes.two_phase]
description = "web first, then textbooks"
phases = [{{name = "web", sources = ["{web}"], fraction = 0.75}},
          {{name = "books", sources = ["{books}"], fraction = 0.25}}]

[eval]
tasks = ["arc_easy"]
limit = 8
val_fraction = 0.1
val_max_docs = 10
"""


def test_a_phased_recipe_trains_its_phases_in_order_beside_a_mixed_one(tmp_path):
    config = tmp_path / "phased.toml"
    config.write_text(PHASED_LADDER.format(web=SHARED / "web" / "jsonl",
                                           books=SHARED / "textbooks" / "openstax.jsonl.gz"))
    out = tmp_path / "out"
    stdout, _ = _ablate(config, out).communicate(timeout=900)
    assert (out / "report.md").exists(), stdout
    plan = json.loads((out / "plan.json").read_text())
    assert {r["run"] for r in plan["runs"]} == {"mixed/a/seed0", "mixed/b/seed0", "two_phase/a/seed0",
                                                "two_phase/b/seed0"}
    assert set(plan["data"]["recipes"]) == {"mixed", "two_phase.web", "two_phase.books"}
    for run in plan["runs"]:
        if run["recipe"] != "two_phase":
            continue
        records = [json.loads(line) for line in (out / "runs" / run["run"] / "metrics.jsonl").open()
                   if '"loss"' in line]
        phases = [r["phase"] for r in records]
        web_steps = round(0.75 * run["steps"])
        assert phases == ["web"] * web_steps + ["books"] * (run["steps"] - web_steps)
    mixed = {r["tokens"] for r in plan["runs"] if r["recipe"] == "mixed"}
    phased = {r["tokens"] for r in plan["runs"] if r["recipe"] == "two_phase"}
    assert mixed == phased, "the same total tokens per model"
    fits = json.loads((out / "fits.json").read_text())
    assert set(fits["benchmark"]) == {"mixed", "two_phase"}
