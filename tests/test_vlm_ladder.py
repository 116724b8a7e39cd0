"""A [vision] ladder: image-text recipes, each (size, recipe) a small VLM scored on one shared held-out set by
loss per trained token, and reported by the text ladder's report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from phi3data.config import ConfigError
from phi3data.multimodal import easy_vqa
from phi3data.report import ladder as ladder_report
from phi3data.scaling.ladder import load_ladder, run_ladder
from phi3data.scaling.report import write_report

LADDER = """
[ladder]
name = "vlm-tiny"
seeds = [0]
tokens_per_param = 0.5
seq_len = 48
micro_batch_size = 8
lr = 1e-3
device = "cpu"

[vision]
tower = "small"
projector = "mlp2x_gelu"
stage = {{ projector = 1e-3, language_model = 1e-3 }}

[vision.vit]
image_size = 32
patch_size = 16
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 2

[sizes]
xs = {{ hidden_size = 32, intermediate_size = 64, num_hidden_layers = 1, num_attention_heads = 2 }}
s = {{ hidden_size = 48, intermediate_size = 96, num_hidden_layers = 1, num_attention_heads = 2 }}

[recipes.conversations]
sources = ["{records}/conversations"]

[recipes.pairs_and_conversations]
sources = ["{records}/conversations", "{records}/pairs"]

[eval]
val_fraction = 0.2
val_max_docs = 24
vqa = ["easy-vqa"]
limit = 16

[train]
log_every = 100
{extra}
"""

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("easy-vqa")
    easy_vqa.build(root, "train", limit=24)
    return root


def ladder(tmp_path: Path, records: Path, extra: str = "") -> Path:
    path = tmp_path / "ladder.toml"
    path.write_text(LADDER.format(records=records, extra=extra))
    return path


def test_vlm_ladder_runs_end_to_end(records, tmp_path) -> None:
    cfg = load_ladder(ladder(tmp_path, records))
    out = tmp_path / "out"
    results = run_ladder(cfg, out, progress=False)
    assert sorted(r["run"] for r in results) == sorted(
        f"{recipe}/{size}/seed0" for recipe in ("conversations", "pairs_and_conversations") for size in ("xs", "s"))
    validation = {r["validation"]["documents"] for r in results}
    assert len(validation) == 1 and validation.pop() > 0  # every run scored on the same set
    for r in results:
        assert math.isfinite(r["validation"]["loss"]) and r["validation"]["loss"] > 0 and r["validation"]["tokens"]
        assert (Path(r["checkpoint"]) / "phi3data_vlm.json").exists()
    held = set(pq.read_table(out / "data" / "validation").column("id").to_pylist())
    for name in ("conversations", "pairs_and_conversations"):
        assert not held & set(pq.read_table(out / "data" / name).column("id").to_pylist())
    plan = json.loads((out / "plan.json").read_text())
    assert plan["tokenizer"] == "phi3-mini" and plan["vocab_size"] == 32064
    report = write_report(out, n_boot=50).read_text()
    assert "validation loss per trained token" in report and "pairs_and_conversations" in report
    assert (out / "scaling_loss.png").exists() and (out / "scaling_vqa.png").exists()
    assert "| vqa | conversations |" in report  # VQA error fitted against size too
    for r in results:  # scored on the easy-VQA test questions' options, beside the question groups' majority answer
        assert r["vqa"]["easy-vqa"]["n"] == 16 and 0 <= r["vqa"]["easy-vqa"]["acc"] <= 1
    page = ladder_report.build(out)
    assert page["vqa_tasks"] == ["easy-vqa"]
    assert [run["vqa"]["easy-vqa"] for run in page["runs"]] == [
        r["vqa"]["easy-vqa"]["acc"] for r in sorted(results, key=lambda r: (r["recipe"], r["params"], r["seed"]))]
    assert run_ladder(cfg, out, progress=False) == results  # finished: read back, not retrained


def test_vlm_ladder_config_errors(records, tmp_path) -> None:
    with pytest.raises(ConfigError, match="eval.tasks"):
        load_ladder(_with(tmp_path, records, "tasks"))
    with pytest.raises(ConfigError, match="train_vocab"):
        load_ladder(_with(tmp_path, records, "train_vocab"))
    with pytest.raises(ConfigError, match="tower and projector"):
        load_ladder(_with(tmp_path, records, "no_tower"))
    with pytest.raises(ConfigError, match="VQA tasks are"):
        load_ladder(_with(tmp_path, records, "bad_vqa"))
    with pytest.raises(ConfigError, match=r"belong to a ladder with a \[vision\] table"):
        load_ladder(_with(tmp_path, records, "text_with_vqa"))


def _with(tmp_path: Path, records: Path, what: str) -> Path:
    text = ladder(tmp_path, records).read_text()
    if what == "tasks":
        text = text.replace("val_max_docs = 24", 'val_max_docs = 24\ntasks = ["piqa"]')
    elif what == "train_vocab":
        text += "\n[tokenizer]\ntrain_vocab = 512\n"
    elif what == "no_tower":
        text = text.replace('tower = "small"\n', "").replace("[vision.vit]", "[unused]")
    elif what == "bad_vqa":
        text = text.replace('vqa = ["easy-vqa"]', 'vqa = ["gqa"]')
    else:  # a text ladder (no [vision] table) given VQA tasks
        text = text.split("[vision]")[0] + "[sizes]" + text.split("[sizes]")[1]
    path = tmp_path / f"{what}.toml"
    path.write_text(text)
    return path


def test_vlm_ladder_validation_from_eval_sources(records, tmp_path) -> None:
    """[eval] sources: the validation set is exactly those records, and a recipe record with one of their ids is
    not trained on."""
    from phi3data.scaling.vlm_ladder import prepare_image_data

    easy_vqa.build(tmp_path / "test-records", "test", limit=4)
    text = ladder(tmp_path, records).read_text().replace("val_max_docs = 24", "val_max_docs = 1000").replace(
        "val_fraction = 0.2", f'sources = ["{tmp_path}/test-records/conversations", "{records}/pairs"]')
    path = tmp_path / "explicit.toml"
    path.write_text(text)
    cfg = load_ladder(path)
    info = prepare_image_data(cfg, tmp_path / "out")
    test_ids = set(pq.read_table(tmp_path / "test-records" / "conversations").column("id").to_pylist())
    pair_ids = set(pq.read_table(records / "pairs").column("id").to_pylist())
    validation = set(pq.read_table(tmp_path / "out" / "data" / "validation").column("id").to_pylist())
    assert validation == test_ids | pair_ids and info["validation_documents"] == len(validation)
    trained = set(pq.read_table(tmp_path / "out" / "data" / "pairs_and_conversations").column("id").to_pylist())
    assert trained and not trained & pair_ids  # the recipe's pairs are validation records now
    assert info["recipes"]["pairs_and_conversations"]["held_out"] == len(pair_ids)
    assert info["recipes"]["conversations"]["held_out"] == 0
