"""Visual question answering metrics: VQA accuracy, POPE-style yes/no metrics and multiple-choice accuracy.

VQA accuracy follows the VQA challenge's evaluation (Antol et al. 2015, visualqa.org/evaluation): an answer and
its references are normalised the same way (lowercase; punctuation dropped or turned into spaces; a period kept
only inside a number; number words zero..ten as digits; articles dropped; apostrophe-less contractions restored),
then an answer scores ``min(#references equal to it / 3, 1)``: right when at least three of the (usually ten)
human answers agree. With a single reference this is plain exact match after normalisation.

POPE (Li et al. 2023) asks object-presence yes/no questions and reports accuracy, precision, recall and F1 with
"yes" as the positive class, and the share of "yes" answers (a model that always says yes scores a yes-ratio of 1).

Multiple choice picks the option with the highest model log-likelihood.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# punctuation the VQA evaluation removes or turns into a space; the apostrophe stays (contractions) and the period
# is handled on its own (kept between digits: "2.5")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# common contractions typed without their apostrophe, restored so "dont" and "don't" compare equal
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hes": "he's", "howd": "how'd", "hows": "how's", "im": "i'm", "isnt": "isn't",
    "itll": "it'll", "ive": "i've", "lets": "let's", "mightnt": "mightn't", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "shant": "shan't", "shes": "she's",
    "shouldnt": "shouldn't", "shouldve": "should've", "thats": "that's", "theres": "there's", "theyd": "they'd",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "werent": "weren't",
    "weve": "we've", "whats": "what's", "wheres": "where's", "whos": "who's", "whys": "why's", "wont": "won't",
    "wouldnt": "wouldn't", "wouldve": "would've", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _punctuation(text: str) -> str:
    """Drop a punctuation mark that touches a space (or any mark when the text has a digit,digit comma: "1,000");
    turn the others into spaces ("black-and-white" -> "black and white"); drop periods not followed by a digit."""
    original = text  # each mark is judged by where it stands in the answer as given
    glued_number = _DIGIT_COMMA_DIGIT.search(original) is not None
    for p in PUNCTUATION:
        if p not in original:
            continue
        if glued_number or f"{p} " in original or f" {p}" in original:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", text)


def normalize_answer(text: str) -> str:
    """An answer as the VQA evaluation compares it."""
    text = _punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """``min(#references equal to the prediction / 3, 1)`` after normalisation; exact match for one reference."""
    if not references:
        raise ValueError("a VQA question needs at least one reference answer")
    pred = normalize_answer(prediction)
    agree = sum(normalize_answer(r) == pred for r in references)
    if len(references) == 1:
        return float(agree)
    return min(agree / 3, 1.0)


def mean_vqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean :func:`vqa_accuracy` over questions."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} questions")
    if not predictions:
        raise ValueError("no questions to score")
    return sum(vqa_accuracy(p, r) for p, r in zip(predictions, references)) / len(predictions)


def yes_no(text: str) -> str | None:
    """"yes", "no" or None (neither) for a free-form answer, as POPE reads it: the first sentence says no when it
    holds the word "no" or "not", yes when it holds "yes"."""
    first = text.strip().split(".")[0]
    words = set(re.findall(r"[a-z']+", first.lower()))
    if words & {"no", "not"}:
        return "no"
    if "yes" in words:
        return "yes"
    return None


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1 ("yes" positive) and yes-ratio of free-form answers against yes/no labels.

    An answer that says neither yes nor no (see :func:`yes_no`) counts as not-yes and as wrong; ``unanswered``
    counts them. Precision is 0 when the model never says yes."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("no questions to score")
    gold = []
    for label in labels:
        g = normalize_answer(label)
        if g not in ("yes", "no"):
            raise ValueError(f"POPE labels are yes or no, got {label!r}")
        gold.append(g)
    read = [yes_no(p) for p in predictions]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(read, gold))
    fp = sum(p == "yes" and g == "no" for p, g in zip(read, gold))
    fn = sum(p != "yes" and g == "yes" for p, g in zip(read, gold))
    correct = sum(p == g for p, g in zip(read, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(gold)
    return {"n": n, "accuracy": correct / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "unanswered": sum(p is None for p in read)}


def choose_option(loglikelihoods: Sequence[float]) -> int:
    """Index of the most likely option (the first one on a tie)."""
    if not loglikelihoods:
        raise ValueError("no options to choose from")
    return max(range(len(loglikelihoods)), key=loglikelihoods.__getitem__)


def multiple_choice_accuracy(loglikelihoods: Sequence[Sequence[float]], gold: Sequence[int]) -> float:
    """Share of questions whose most likely option is the gold one."""
    if len(loglikelihoods) != len(gold):
        raise ValueError(f"{len(loglikelihoods)} scored questions for {len(gold)} gold answers")
    if not gold:
        raise ValueError("no questions to score")
    return sum(choose_option(ll) == g for ll, g in zip(loglikelihoods, gold)) / len(gold)


def majority_answers(answers: Sequence[str], groups: Sequence[str]) -> dict[str, str]:
    """The most common normalised answer of each group (ties: the answer seen first), e.g. from a train split."""
    counts: dict[str, dict[str, int]] = {}
    for answer, group in zip(answers, groups, strict=True):
        per = counts.setdefault(group, {})
        key = normalize_answer(answer)
        per[key] = per.get(key, 0) + 1
    return {g: max(per, key=per.__getitem__) for g, per in counts.items()}
