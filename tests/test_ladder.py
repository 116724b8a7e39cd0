"""Ablation ladder end to end on real text at toy scale: data split, tokenizer, training, evaluation, report,
and a kill -9 in the middle followed by a resume that gives exactly the uninterrupted results."""

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

[sizes.b]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
intermediate_size = 64

[recipes.web]
sources = ["{web}"]

[recipes.textbooks]
sources = ["{books}"]

[eval]
tasks = ["arc_easy", "piqa"]
limit = 12
val_fraction = 0.1
val_max_docs = 20
"""


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "ladder.toml"
    path.write_text(LADDER.format(web=SHARED / "web" / "jsonl", books=SHARED / "textbooks" / "openstax.jsonl.gz"))
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


def test_ladder_sources_resolve_to_the_same_absolute_paths(tmp_path, monkeypatch):
    """`phi3data ablate` (relative to the working directory) and the quickstart (its own resolver) must build the
    same configuration, or one cannot resume the other's ladder."""
    from phi3data.scaling.ladder import load_ladder

    config = tmp_path / "ladder.toml"
    config.write_text(LADDER.format(web="out/quickstart/web", books="../shared/books.jsonl"))
    monkeypatch.chdir(tmp_path)
    by_cwd = load_ladder(config)
    assert by_cwd.recipes["web"].sources == [str(tmp_path / "out" / "quickstart" / "web")]
    assert by_cwd.recipes["textbooks"].sources == [str((tmp_path / ".." / "shared" / "books.jsonl").resolve())]
    by_resolver = load_ladder(config, lambda s: str(tmp_path / s))
    assert by_resolver.model_dump() == by_cwd.model_dump()
