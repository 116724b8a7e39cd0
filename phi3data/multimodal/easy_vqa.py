"""The easy-VQA data set (the ``easy-vqa`` PyPI package) as phi3data image-text records.

easy-VQA has 4,000 train and 1,000 test images (64 x 64 PNG, one coloured shape on a white background) and
~48k questions with 13 one-word answers (``yes`` / ``no``, 3 shapes, 8 colours). It has no captions, so a
caption is derived from each image's question-answer pairs: every image's questions together name its shape and
colour (``"what is the blue shape?" -> "rectangle"`` names both), giving ``"a blue rectangle"``. Where the
questions leave an attribute open (~5% of images), it is read from the pixels: the shape is drawn in an exact
colour of :data:`PALETTE`; a rectangle fills its bounding box, and a circle is balanced about the box's centre
lines while a triangle is not (its base half holds ~3/4 of its area).

- :func:`pair_records`: one image-caption pair per image (LLaVA stage 1);
- :func:`conversation_records`: one conversation per question, ``user: <|image|>\\nQUESTION`` /
  ``assistant: ANSWER`` (stage 2);
- :func:`test_triples`: ``(image bytes, question, answer)`` of the test split, for VQA evaluation;
- :func:`build`: both record kinds of a split written as parquet (``python -m phi3data.multimodal.easy_vqa OUT``).

Records are deterministic: same package data, same ids and bytes.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pyarrow as pa

from phi3data.multimodal.records import IMAGE_PLACEHOLDER, make_conversations, make_pairs

SPLITS = ("train", "test")
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "yellow", "teal", "brown")
PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
           "gray": (128, 128, 128), "yellow": (255, 255, 0), "teal": (0, 128, 128), "brown": (165, 42, 42)}
SOURCE = "easy-vqa"

_COLOR_SHAPE = re.compile(r"^what is the (\w+) shape\?$")  # answer: the shape
_COLOR_OF = re.compile(r"^what (?:color is|is the color of) the (\w+)\?$")  # answer: the colour; group: shape?
_WHAT_SHAPE = re.compile(r"^what shape (?:is in the image|does the image contain|is present)\?$")


def _package():
    try:
        import easy_vqa
    except ImportError as exc:
        raise ImportError("easy-VQA needs the easy-vqa package: pip install easy-vqa") from exc
    return easy_vqa


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"easy-VQA split must be one of {', '.join(SPLITS)}, got {split!r}")


@lru_cache(maxsize=2)
def questions(split: str = "train") -> list[tuple[str, str, int]]:
    """``(question, answer, image number)`` of a split, in the package's order."""
    _check_split(split)
    pkg = _package()
    texts, answers, images = pkg.get_train_questions() if split == "train" else pkg.get_test_questions()
    return list(zip(texts, answers, (int(i) for i in images), strict=True))


@lru_cache(maxsize=2)
def image_paths(split: str = "train") -> dict[int, str]:
    """Image number -> PNG path of a split."""
    _check_split(split)
    pkg = _package()
    return dict(pkg.get_train_image_paths() if split == "train" else pkg.get_test_image_paths())


def image_bytes(split: str, number: int) -> bytes:
    """The PNG bytes of one image."""
    return Path(image_paths(split)[number]).read_bytes()


def _yes_no_attribute(question: str, answer: str) -> tuple[str, str] | None:
    """(kind, value) that a yes/no question proves present: ``is there a red shape?`` + yes, or the negated forms
    (``is there not a circle?`` + no)."""
    words = re.findall(r"[a-z]+", question)
    negated = "not" in words or "no" in words
    present = (answer == "yes") != negated
    if not present:
        return None
    for w in words:
        if w in COLORS:
            return "color", w
        if w in SHAPES:
            return "shape", w
    return None


def pixel_attributes(data: bytes) -> dict[str, str]:
    """``{"shape": ..., "color": ...}`` read from an easy-VQA image's pixels (empty when no palette colour is
    drawn)."""
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        pixels = np.asarray(img.convert("RGB"))
    masks = {name: (pixels == rgb).all(-1) for name, rgb in PALETTE.items()}
    color = max(masks, key=lambda name: int(masks[name].sum()))
    ys, xs = np.nonzero(masks[color])
    if len(ys) < 4:
        return {}
    fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    cy, cx = (ys.max() + ys.min()) / 2, (xs.max() + xs.min()) / 2
    imbalance = max(abs(int((ys < cy).sum()) - int((ys > cy).sum())),
                    abs(int((xs < cx).sum()) - int((xs > cx).sum()))) / len(ys)
    shape = "rectangle" if fill > 0.95 else "circle" if imbalance < 0.25 else "triangle"
    return {"color": color, "shape": shape}


@lru_cache(maxsize=2)
def question_attributes(split: str = "train") -> dict[int, dict[str, str]]:
    """Image number -> ``{"shape": ..., "color": ...}`` as far as the image's questions reveal them (an image whose
    questions never name its colour has no ``color``). Raises ValueError when two questions contradict."""
    found: dict[int, dict[str, str]] = {}
    for question, answer, number in questions(split):
        facts: list[tuple[str, str]] = []
        if m := _COLOR_SHAPE.match(question):
            facts += [("color", m.group(1)), ("shape", answer)]
        elif m := _COLOR_OF.match(question):
            facts.append(("color", answer))
            if m.group(1) in SHAPES:
                facts.append(("shape", m.group(1)))
        elif _WHAT_SHAPE.match(question):
            facts.append(("shape", answer))
        elif answer in ("yes", "no") and (fact := _yes_no_attribute(question, answer)):
            facts.append(fact)
        for kind, value in facts:
            known = found.setdefault(number, {})
            if known.setdefault(kind, value) != value:
                raise ValueError(f"easy-VQA {split} image {number}: questions say {kind} {known[kind]!r} and {value!r}")
    return found


@lru_cache(maxsize=2)
def attributes(split: str = "train") -> dict[int, dict[str, str]]:
    """Image number -> ``{"shape": ..., "color": ...}`` of every image: what its questions say, the rest read from
    its pixels."""
    told = question_attributes(split)
    out = {}
    for number in sorted(image_paths(split)):
        known = told.get(number, {})
        if len(known) < 2:
            known = {**pixel_attributes(image_bytes(split, number)), **known}
        out[number] = known
    return out


def caption(attrs: dict[str, str]) -> str:
    """``"a blue circle"``; ``"a circle"`` or ``"a blue shape"`` when one attribute is unknown."""
    words = [attrs["color"]] if "color" in attrs else []
    words.append(attrs.get("shape", "shape"))
    return "a " + " ".join(words)


def _numbers(split: str, limit: int | None) -> list[int]:
    numbers = sorted(image_paths(split))
    return numbers if limit is None else numbers[:limit]


def pair_records(split: str = "train", limit: int | None = None) -> pa.Table:
    """One image-caption pair per image (the first ``limit`` images by number). Metadata: split, image number,
    shape and colour."""
    attrs = attributes(split)
    rows = []
    for n in _numbers(split, limit):
        a = attrs.get(n, {})
        rows.append({"image": image_bytes(split, n), "text": caption(a), "source": SOURCE,
                     "metadata": {"split": split, "image": n, **a}})
    return make_pairs(rows)


def conversation_records(split: str = "train", limit: int | None = None) -> pa.Table:
    """One single-turn conversation per question about the first ``limit`` images: the image then the question,
    answered by the one-word answer. Ids are ``easy-vqa-SPLIT-QUESTION_INDEX``."""
    keep = set(_numbers(split, limit))
    cache: dict[int, bytes] = {}
    rows = []
    for q, (question, answer, n) in enumerate(questions(split)):
        if n not in keep:
            continue
        if n not in cache:
            cache[n] = image_bytes(split, n)
        rows.append({"id": f"{SOURCE}-{split}-{q}", "source": SOURCE,
                     "messages": [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"},
                                  {"role": "assistant", "content": answer}],
                     "images": [cache[n]], "metadata": {"split": split, "image": n, "question": q}})
    return make_conversations(rows)


def test_triples(limit: int | None = None) -> list[tuple[bytes, str, str]]:
    """``(image PNG bytes, question, answer)`` of the test split, in the package's question order (the first
    ``limit`` questions)."""
    rows = questions("test") if limit is None else questions("test")[:limit]
    cache: dict[int, bytes] = {}
    out = []
    for question, answer, n in rows:
        if n not in cache:
            cache[n] = image_bytes("test", n)
        out.append((cache[n], question, answer))
    return out


def build(out_dir: str | Path, split: str = "train", limit: int | None = None) -> dict[str, Path]:
    """Write ``OUT/pairs/easy-vqa-SPLIT.parquet`` and ``OUT/conversations/easy-vqa-SPLIT.parquet`` (the first
    ``limit`` images of the split); returns the two paths. Each folder is an input of
    ``phi3data tokenize --images``."""
    from phi3data.multimodal.writers import write_parquet

    out_dir = Path(out_dir)
    return {"pairs": write_parquet(pair_records(split, limit), out_dir / "pairs" / f"{SOURCE}-{split}.parquet"),
            "conversations": write_parquet(conversation_records(split, limit),
                                           out_dir / "conversations" / f"{SOURCE}-{split}.parquet")}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write easy-VQA as phi3data pair and conversation parquet.")
    parser.add_argument("output", type=Path)
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    args = parser.parse_args()
    for kind, path in build(args.output, args.split, args.limit).items():
        print(f"{kind}: {path}")
