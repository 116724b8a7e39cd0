"""Benchmark loading and scoring, checked against an independent, unbatched computation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SHARED

from phi3data.evaluation.harness import logits_fn_for, score_gsm8k, score_multiple_choice, split_tokens, validation_loss
from phi3data.evaluation.tasks import final_number, load_gsm8k, load_mc_task, subsample, with_shots

EVAL = SHARED / "eval"


@pytest.fixture(scope="module")
def tokenizer():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(SHARED / "tokenizers" / "llama2" / "tokenizer.model"))


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                     pad_token_id=0)
    return Phi3ForCausalLM(cfg).eval()


def test_task_sizes_and_gold_labels():
    sizes = {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "openbookqa": 500, "boolq": 3270,
             "hellaswag": 1000, "mmlu": 14042}
    for name, size in sizes.items():
        items = load_mc_task(name, EVAL)
        assert len(items) == size, name
        assert all(0 <= it.gold < len(it.choices) for it in items), name
        assert all(c.startswith(" ") for it in items for c in it.choices), name
    gsm = load_gsm8k(EVAL, k=2)
    assert len(gsm) == 1319 and gsm[0].answer == "18"
    assert gsm[0].prompt.count("The answer is") == 2 and gsm[0].prompt.endswith("Answer:")


def test_final_number():
    assert final_number("so 3 + 4 = 7. The answer is 1,234.") == "1234"
    assert final_number("costs $18.00 total") == "18"
    assert final_number("-5 degrees") == "-5"
    assert final_number("no digits") is None


def test_shots_never_include_the_item():
    items = load_mc_task("arc_easy", EVAL)[:50]
    shot = with_shots(items, 3, seed=7)
    for item, prompted in zip(items, shot):
        assert prompted.context.endswith(item.context)
        examples = prompted.context[: -len(item.context)]
        assert examples.count("Answer:") == 3 and item.context not in examples


def _independent_loglikelihood(model, tokenizer, context: str, choice: str) -> float:
    """Unbatched, unpadded: one forward over context + continuation, summed log-probs of the continuation."""
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + choice)
    assert whole[: len(ctx)] == ctx
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return sum(logprobs[pos - 1, whole[pos]].item() for pos in range(len(ctx), len(whole)))


def test_multiple_choice_scores_match_an_independent_computation(hf_model, tokenizer):
    items = subsample(load_mc_task("piqa", EVAL), 6, seed=3) + subsample(load_mc_task("mmlu", EVAL), 4, seed=3)
    result = score_multiple_choice(logits_fn_for(hf_model), tokenizer.encode, items, max_length=2048, batch_size=5)
    correct = correct_norm = 0
    p_sum = 0.0
    for item, got in zip(items, result["items"]):
        expected = [_independent_loglikelihood(hf_model, tokenizer, item.context, c) for c in item.choices]
        assert got["loglikelihoods"] == pytest.approx(expected, abs=2e-3)
        correct += max(range(len(expected)), key=expected.__getitem__) == item.gold
        norm = [v / len(c) for v, c in zip(expected, item.choices)]
        correct_norm += max(range(len(norm)), key=norm.__getitem__) == item.gold
        z = sum(math.exp(v) for v in expected)
        p_sum += math.exp(expected[item.gold]) / z
    assert result["acc"] == correct / len(items)
    assert result["acc_norm"] == correct_norm / len(items)
    assert result["prob_correct"] == pytest.approx(p_sum / len(items), abs=1e-4)


def test_split_tokens_uses_joint_tokenization(tokenizer):
    req = split_tokens(tokenizer.encode, "Question: is it?\nAnswer:", " yes")
    assert tokenizer.decode(req.context + req.continuation) == "Question: is it?\nAnswer: yes"
    assert tokenizer.decode(req.continuation) == "yes"


def test_validation_loss_and_bits_per_byte(hf_model, tokenizer):
    texts = ["The cell membrane controls what enters and leaves the cell. " * 20, "Short text."]
    out = validation_loss(logits_fn_for(hf_model), tokenizer.encode, texts, max_length=64)
    # independent: one long window per text would differ; recompute with the same windows by hand
    nll, count, n_bytes = 0.0, 0, 0
    for text in texts:
        ids = tokenizer.encode(text)
        n_bytes += len(text.encode())
        for start in range(0, len(ids) - 1, 64):
            piece = ids[start:start + 65]
            if len(piece) < 2:
                continue
            with torch.no_grad():
                logits = hf_model(torch.tensor([piece[:-1]])).logits[0]
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor(piece[1:]), reduction="sum").item()
            count += len(piece) - 1
    assert out["tokens"] == count
    assert out["loss"] == pytest.approx(nll / count, rel=1e-4)
    assert out["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-4)
    assert out["loss"] == pytest.approx(math.log(32000), rel=0.05)  # random weights: near uniform


def test_gsm8k_generation_runs_and_scores(hf_model, tokenizer):
    items = load_gsm8k(EVAL, k=1)[:2]
    out = score_gsm8k(logits_fn_for(hf_model), tokenizer.encode, tokenizer.decode, items, max_length=512,
                      max_new_tokens=8)
    assert out["n"] == 2 and len(out["items"]) == 2
    assert out["exact_match"] == sum(a["predicted"] == a["gold"] for a in out["items"]) / 2


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A small random phi-3 with phi-3-mini's vocabulary, saved as a Hugging Face checkpoint."""
    from phi3data.model.hf import save_hf
    from phi3data.model.model import Phi3, Phi3Config

    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=32064, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=256, original_max_position_embeddings=256)
    return save_hf(Phi3(cfg), tmp_path_factory.mktemp("eval") / "checkpoint")


def _val_file(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_evaluate_checkpoint_runs_on_the_device_it_is_given(tiny_checkpoint, tmp_path):
    from phi3data.evaluation.run import evaluate_checkpoint

    val = _val_file(tmp_path / "val.jsonl", [json.dumps({"id": str(i), "text": f"The {i}th cell divides. " * 30})
                                             for i in range(3)])
    auto = evaluate_checkpoint(tiny_checkpoint, "phi3-mini", ["piqa"], limit=6, shots=0, val_text=val, eval_dir=EVAL,
                               device="auto")
    assert auto["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    cpu = evaluate_checkpoint(tiny_checkpoint, "phi3-mini", ["piqa"], limit=6, shots=0, val_text=val, eval_dir=EVAL,
                              device="cpu")
    assert cpu["device"] == "cpu" and cpu["tasks"]["piqa"]["n"] == 6 and cpu["tasks"]["piqa"]["chance"] == 0.5
    assert [it["p_gold"] for it in auto["tasks"]["piqa"]["items"]] == pytest.approx(
        [it["p_gold"] for it in cpu["tasks"]["piqa"]["items"]], abs=1e-3)
    assert auto["validation"]["loss"] == pytest.approx(cpu["validation"]["loss"], rel=1e-3)
    assert cpu["validation"]["bytes"] == 3 * len(("The 0th cell divides. " * 30).encode())
    with pytest.raises(RuntimeError, match="nonsense"):  # the name reaches torch: no silent fallback to the CPU
        evaluate_checkpoint(tiny_checkpoint, "phi3-mini", ["piqa"], limit=2, eval_dir=EVAL, device="nonsense")


def test_validation_text_with_a_bad_line_is_an_error(tiny_checkpoint, tmp_path):
    from phi3data.evaluation.run import evaluate_checkpoint

    val = _val_file(tmp_path / "val.jsonl", [json.dumps({"text": "Good text."}), '{"text": "cut'])
    with pytest.raises(ValueError, match=r"val.jsonl: unreadable record at byte 23: malformed_json"):
        evaluate_checkpoint(tiny_checkpoint, "phi3-mini", [], val_text=val, device="cpu")


def test_benchmarks_load_from_the_configured_eval_dir(tmp_path, monkeypatch):
    """The default eval directory is $PHI3DATA_EVAL (phi3data.paths); a malformed benchmark line is an error."""
    rows = [{"query": f"Question: q{i}\n", "choices": ["a", "b"], "gold": i % 2} for i in range(3)]
    piqa = tmp_path / "gauntlet" / "piqa.jsonl"
    piqa.parent.mkdir()
    piqa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("PHI3DATA_EVAL", str(tmp_path))
    items = load_mc_task("piqa")
    assert [it.context for it in items] == ["Question: q0\nAnswer:", "Question: q1\nAnswer:", "Question: q2\nAnswer:"]
    assert [it.gold for it in items] == [0, 1, 0]
    piqa.write_text(piqa.read_text() + '{"query": "broken\n')
    with pytest.raises(ValueError, match="piqa.jsonl: unreadable benchmark record"):
        load_mc_task("piqa")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "hellaswag")):
        load_mc_task("hellaswag")
