"""Recipes, stages and a whole pipeline run: validation errors, stats, rejects, determinism."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import RECIPE, ROOT, SHARED, WARC_DIR, read_output

from phi3data.documents import make_batch
from phi3data.pipelines.recipe import RecipeError, load_recipe
from phi3data.pipelines.runner import run_pipeline


def _recipe(stages: list[dict]) -> dict:
    return {"pipeline": {"name": "t"}, "stage": stages}


def test_recipe_errors_are_clear(tmp_path):
    with pytest.raises(RecipeError, match="unknown stage type 'gopher_qualty'.*gopher_quality"):
        load_recipe(_recipe([{"type": "gopher_qualty"}]))
    with pytest.raises(RecipeError, match=r"stage #1 \(language\): bad parameter: min_scor"):
        load_recipe(_recipe([{"type": "language", "min_scor": 0.5}]))
    with pytest.raises(RecipeError, match="min_score.*valid number"):
        load_recipe(_recipe([{"type": "language", "min_score": "high"}]))
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.toml")
    with pytest.raises(RecipeError, match="no \\[\\[stage\\]\\]"):
        load_recipe(_recipe([]))
    with pytest.raises(FileNotFoundError, match="input not found"):
        run_pipeline(load_recipe(RECIPE), tmp_path / "missing", tmp_path / "out", progress=False)


def test_builtin_stage_table_names_every_registered_stage():
    """Stage modules load when a recipe names them: the table must name each stage's own module."""
    code = ("import importlib, pkgutil, json; import phi3data.pipelines.stages as s; "
            "from phi3data.pipelines.base import STAGES; "
            "web = [k for k in STAGES]; "  # nothing but the registry itself is loaded by the package
            "[importlib.import_module(f'{s.__name__}.{m.name}') for m in pkgutil.iter_modules(s.__path__) "
            "if not m.name.startswith('_')]; "
            "print(json.dumps([web, {k: v.__module__.rsplit('.', 1)[1] for k, v in STAGES.items()}, s.BUILTIN]))")
    before, registered, table = json.loads(subprocess.run([sys.executable, "-c", code], check=True,
                                                          capture_output=True, text=True).stdout)
    assert before == []
    assert registered == table
    recipe = load_recipe(RECIPE)
    assert [type(stage).__module__ for stage in recipe.build_stages()][:3] == [
        "phi3data.pipelines.stages.extract", "phi3data.pipelines.stages.urls", "phi3data.pipelines.stages.language"]


def test_cli_reports_bad_recipe_without_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[pipeline]\nname = "x"\n[[stage]]\ntype = "extract"\nextractor = "lynx"\n')
    proc = subprocess.run([sys.executable, "-m", "phi3data.cli", "run", str(bad), "--input", str(WARC_DIR),
                           "--output", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "extractor" in proc.stderr and "Traceback" not in proc.stdout + proc.stderr


def test_recipe_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "typo.toml"
    bad.write_text('[pipeline]\nname = "x"\n[output]\nbatch_sise = 10\n[[stage]]\ntype = "length"\n')
    with pytest.raises(RecipeError, match=rf"{bad}: output\.batch_sise: unknown field"):
        load_recipe(bad)
    bad.write_text('[pipeline\nname = "x"\n')
    with pytest.raises(RecipeError, match=rf"{bad}: not valid TOML"):
        load_recipe(bad)


def test_warc_input_without_an_extract_stage_is_refused(tmp_path):
    """A WARC record is HTML; a recipe without extraction would feed raw markup (or nothing) to the filters."""
    no_extract = _recipe([{"type": "length", "min_words": 5}])
    with pytest.raises(RecipeError, match="format = 'warc' needs an extract stage"):
        load_recipe({**no_extract, "input": {"format": "warc"}})
    with pytest.raises(RecipeError, match="holds WARC files.*no extract stage"):
        run_pipeline(load_recipe(no_extract), WARC_DIR, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("data/*")), "nothing is written before the refusal"


def test_fallback_ids_are_unique_across_shards_with_a_fixed_source(tmp_path):
    """Records without an id of their own used to get '<source>:<line>', so with [input] source = "web" every
    shard yielded web:1, web:2 ... and ids collided across shards."""
    inp = tmp_path / "in"
    inp.mkdir()
    for k in range(3):
        (inp / f"part-{k}.jsonl").write_text("".join(json.dumps({"text": f"document {k}-{i} " + "word " * 20}) + "\n"
                                                     for i in range(4)))
    recipe = load_recipe({"pipeline": {"name": "ids"}, "input": {"source": "web"},
                          "stage": [{"type": "length", "min_words": 5}]})
    run_pipeline(recipe, inp, tmp_path / "out", progress=False)
    table = pq.read_table(tmp_path / "out" / "data")
    ids = table.column("id").to_pylist()
    assert len(ids) == 12 and len(set(ids)) == 12
    assert set(table.column("source").to_pylist()) == {"web"}
    assert "web:part-1.jsonl:2" in ids


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path):
    """Two runs on one output directory would delete each other's temp files; the second now fails at once, and
    the lock goes with its process (a killed run never blocks a rerun)."""
    import signal
    import time

    from phi3data.io.writers import LOCK_FILE, OutputLocked, output_lock

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from phi3data.io.writers import output_lock\n"
                               "with output_lock(Path(sys.argv[1])):\n    print('locked', flush=True)\n"
                               "    time.sleep(600)\n", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLocked, match=f"pid {holder.pid}"):
            run_pipeline(load_recipe(RECIPE), WARC_DIR, out, progress=False)
        assert not (out / "manifest.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    for _ in range(100):  # the kernel drops an flock with its process; no stale lock remains
        try:
            with output_lock(out):
                break
        except OutputLocked:
            time.sleep(0.05)
    else:
        pytest.fail("the lock of a killed process was not released")
    assert (out / LOCK_FILE).exists()


def test_config_hash_is_stable_and_sensitive():
    a = load_recipe(RECIPE)
    assert a.config_hash() == load_recipe(RECIPE).config_hash()
    data = json.loads(json.dumps(a.model_dump(mode="json")))
    data["stage"][2]["min_score"] = 0.5
    assert load_recipe(data).config_hash() != a.config_hash()


def _run_stage(stage_type: str, docs: list[str], **params):
    recipe = load_recipe(_recipe([{"type": stage_type, **params}]))
    stage = recipe.build_stages()[0]
    stage.ensure_setup()
    batch = make_batch([{"id": str(i), "text": t, "source": "t"} for i, t in enumerate(docs)])
    return stage.process(batch)


def _textbook_texts(n: int) -> list[str]:
    out = []
    with gzip.open(SHARED / "textbooks" / "openstax.jsonl.gz", "rt") as handle:
        for line in handle:
            text = json.loads(line)["text"]
            if len(text) > 3000:
                out.append(text)
            if len(out) == n:
                break
    return out


def test_heuristics_keep_textbooks_and_drop_junk():
    books = _textbook_texts(20)
    repeated = "Buy now! Great deals every day.\n" * 40
    menu = "\n".join(["Home", "About", "Contact", "Shop", "Cart", "Login"] * 20)
    for stage in ("gopher_repetition", "gopher_quality"):
        out = _run_stage(stage, books + [repeated, menu])
        kept = out.batch.column("id").to_pylist()
        assert {"20", "21"}.isdisjoint(kept), stage
        assert len([k for k in kept if int(k) < 20]) >= 18, stage
        assert sum(out.drops.values()) == 22 - len(kept)
    out = _run_stage("gopher_repetition", [repeated])
    assert list(out.drops) == ["gopher_repetition:dup_para_frac"] or "dup_line" in next(iter(out.drops))


def test_c4_keeps_only_good_lines():
    text = ("A heading without punctuation\n" + "This sentence ends well. Another one follows here!\n" * 3 +
            "Accept cookies? We use cookies on this site.\nShort one.\nJavascript is required to view this.\n")
    out = _run_stage("c4_quality", [text])
    assert out.batch.num_rows == 1
    kept = out.batch.column("text")[0].as_py()
    assert kept == "\n".join(["This sentence ends well. Another one follows here!"] * 3)
    dropped = _run_stage("c4_quality", ["function f() { return 1; } is code.\n" * 6])
    assert dict(dropped.drops) == {"c4_quality:curly_bracket": 1}


def test_language_labels_real_text():
    books = _textbook_texts(3)
    german = ("Die Kinder spielen im Garten, während die Eltern im Haus das Abendessen vorbereiten. "
              "Morgen fahren wir mit dem Zug nach Berlin, um unsere Großeltern zu besuchen.")
    out = _run_stage("language", books + [german], languages=["en"])
    assert out.batch.column("language").to_pylist() == ["en"] * 3
    assert dict(out.drops) == {"language:other_language": 1}
    labelled = _run_stage("language", [german], languages=[])
    assert labelled.batch.column("language").to_pylist() == ["de"]


def test_url_blocklist(tmp_path):
    listing = tmp_path / "block.txt"
    listing.write_text("# spam\nspam.example\n")
    recipe = load_recipe(_recipe([{"type": "url_blocklist", "domains_file": str(listing),
                                   "url_substrings": ["/casino/"]}]))
    stage = recipe.build_stages()[0]
    stage.ensure_setup()
    urls = ["http://spam.example/a", "https://www.spam.example/b", "https://ok.example/casino/x",
            "https://ok.example/fine", None]
    batch = make_batch([{"id": str(i), "text": "t", "url": u} for i, u in enumerate(urls)])
    out = stage.process(batch)
    assert out.batch.column("id").to_pylist() == ["3", "4"]
    assert dict(out.drops) == {"url_blocklist:blocked_domain": 2, "url_blocklist:blocked_substring": 1}


def test_run_stats_add_up(reference_run):
    stats = json.loads((reference_run / "stats.json").read_text())
    manifest = json.loads((reference_run / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 9
    assert stats["documents_read"] == 2013
    assert stats["documents_out"] == len(read_output(reference_run)) > 300
    previous_out = stats["documents_read"]
    for stage in stats["stages"]:
        assert stage["in"] == previous_out
        assert stage["in"] - stage["out"] == sum(stage["drops"].values()) + stage["rejects"]
        previous_out = stage["out"]
    assert previous_out == stats["documents_out"]
    for row in manifest["shards"]:
        assert row["data"].endswith(f"-{manifest['recipe_hash'][:10]}.parquet")


def test_output_schema_and_languages(reference_run):
    shard = sorted((reference_run / "data").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    assert table.schema.names[:5] == ["id", "text", "url", "source", "metadata"]
    assert set(table.column("language").to_pylist()) == {"en"}
    assert min(table.column("language_score").to_pylist()) >= 0.65


def test_rerun_skips_and_other_recipe_refused(reference_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    before = read_output(out)
    summary = run_pipeline(load_recipe(RECIPE), WARC_DIR, out, progress=False)
    assert summary.shards_skipped == 9 and read_output(out) == before
    other = load_recipe(_recipe([{"type": "extract"}]))
    with pytest.raises(RecipeError, match="another recipe"):
        run_pipeline(other, WARC_DIR, out, progress=False)


def test_bad_input_is_counted_and_written_to_rejects(reference_run, tmp_path):
    """Corrupt real shards and add broken JSONL; good documents come out exactly as from the clean run."""
    inp = tmp_path / "in"
    inp.mkdir()
    clean = (WARC_DIR / "web-sample-00000.warc.gz").read_bytes()
    damaged = bytearray(clean)
    starts = [i for i in range(len(damaged) - 3) if damaged[i:i + 3] == b"\x1f\x8b\x08"]
    damaged[starts[10] + 50: starts[10] + 150] = bytes(100)
    (inp / "web-sample-00000.warc.gz").write_bytes(bytes(damaged))
    small = (WARC_DIR / "web-sample-00008.warc.gz").read_bytes()
    (inp / "web-sample-00008.warc.gz").write_bytes(small[: int(len(small) * 0.6)])
    text = _textbook_texts(2)
    lines = [json.dumps({"id": "book-0", "text": text[0]}), '{"id": "broken", "text": "no end',
             json.dumps({"id": "empty", "text": "  "}),
             json.dumps({"id": "giant", "text": text[1] * (20_000_000 // len(text[1]) + 1)})]
    (inp / "extra.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    summary = run_pipeline(load_recipe(RECIPE), inp, out, progress=False)
    stats = summary.stats
    assert stats["read_rejects"] == {"corrupt_gzip": 1, "empty_document": 1, "malformed_json": 1,
                                     "too_large": 1, "truncated_gzip": 1}
    rejects = [r for p in sorted((out / "rejects").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(r["reason"] for r in rejects) == sorted(
        ["corrupt_gzip", "empty_document", "malformed_json", "too_large", "truncated_gzip"])
    assert all(r["source"] and r["detail"] for r in rejects)
    reference = dict(read_output(reference_run))
    got = read_output(out)
    warc_docs = [(i, t) for i, t in got if i != "book-0"]
    assert all(reference[i] == t for i, t in warc_docs)  # good documents unaffected
    assert "book-0" in dict(got)


def test_hugging_face_saved_dataset_as_input(tmp_path):
    import datasets

    books = _textbook_texts(6)
    ds = datasets.Dataset.from_dict({"id": [f"b{i}" for i in range(6)], "text": books})
    ds.save_to_disk(str(tmp_path / "hf"), num_shards=2)
    recipe = load_recipe(_recipe([{"type": "language", "languages": ["en"]}, {"type": "gopher_quality"}]))
    summary = run_pipeline(recipe, tmp_path / "hf", tmp_path / "out", progress=False)
    assert summary.shards_total == 2
    assert [i for i, _ in read_output(tmp_path / "out")] == [f"b{i}" for i in range(6)]


def _threshold_recipe(mode: str, value: float) -> dict:
    """A global stage over a score every page has (fastText's language score), so it runs without a classifier."""
    key = {"percentile": "top_percent", "token_budget": "token_budget", "score": "min_score"}[mode]
    return {"pipeline": {"name": "global"},
            "stage": [{"type": "extract"}, {"type": "language", "languages": [], "min_score": 0.0},
                      {"type": "edu_threshold", "column": "language_score", "mode": mode, key: value,
                       "low": 0.0, "high": 1.0, "bins": 200},
                      {"type": "length", "min_chars": 100}]}


def _languages_scores(out):
    rows = []
    for shard in sorted((out / "data").glob("*.parquet")):
        table = pq.read_table(shard, columns=["id", "language_score", "text"])
        rows.extend(zip(table.column("id").to_pylist(), table.column("language_score").to_pylist(),
                        table.column("text").to_pylist()))
    return rows


def test_global_threshold_percentile_and_budget(tmp_path):
    """A global stage: histogram in the workers, cut on the driver, filter in a second pass."""
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("web-sample-00000.warc.gz", "web-sample-00008.warc.gz"):
        (inp / name).symlink_to(WARC_DIR / name)
    out = tmp_path / "top"
    summary = run_pipeline(load_recipe(_threshold_recipe("percentile", 25)), inp, out, progress=False)
    decision = summary.stats["decisions"]["edu_threshold"]
    total = decision["total_docs"]
    assert total == 263 - summary.stats["stages"][0]["drops"].get("extract:empty", 0)
    kept = _languages_scores(out)
    assert all(score >= decision["threshold_score"] for _, score, _ in kept)
    # fastText gives most English pages a score in the top bin: the nearest cut keeps that whole bin, never nothing
    assert 0 < decision["kept_docs"] < total
    names = [s["name"] for s in summary.stats["stages"]]
    assert names == ["extract", "language", "edu_threshold", "length"]
    thr_stats = summary.stats["stages"][2]
    assert thr_stats["in"] == total and thr_stats["out"] == decision["kept_docs"]
    out2 = tmp_path / "budget"
    summary2 = run_pipeline(load_recipe(_threshold_recipe("token_budget", 20_000)), inp, out2, progress=False)
    d2 = summary2.stats["decisions"]["edu_threshold"]
    # the top score bin alone holds more than 20k tokens: it is kept (tied scores cannot be split) and flagged
    assert d2["kept_tokens"] > 20_000 and d2["over_budget"] and d2["kept_docs"] < d2["total_docs"]
    # rerun is a no-op and reuses the saved decision
    again = run_pipeline(load_recipe(_threshold_recipe("token_budget", 20_000)), inp, out2, progress=False)
    assert again.shards_skipped == 2 and again.stats["decisions"] == summary2.stats["decisions"]


def test_cli_names_the_lock_holder(tmp_path):
    """A locked output directory is a user error: one line on stderr, exit code 2, no traceback."""
    import fcntl

    from phi3data.io.writers import LOCK_FILE

    out = tmp_path / "out"
    out.mkdir()
    with open(out / LOCK_FILE, "w") as handle:
        handle.write("pid 4242 on testhost")
        handle.flush()
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = subprocess.run([sys.executable, "-m", "phi3data.cli", "run", str(RECIPE), "--input", str(WARC_DIR),
                               "--output", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:") and "pid 4242 on testhost" in proc.stderr


def test_a_changed_blocklist_file_is_a_new_recipe_even_in_the_same_process(tmp_path):
    """What a stage loads from outside the recipe is part of its identity: edit the domains file and the same
    recipe has a new hash, the old output directory refuses it, and a run in the same process (one worker runs in
    the driver) uses the new list instead of a pipeline cached with the old one."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"d{i}", "text": "some words " * 10, "url": f"https://{host}/p{i}"}) + "\n"
                           for i, host in enumerate(["a.example", "b.example", "c.example"])))
    domains = tmp_path / "blocked.txt"
    domains.write_text("a.example\n")
    recipe = {"pipeline": {"name": "block"}, "stage": [{"type": "url_blocklist", "domains_file": str(domains)}]}
    first = run_pipeline(load_recipe(recipe), inp, tmp_path / "o1", workers=1, progress=False)
    domains.write_text("a.example\nb.example  # and now this one\n")
    with pytest.raises(RecipeError, match="another recipe"):
        run_pipeline(load_recipe(recipe), inp, tmp_path / "o1", workers=1, progress=False)
    second = run_pipeline(load_recipe(recipe), inp, tmp_path / "o2", workers=1, progress=False)
    assert first.stats["recipe_hash"] != second.stats["recipe_hash"]
    assert [i for i, _ in read_output(tmp_path / "o1")] == ["d1", "d2"]
    assert [i for i, _ in read_output(tmp_path / "o2")] == ["d2"]
