"""Dedup on real pages: exact, repeated lines and MinHash near-duplicates keep the smallest id on every engine,
driver and distributed connected components agree, a later run dedups against an earlier run's index, and a run
killed in its global stages, or given a corrupt intermediate file, resumes to exactly the uninterrupted output."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, SHARED, read_output

from phi3data.pipelines.recipe import load_recipe
from phi3data.pipelines.runner import run_pipeline
from phi3data.pipelines.shuffle import ShuffleJob, components_distributed, components_on_driver

BOILERPLATE = "Subscribe to our newsletter for weekly updates from the editors"


def _pages(reference_run: Path, count: int) -> list[dict]:
    """Real extracted pages (the web-quality run over the shared WARC sample), long enough to shingle."""
    rows = []
    for shard in sorted((reference_run / "data").glob("*.parquet")):
        table = pq.read_table(shard, columns=["id", "text"])
        rows.extend(r for r in table.to_pylist() if len(r["text"].split()) >= 80)
    rows.sort(key=lambda r: r["id"])
    assert len(rows) >= count, f"the reference run has only {len(rows)} long pages"
    return rows[:count]


def _edit(text: str, rng: random.Random, fraction: float) -> str:
    words = text.split(" ")
    for _ in range(max(1, int(len(words) * fraction))):
        words[rng.randrange(len(words))] = rng.choice(["lorem", "ipsum", "dolor", "amet"])
    return " ".join(words)


@pytest.fixture(scope="module")
def planted(reference_run, tmp_path_factory) -> dict:
    """Real pages in four JSONL shards, with planted copies whose ids sort after every original ("zz-..."):
    exact copies (re-cased, re-spaced), light near-copies (2% of words replaced), and short documents."""
    rng = random.Random(7)
    pages = _pages(reference_run, 120)
    docs = [{"id": f"doc-{i:04d}", "text": p["text"] + "\n" + BOILERPLATE} for i, p in enumerate(pages)]
    exact = {f"zz-exact-{i:04d}": f"doc-{i:04d}" for i in range(0, 120, 6)}
    near = {f"zz-near-{i:04d}": f"doc-{i:04d}" for i in range(3, 120, 6)}
    by_id = {d["id"]: d["text"] for d in docs}
    for copy, original in exact.items():
        docs.append({"id": copy, "text": "  ".join(by_id[original].upper().split(" "))})
    for copy, original in near.items():
        docs.append({"id": copy, "text": _edit(by_id[original], rng, 0.02)})
    # a GSM8K test question copied into a page: the decontamination stage of the engine test finds it
    question = json.loads(gzip.open(SHARED / "eval" / "gsm8k" / "test.jsonl.gz", "rt").readline())["question"]
    docs[5]["text"] = docs[5]["text"] + "\n" + question
    shorts = [{"id": f"short-{i}", "text": "too short to shingle"} for i in range(3)]
    shorts.append({"id": "empty", "text": "... --- !!! ???"})  # no words
    docs.extend(shorts)
    rng.shuffle(docs)
    root = tmp_path_factory.mktemp("planted")
    for s in range(4):
        with open(root / f"part-{s}.jsonl", "w") as handle:
            for doc in docs[s::4]:
                handle.write(json.dumps(doc) + "\n")
    return {"dir": root, "docs": docs, "exact": exact, "near": near, "originals": [d for d in by_id]}


def _recipe(**minhash) -> dict:
    return {"pipeline": {"name": "dedup-test"},
            "stage": [{"type": "exact_dedup"},
                      {"type": "minhash_dedup", "name": "near", "partitions": 4, "audit_pairs": 50, **minhash},
                      {"type": "line_dedup", "partitions": 4}]}


def _stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())


def _findings(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / "findings").glob("*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


@pytest.fixture(scope="module")
def local_run(planted, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dedup-local")
    run_pipeline(load_recipe(_recipe()), planted["dir"], out, engine="local", workers=2, progress=False)
    return out


def test_copies_are_dropped_and_the_smallest_id_kept(planted, local_run):
    kept = {doc for doc, _ in read_output(local_run)}
    assert not kept & set(planted["exact"]), "every exact copy (re-cased, re-spaced) is a duplicate"
    missed_near = set(planted["near"]) & kept
    assert len(missed_near) <= 2, f"light near-copies kept: {sorted(missed_near)}"
    assert set(planted["originals"]) <= kept, "the original has the smallest id of its cluster and stays"
    # the three identical short documents are exact copies (the smallest id stays); "empty" has no words, so no key
    assert {"short-0", "empty"} <= kept and not {"short-1", "short-2"} & kept
    findings = {f["id"]: json.loads(f["detail"]) for f in _findings(local_run) if f["stage"] == "near"}
    for copy in set(planted["near"]) - kept:
        assert findings[copy]["cluster"] == planted["near"][copy]
    stats = _stats(local_run)
    drops = {s["name"]: s["drops"] for s in stats["stages"]}
    assert drops["exact_dedup"] == {"exact_dedup:duplicate": len(planted["exact"]) + 2}  # + the two other shorts
    audit = stats["decisions"]["near"]["audit"]
    assert audit["candidate_pairs"] > 0 and audit["candidate_precision"] >= 0.9
    assert audit["non_candidate_pairs"] > 0 and audit["non_candidate_above_threshold"] == 0


def test_boilerplate_lines_stay_only_in_the_smallest_id_document(local_run):
    texts = dict(read_output(local_run))
    holders = sorted(doc for doc, text in texts.items() if BOILERPLATE in text)
    assert holders == ["doc-0000"]
    assert texts["doc-0001"].strip() and BOILERPLATE not in texts["doc-0001"]


@pytest.mark.parametrize("engine", ["local", pytest.param("ray", marks=pytest.mark.cluster),
                                    pytest.param("spark", marks=pytest.mark.cluster)])
def test_every_engine_keeps_the_same_documents(engine, engine_up, planted, tmp_path_factory, tmp_path):
    """Dedup and decontamination together: the same documents, decisions and reports on every engine."""
    spec = _recipe()
    spec["stage"].insert(0, {"type": "decontaminate", "benchmarks": [str(SHARED / "eval" / "gsm8k" / "test.jsonl.gz")]})
    out = tmp_path / "out"
    run_pipeline(load_recipe(spec), planted["dir"], out, engine=engine, workers=2, progress=False)
    assert "doc-0005" not in {doc for doc, _ in read_output(out)}
    report = _stats(out)["reports"]["decontaminate"]
    assert report["benchmarks"]["gsm8k/test"]["items_hit"] == 1, report
    local = tmp_path_factory.getbasetemp() / "dedup-decontaminate-local"
    if not (local / "stats.json").exists():
        run_pipeline(load_recipe(spec), planted["dir"], local, engine="local", workers=2, progress=False)
    assert read_output(out) == read_output(local)
    for key in ("decisions", "reports", "documents_out"):
        assert _stats(out)[key] == _stats(local)[key]


def test_driver_and_distributed_components_give_the_same_clusters(planted, local_run, tmp_path):
    out = tmp_path / "distributed"
    run_pipeline(load_recipe(_recipe(components="distributed")), planted["dir"], out, engine="local", workers=2,
                 progress=False)
    assert read_output(out) == read_output(local_run)
    decision, reference = _stats(out)["decisions"]["near"], _stats(local_run)["decisions"]["near"]
    assert decision["components"] == "distributed" and decision["rounds"] >= 1
    for key in ("clusters", "in_clusters", "to_drop", "audit"):
        assert decision[key] == reference[key]
    [resolved] = decision["resolved"]
    [resolved_ref] = reference["resolved"]
    assert pq.read_table(out / resolved).drop_columns(["shard"]).equals(
        pq.read_table(local_run / resolved_ref).drop_columns(["shard"]))


def test_large_star_small_star_on_long_chains_and_random_graphs(tmp_path):
    """Chains (diameter 60) and a random sparse graph: the engine's rounds find the driver's components."""
    rng = random.Random(3)
    names = [f"1n{i:04d}\x1fshard" for i in range(400)]
    order = names[:60]
    rng.shuffle(order)
    edges = list(zip(order, order[1:]))  # a chain visiting nodes out of order
    edges += [(rng.choice(names[60:]), rng.choice(names[60:])) for _ in range(250)]
    edges = [(a, b) for a, b in edges if a != b]
    table = pa.table({"src": [a for a, b in edges] + [b for a, b in edges],
                      "dst": [b for a, b in edges] + [a for a, b in edges]})
    edge_dir = tmp_path / "edges" / "p00000"
    edge_dir.mkdir(parents=True)
    pq.write_table(table, edge_dir / "all.parquet")
    driver = components_on_driver([str(edge_dir / "all.parquet")]).sort_by("node")

    # spread the edges over partitions as the reduce step would
    from phi3data.pipelines.shuffle import _write_edges_by_src

    files = _write_edges_by_src(table, tmp_path / "parted", "from-00000", 5)
    job = ShuffleJob(work=tmp_path / "work", output=tmp_path, stems=[], keys_files=[], data_files={},
                     mapper=lambda fn, items: map(fn, items))
    distributed, rounds = components_distributed(job, files, 5)
    assert distributed.sort_by("node").equals(driver)
    assert rounds >= 3
    chain = {r["node"]: r for r in driver.to_pylist()}
    assert {chain[n]["cluster"] for n in order} == {min(order)}
    assert chain[order[0]]["size"] == 60


def test_a_later_run_drops_what_an_earlier_run_holds(planted, tmp_path):
    originals = [d for d in planted["docs"] if d["id"].startswith("doc-")]
    copies = [d for d in planted["docs"] if d["id"].startswith("zz-")]
    first_in, second_in = tmp_path / "first-in", tmp_path / "second-in"
    for folder, docs in ((first_in, originals), (second_in, copies)):
        folder.mkdir()
        with open(folder / "docs.jsonl", "w") as handle:
            handle.writelines(json.dumps(d) + "\n" for d in docs)
    recipe = {"pipeline": {"name": "crawl"}, "stage": [{"type": "minhash_dedup", "name": "near", "partitions": 4}]}
    run_pipeline(load_recipe(recipe), first_in, tmp_path / "first", workers=1, progress=False)
    index = tmp_path / "first" / "index" / "near"
    recipe["stage"][0]["against"] = [str(index)]
    run_pipeline(load_recipe(recipe), second_in, tmp_path / "second", workers=1, progress=False)
    kept = {doc for doc, _ in read_output(tmp_path / "second")}
    matched = {f["id"]: json.loads(f["detail"]) for f in _findings(tmp_path / "second")}
    assert all(f["kind"] == "matches_earlier" for f in _findings(tmp_path / "second"))
    assert not kept & set(planted["exact"])
    for copy, detail in matched.items():
        assert detail["cluster"] == {**planted["exact"], **planted["near"]}[copy]
    assert len(matched) >= len(planted["exact"]) + len(planted["near"]) - 2

    recipe["stage"][0]["ngram"] = 4  # an index keyed another way is refused, not silently mismatched
    with pytest.raises(ValueError, match="ngram"):
        run_pipeline(load_recipe(recipe), second_in, tmp_path / "third", workers=1, progress=False)


def test_modes_annotate_and_drop_all_and_short_drop(planted, local_run, tmp_path):
    annotate = {"pipeline": {"name": "a"}, "stage": [{"type": "exact_dedup", "mode": "annotate"}]}
    run_pipeline(load_recipe(annotate), planted["dir"], tmp_path / "a", workers=1, progress=False)
    rows = [r for p in sorted((tmp_path / "a" / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == len(planted["docs"])
    by_id = {r["id"]: r for r in rows}
    copy, original = next(iter(planted["exact"].items()))
    assert by_id[copy]["dup_cluster"] == original and by_id[copy]["dup_cluster_size"] == 2
    assert by_id["empty"]["dup_cluster"] == "empty" and by_id["empty"]["dup_cluster_size"] == 1

    drop_all = {"pipeline": {"name": "b"},
                "stage": [{"type": "exact_dedup", "mode": "drop_all", "short": "drop"}]}
    run_pipeline(load_recipe(drop_all), planted["dir"], tmp_path / "b", workers=1, progress=False)
    kept = {doc for doc, _ in read_output(tmp_path / "b")}
    assert not kept & (set(planted["exact"]) | set(planted["exact"].values()))
    drops = _stats(tmp_path / "b")["stages"][0]["drops"]
    assert drops["exact_dedup:too_short"] == 1  # the empty one; the three shorts have words, so they are keyed

    # fewer words than a shingle: never near-duplicates of each other, whatever their text
    near_only = {"pipeline": {"name": "c"}, "stage": [{"type": "minhash_dedup", "partitions": 2}]}
    run_pipeline(load_recipe(near_only), planted["dir"], tmp_path / "c", workers=1, progress=False)
    assert {"short-0", "short-1", "short-2", "empty"} <= {doc for doc, _ in read_output(tmp_path / "c")}


def _run_cli(recipe: Path, planted_dir: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "phi3data.cli", "run", str(recipe), "--input", str(planted_dir), "--output",
           str(out), "--workers", "1", "--no-progress"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


@pytest.fixture(scope="module")
def distributed_reference(planted, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, uninterrupted output) for a run whose components are found by rounds of engine tasks."""
    root = tmp_path_factory.mktemp("distributed-reference")
    recipe = root / "recipe.toml"
    recipe.write_text(_toml(_recipe(components="distributed", partitions=24)))
    assert _run_cli(recipe, planted["dir"], root / "out").wait(timeout=600) == 0
    return recipe, root / "out"


@pytest.mark.slow
@pytest.mark.parametrize("step", ["keys", "reduce", "components"])
def test_kill_in_a_global_step_resumes_exactly(step, planted, distributed_reference, tmp_path):
    recipe_toml, reference = distributed_reference
    out = tmp_path / "out"
    watch = {"keys": out / "_segments" / "1" / "_progress",
             "reduce": out / "_segments" / "1" / "shuffle" / "near" / "reduce" / "_done",
             "components": out / "_segments" / "1" / "shuffle" / "near" / "cc" / "r000" / "large" / "_done"}[step]
    proc = _run_cli(recipe_toml, planted["dir"], out)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if watch.exists() and any(not p.name.startswith(".tmp-") for p in watch.glob("*.json")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGSTOP)
    before = {p: p.stat().st_mtime_ns for p in (out / "_segments").rglob("*.json") if not p.name.startswith(".tmp-")}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "stats.json").exists()
    assert _run_cli(recipe_toml, planted["dir"], out).wait(timeout=600) == 0
    assert read_output(out) == read_output(reference)
    assert _stats(out)["decisions"] == _stats(reference)["decisions"]
    # shuffle tasks finished before the kill were reused, not redone
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in before.items())
    assert not list(out.rglob(".tmp-*"))


def _toml(spec: dict) -> str:
    lines = [f'[pipeline]\nname = "{spec["pipeline"]["name"]}"\n']
    for stage in spec["stage"]:
        lines.append("[[stage]]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in stage.items())
        lines.append("")
    return "\n".join(lines)


def test_corrupt_intermediate_files_are_rebuilt_not_read(planted, local_run, tmp_path):
    out = tmp_path / "out"
    spec = _recipe()
    spec["stage"].pop()  # exact + near: the near stage's shuffle feeds the last pass
    recipe = load_recipe(spec)
    run_pipeline(recipe, planted["dir"], out, workers=2, progress=False)
    reference = read_output(out)
    # as if the machine died after the shuffle: the last pass and its decision are gone, and two intermediate
    # files were damaged on disk (one shard's keys, one reduce output)
    keys = sorted((out / "_segments" / "1" / "keys").glob("*.parquet"))[0]
    keys.write_bytes(keys.read_bytes()[:-40] + b"\0" * 40)
    edges = sorted((out / "_segments" / "1" / "shuffle" / "near" / "edges").rglob("*.parquet"))[0]
    edges.write_bytes(b"not parquet")
    for name in ("data", "_progress"):
        for path in (out / name).glob("*"):
            path.unlink()
    (out / "_segments" / "decision-1.json").unlink()
    run_pipeline(recipe, planted["dir"], out, workers=2, progress=False)
    assert read_output(out) == reference
    assert pq.read_table(keys).num_rows > 0 and pq.read_table(edges).num_rows > 0
