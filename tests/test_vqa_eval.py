"""VQA metrics on hand-checked cases: answer normalisation, the min(#agree / 3, 1) rule, POPE yes/no metrics,
multiple choice by log-likelihood."""

from __future__ import annotations

import pytest

from phi3data.evaluation.vqa import (
    choose_option,
    majority_answers,
    mean_vqa_accuracy,
    multiple_choice_accuracy,
    normalize_answer,
    pope_metrics,
    vqa_accuracy,
    yes_no,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("raw, normal", [
    ("Two dogs.", "2 dogs"),           # number word, final period
    ("The Cat", "cat"),                # article, case
    ("an apple", "apple"),
    ("black-and-white", "black and white"),  # a hyphen inside a word becomes a space
    ("red - blue", "red blue"),        # a mark touching a space is dropped
    ("1,000", "1000"),                 # digit,digit: punctuation removed
    ("2.5", "2.5"),                    # a period before a digit stays
    ("yes!", "yes"),
    ("dont know", "don't know"),       # contraction restored
    ("  ten\tfeet\n", "10 feet"),
    ("none", "0"),
    ("the", ""),
])
def test_normalize_answer(raw: str, normal: str) -> None:
    assert normalize_answer(raw) == normal


def test_vqa_accuracy_counts_agreeing_humans() -> None:
    refs = ["2"] * 2 + ["3"] * 8
    assert vqa_accuracy("two", refs) == pytest.approx(2 / 3)
    assert vqa_accuracy("Three.", refs) == 1.0
    assert vqa_accuracy("four", refs) == 0.0
    assert vqa_accuracy("2", ["2", "two", "2", "1"]) == 1.0  # three agree after normalisation
    assert vqa_accuracy("1", ["2", "two", "2", "1"]) == pytest.approx(1 / 3)


def test_vqa_accuracy_one_reference_is_exact_match() -> None:
    assert vqa_accuracy("A circle", ["circle"]) == 1.0
    assert vqa_accuracy("circles", ["circle"]) == 0.0
    assert mean_vqa_accuracy(["red", "Blue.", "green"], [["red"], ["blue"], ["teal"]]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])
    with pytest.raises(ValueError):
        mean_vqa_accuracy(["a"], [])


def test_yes_no_reads_the_first_sentence() -> None:
    assert yes_no("Yes, there is.") == "yes"
    assert yes_no("No.") == "no"
    assert yes_no("There is not a dog") == "no"
    assert yes_no("yes. no.") == "yes"
    assert yes_no("red") is None


def test_pope_metrics_by_hand() -> None:
    preds = ["yes", "no", "Yes, there is.", "No.", "maybe"]
    labels = ["yes", "no", "no", "yes", "yes"]
    m = pope_metrics(preds, labels)
    # read as yes, no, yes, no, -: TP 1, FP 1, FN 2 (a no and an unanswered), TN 1
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert m["yes_ratio"] == pytest.approx(2 / 5)
    assert m["unanswered"] == 1


def test_pope_always_yes_and_never_yes() -> None:
    labels = ["yes", "no", "no", "no"]
    always = pope_metrics(["yes"] * 4, labels)
    assert always["recall"] == 1.0 and always["precision"] == 0.25 and always["yes_ratio"] == 1.0
    never = pope_metrics(["no"] * 4, labels)
    assert never["precision"] == 0.0 and never["f1"] == 0.0 and never["accuracy"] == 0.75
    with pytest.raises(ValueError, match="yes or no"):
        pope_metrics(["yes"], ["red"])


def test_multiple_choice() -> None:
    assert choose_option([-3.0, -1.0, -2.0]) == 1
    assert choose_option([-1.0, -1.0]) == 0  # ties: the first
    assert multiple_choice_accuracy([[-3.0, -1.0], [-0.5, -4.0], [-2.0, -2.5]], [1, 1, 0]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        choose_option([])


def test_majority_answers_per_group() -> None:
    answers = ["yes", "no", "No", "circle", "red", "Red", "circle", "red"]
    groups = ["yes/no", "yes/no", "yes/no", "other", "other", "other", "other", "other"]
    assert majority_answers(answers, groups) == {"yes/no": "no", "other": "red"}


# ---- answering with a VLM ---------------------------------------------------------------------------------


def _tiny_vlm(seed: int = 0):
    import torch

    from phi3data.model import Phi3, Phi3Config
    from phi3data.model.vision import ViT, ViTConfig
    from phi3data.model.vlm import VLM

    torch.manual_seed(seed)
    tower = ViT(ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4))
    lm = Phi3(Phi3Config(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128, original_max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=32000))
    return VLM(tower, lm, "mlp2x_gelu").eval()


def _items(n: int):
    from phi3data.evaluation.vlm import easy_vqa_items

    return easy_vqa_items(limit=n)


def test_option_scores_equal_the_full_forward() -> None:
    import torch
    import torch.nn.functional as F

    from phi3data.evaluation.vlm import VLMAnswerer, _pil
    from phi3data.tokenization.tokenizers import get_tokenizer

    vlm = _tiny_vlm()
    tok = get_tokenizer("phi3-mini")
    item = _items(1)[0]
    for blind in (False, True):
        answerer = VLMAnswerer(vlm, tok, blind=blind)
        options = ["yes", "teal", "rectangle"]
        scores = answerer.loglikelihoods(item, options)
        for option, score in zip(options, scores):
            ids, mask, n_images = answerer.encode(item, option)
            assert (ids == vlm.image_token_id).sum() == n_images * vlm.n_tokens == (0 if blind else vlm.n_tokens)
            pixels = vlm.vision_tower.transform(_pil(item.image))[None] if n_images else None
            with torch.no_grad():
                logits, _ = vlm(torch.from_numpy(ids)[None], pixels)
            logprobs = F.log_softmax(logits[0].float(), -1)
            where = torch.from_numpy(mask.nonzero()[0])
            expected = logprobs[where - 1].gather(1, torch.from_numpy(ids)[where][:, None]).sum()
            assert score == pytest.approx(float(expected), abs=1e-4)
    # the image is in the sighted prompt and not in the blind one
    assert VLMAnswerer(vlm, tok).loglikelihoods(item, ["yes"]) != VLMAnswerer(vlm, tok, blind=True).loglikelihoods(
        item, ["yes"])


def test_blind_prompt_is_the_sighted_one_without_image_tokens() -> None:
    """The trainer's blind mode drops the image tokens of the tokenized conversation; a blind question must be
    asked the same way."""
    from phi3data.evaluation.vlm import VLMAnswerer
    from phi3data.tokenization.tokenizers import get_tokenizer

    vlm = _tiny_vlm()
    tok = get_tokenizer("phi3-mini")
    for item in _items(3):
        sighted, sighted_mask, _ = VLMAnswerer(vlm, tok).encode(item, item.answers[0])
        blind, blind_mask, n_images = VLMAnswerer(vlm, tok, blind=True).encode(item, item.answers[0])
        keep = sighted != vlm.image_token_id
        assert n_images == 0 and (~keep).sum() == vlm.n_tokens
        assert blind.tolist() == sighted[keep].tolist() and blind_mask.tolist() == sighted_mask[keep].tolist()


def test_greedy_answer_equals_argmax_of_the_full_forward() -> None:
    import numpy as np
    import torch

    from phi3data.evaluation.vlm import VLMAnswerer, _pil
    from phi3data.tokenization.tokenizers import get_tokenizer

    vlm = _tiny_vlm(1)
    tok = get_tokenizer("phi3-mini")
    item = _items(1)[0]
    answerer = VLMAnswerer(vlm, tok)
    text = answerer.generate(item, max_new_tokens=4)
    ids, mask, _ = answerer.encode(item, "x")
    seq = torch.from_numpy(ids[:int(np.flatnonzero(mask)[0])])[None]
    pixels = vlm.vision_tower.transform(_pil(item.image))[None]
    out = []
    with torch.no_grad():
        for _ in range(4):
            next_id = int(vlm(seq, pixels)[0][0, -1].argmax())
            if next_id in answerer.end_ids:
                break
            out.append(next_id)
            seq = torch.cat([seq, torch.tensor([[next_id]])], 1)
    assert text == tok.decode(out).strip()


def test_batched_answers_equal_one_at_a_time() -> None:

    from phi3data.evaluation.vlm import VLMAnswerer, VQAItem
    from phi3data.tokenization.tokenizers import get_tokenizer

    vlm = _tiny_vlm(3)
    tok = get_tokenizer("phi3-mini")
    items = _items(6)
    items[2] = VQAItem(None, "is this a question without an image?", ["yes"], ["yes", "no"])  # mixed batch
    answerer = VLMAnswerer(vlm, tok, batch_size=4)  # two forward passes, the second one shorter
    batched = answerer.score_options(items, [i.options for i in items])
    for item, scores in zip(items, batched):
        assert scores == pytest.approx(VLMAnswerer(vlm, tok).loglikelihoods(item, item.options), abs=1e-4)
    assert answerer.generate_many(items, 3) == [answerer.generate(i, 3) for i in items]


def test_evaluate_vqa_groups_and_baselines(monkeypatch) -> None:
    """The bookkeeping of evaluate_vqa with a fixed answerer: always 'yes' by options, 'red' by generation."""
    from phi3data.evaluation import vlm as vlm_eval

    monkeypatch.setattr(vlm_eval.VLMAnswerer, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(vlm_eval.VLMAnswerer, "score_options", lambda self, items, options: [
        [0.0 if o == "yes" else -1.0 for o in opts] for opts in options])
    monkeypatch.setattr(vlm_eval.VLMAnswerer, "generate_many", lambda self, items, n=8: ["Red."] * len(items))
    items = [vlm_eval.VQAItem(None, "q1", ["yes"], ["yes", "no"], "yes/no"),
             vlm_eval.VQAItem(None, "q2", ["no"], ["yes", "no"], "yes/no"),
             vlm_eval.VQAItem(None, "q3", ["red"], ["red", "blue", "yes"], "other"),
             vlm_eval.VQAItem(None, "q4", ["blue"], None, "other")]
    r = vlm_eval.evaluate_vqa(None, None, items, majority={"yes/no": "no", "other": "blue"}, batch_questions=3)
    assert r["overall"]["n"] == 4 and r["overall"]["n_options"] == 3
    assert r["overall"]["options_accuracy"] == pytest.approx(1 / 3)   # yes on q1 right, q2 and q3 wrong
    assert r["overall"]["vqa_accuracy"] == pytest.approx(1 / 4)       # red right on q3 only
    assert r["overall"]["majority_accuracy"] == pytest.approx(2 / 4)  # no on q2, blue on q4
    yn = r["groups"]["yes/no"]
    assert yn["pope_options"]["yes_ratio"] == 1.0 and yn["pope_options"]["precision"] == 0.5
    assert yn["pope_generate"]["unanswered"] == 2 and yn["pope_generate"]["accuracy"] == 0.0
    assert "pope_options" not in r["groups"]["other"]
    assert r["groups"]["other"]["options_accuracy"] == 0.0  # q3 only: 'yes' picked
    with pytest.raises(ValueError, match="modes"):
        vlm_eval.evaluate_vqa(None, None, items, modes=["beam"])


def test_chart_items_have_exact_answers() -> None:
    from phi3data.evaluation.vlm import chart_items

    items = chart_items(seed=7, count=2)
    kinds = {i.group for i in items}
    assert {"max", "min", "value", "difference", "count"} <= kinds
    for item in items:
        if item.options is not None:
            assert item.answers[0] in item.options
    maxq = next(i for i in items if i.group == "max")
    assert isinstance(maxq.image, bytes) and maxq.image[:4] == b"\x89PNG"


def test_eval_cli_scores_an_exported_vlm(tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from phi3data.cli import app
    from phi3data.export.llava import save_llava

    save_llava(_tiny_vlm(2), tmp_path / "vlm")
    out = tmp_path / "vqa.json"
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "vlm"), "--tokenizer", "phi3-mini", "--vqa",
                                      "easy-vqa", "--limit", "12", "--output", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())["tasks"]["easy-vqa"]
    assert r["n"] == 12 and set(r["groups"]) <= {"yes/no", "other"}
    assert sum(g["n"] for g in r["groups"].values()) == 12
    assert 0.0 <= r["overall"]["options_accuracy"] <= 1.0 and "vqa_accuracy" in r["overall"]
    assert r["overall"]["majority_accuracy"] > 0  # 'yes'/'no' is right on some of the 12
    assert all(item["option"] in ("yes", "no", "circle", "rectangle", "triangle", "red", "green", "blue", "black",
                                  "gray", "yellow", "teal", "brown") for item in r["items"])


def test_eval_cli_vqa_bad_inputs(tmp_path) -> None:
    from typer.testing import CliRunner

    from phi3data.cli import app

    for args, named in [([str(tmp_path / "no-checkpoint"), "--vqa", "easy-vqa"], "no-checkpoint"),
                        ([str(tmp_path), "--vqa", "no-such-task"], "no-such-task")]:
        result = CliRunner().invoke(app, ["eval", *args, "--tokenizer", "phi3-mini"])
        assert result.exit_code == 2 and named in result.stderr, result.output
