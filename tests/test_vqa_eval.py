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
