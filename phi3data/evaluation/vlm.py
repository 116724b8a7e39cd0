"""Answer visual questions with a :class:`~phi3data.model.vlm.VLM` and score the answers (:mod:`.vqa`).

A question is asked exactly as the model was trained on it: phi-3 chat, ``user: <|image|>\\nQUESTION``, with the
image placeholder expanded to the tower's token count (:func:`phi3data.tokenization.images.encode_image_chat`);
a *blind* model (trained without images) gets the question alone. Two ways to answer:

- ``generate``: greedy decoding until ``<|end|>``, scored by VQA accuracy (and POPE metrics on yes/no questions);
- ``options``: the log-likelihood of each answer of a closed set (the whole assistant reply as trained: the
  answer, ``<|end|>`` and the end-of-text token), the most likely one taken. For a tiny model on a closed answer
  set (easy-VQA's 13 answers) this is the fairer test: it does not depend on the model ending its answer.

Results are reported overall and per ``group`` of question (e.g. ``yes/no`` and ``other``), next to the accuracy
of always giving each group's majority answer when one is supplied.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from phi3data.evaluation.vqa import (
    choose_option,
    mean_vqa_accuracy,
    normalize_answer,
    pope_metrics,
    vqa_accuracy,
)

MODES = ("options", "generate")


@dataclass
class VQAItem:
    """One question about one image. ``image``: encoded bytes, a path or a PIL image (None: no image);
    ``answers``: the reference answer(s); ``options``: the closed answer set to score (None: generate only);
    ``group``: the kind of question results are broken down by."""

    image: Any
    question: str
    answers: list[str]
    options: list[str] | None = None
    group: str = "all"
    meta: dict = field(default_factory=dict)


def easy_vqa_items(limit: int | None = None) -> list[VQAItem]:
    """The easy-VQA test split as items: the 13 answers as options, group ``yes/no`` or ``other``."""
    from phi3data.multimodal.easy_vqa import COLORS, SHAPES, test_triples

    options = ["yes", "no", *SHAPES, *COLORS]
    return [VQAItem(image, question, [answer], options, "yes/no" if answer in ("yes", "no") else "other")
            for image, question, answer in test_triples(limit)]


def easy_vqa_majority() -> dict[str, str]:
    """The most common train answer of each easy-VQA group (``yes/no``, ``other``)."""
    from phi3data.evaluation.vqa import majority_answers
    from phi3data.multimodal.easy_vqa import questions

    rows = questions("train")
    return majority_answers([a for _, a, _ in rows], ["yes/no" if a in ("yes", "no") else "other" for _, a, _ in rows])


def chart_items(seed: int, count: int, start: int = 0) -> list[VQAItem]:
    """Questions about rendered synthetic charts (:mod:`phi3data.multimodal.synthetic`), one item per question,
    grouped by question kind. Category questions (highest, lowest) take the chart's categories as options, the
    trend question up / down, the count question 2..8; value and difference questions are generated only."""
    from phi3data.multimodal.synthetic import chart_record

    items = []
    for index in range(start, start + count):
        record = chart_record(seed, index)
        table = record["metadata"]["table"]
        for qa in record["metadata"]["qa"]:
            options = {"max": table["categories"], "min": table["categories"], "trend": ["up", "down"],
                       "count": [str(n) for n in range(2, 9)]}.get(qa["kind"])
            items.append(VQAItem(record["images"][0], qa["question"], [qa["answer"]], options, qa["kind"],
                                 {"chart": table["chart"], "index": index}))
    return items


def _pil(image: Any):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        image = Path(image).read_bytes()
    with Image.open(io.BytesIO(image)) as img:
        return img.convert("RGB")


def final_hidden(vlm, embeds: torch.Tensor) -> torch.Tensor:
    """The language model's last hidden states (after the final norm) for input embeddings; logits are
    ``lm_head`` of them, computed only where needed (the full ``T x vocab`` logits dominate a tiny model's cost)."""
    lm = vlm.language_model
    x = embeds
    if lm.cfg.mup_embedding_multiplier != 1.0:
        x = x * lm.cfg.mup_embedding_multiplier
    cos, sin = lm.rotary(x.shape[1], x.dtype)
    for block in lm.model.layers:
        x = block(x, cos, sin, None)
    return lm.model.norm(x)


def _logits(vlm, hidden: torch.Tensor) -> torch.Tensor:
    logits = vlm.language_model.lm_head(hidden).float()
    return logits / vlm.language_model.cfg.mup_width_multiplier


class VLMAnswerer:
    """Asks a VLM questions in its training format. ``blind``: leave the image out of the prompt (a model
    trained without images)."""

    def __init__(self, vlm, tokenizer, *, blind: bool = False, device: str = "cpu", batch_size: int = 32) -> None:
        self.vlm = vlm.eval().to(device)
        self.tok = tokenizer
        self.blind = blind
        self.device = device
        self.batch_size = batch_size
        self.end_ids = {tokenizer.special_tokens["<|end|>"], tokenizer.eos_id}

    def encode(self, item: VQAItem, answer: str) -> tuple[np.ndarray, np.ndarray, int]:
        """Token ids with the image expanded, the assistant mask, and the number of images (0 or 1)."""
        from phi3data.multimodal.records import IMAGE_PLACEHOLDER
        from phi3data.tokenization.images import encode_image_chat

        with_image = item.image is not None and not self.blind
        user = f"{IMAGE_PLACEHOLDER}\n{item.question}" if with_image else item.question
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        ids, mask, positions = encode_image_chat(messages, int(with_image), self.tok, mask="assistant")
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[positions] = self.vlm.n_tokens
        is_image = np.zeros(len(ids), dtype=bool)
        is_image[positions] = True
        ids = np.repeat(ids, repeats)
        ids[np.repeat(is_image, repeats)] = self.vlm.image_token_id
        return ids, np.repeat(mask, repeats), int(with_image)

    def _features(self, item: VQAItem, n_images: int) -> torch.Tensor | None:
        if not n_images:
            return None
        pixels = self.vlm.vision_tower.transform(_pil(item.image))[None].to(self.device)
        return self.vlm.vision_features(pixels)

    @torch.no_grad()
    def loglikelihoods(self, item: VQAItem, options: Sequence[str]) -> list[float]:
        """Sum of log p(assistant reply) for each option."""
        encoded = [self.encode(item, option) for option in options]
        n_images = encoded[0][2]
        features = self._features(item, n_images)
        scores: list[float] = []
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start:start + self.batch_size]
            width = max(len(ids) for ids, _, _ in chunk)
            batch = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (ids, _, _) in enumerate(chunk):
                batch[r, :len(ids)] = torch.from_numpy(ids)
            batch = batch.to(self.device)
            feats = None if features is None else features.expand(len(chunk), -1, -1)
            embeds = self.vlm.embed(batch, feats if feats is not None else self._no_features(),
                                    batch == self.vlm.image_token_id)
            hidden = final_hidden(self.vlm, embeds)
            for r, (ids, mask, _) in enumerate(chunk):
                where = np.flatnonzero(mask)  # token t is predicted at position t - 1
                logprobs = F.log_softmax(_logits(self.vlm, hidden[r, where - 1]), dim=-1)
                target = torch.from_numpy(ids[where]).to(self.device)
                scores.append(float(logprobs.gather(1, target[:, None]).sum()))
        return scores

    def _no_features(self) -> torch.Tensor:
        tower = self.vlm.vision_tower
        return torch.zeros(0, self.vlm.n_tokens, tower.hidden_size, device=self.device)

    @torch.no_grad()
    def generate(self, item: VQAItem, max_new_tokens: int = 8) -> str:
        """The greedy answer, up to ``<|end|>`` or end of text."""
        ids, mask, n_images = self.encode(item, "x")
        prompt = torch.from_numpy(ids[:int(np.flatnonzero(mask)[0])])[None].to(self.device)
        features = self._features(item, n_images)
        embeds = self.vlm.embed(prompt, features if features is not None else self._no_features(),
                                prompt == self.vlm.image_token_id)
        out: list[int] = []
        for _ in range(max_new_tokens):
            hidden = final_hidden(self.vlm, embeds)
            next_id = int(_logits(self.vlm, hidden[0, -1]).argmax())
            if next_id in self.end_ids:
                break
            out.append(next_id)
            token = torch.tensor([[next_id]], device=self.device)
            embeds = torch.cat([embeds, self.vlm.language_model.model.embed_tokens(token)], dim=1)
        return self.tok.decode(out).strip()


def _is_yes_no(rows: list[dict]) -> bool:
    return bool(rows) and all(normalize_answer(r["answers"][0]) in ("yes", "no") for r in rows)


def _group_metrics(rows: list[dict], majority: dict[str, str] | None) -> dict:
    """Options metrics over the rows scored on options, generation metrics over all rows (when generated),
    POPE metrics where every answer is yes or no, the majority-answer accuracy when every group has one."""
    out: dict[str, Any] = {"n": len(rows)}
    optioned = [r for r in rows if "option" in r]
    if optioned:
        out["n_options"] = len(optioned)
        out["options_accuracy"] = sum(vqa_accuracy(r["option"], r["answers"]) for r in optioned) / len(optioned)
        if _is_yes_no(optioned):
            out["pope_options"] = pope_metrics([r["option"] for r in optioned], [r["answers"][0] for r in optioned])
    if rows and all("generated" in r for r in rows):
        out["vqa_accuracy"] = mean_vqa_accuracy([r["generated"] for r in rows], [r["answers"] for r in rows])
        if _is_yes_no(rows):
            out["pope_generate"] = pope_metrics([r["generated"] for r in rows], [r["answers"][0] for r in rows])
    if majority is not None and rows and all(r["group"] in majority for r in rows):
        out["majority_accuracy"] = sum(vqa_accuracy(majority[r["group"]], r["answers"]) for r in rows) / len(rows)
    return out


def evaluate_vqa(vlm, tokenizer, items: Sequence[VQAItem], *, modes: Sequence[str] = MODES, blind: bool = False,
                 majority: dict[str, str] | None = None, device: str = "cpu", max_new_tokens: int = 8,
                 progress: bool = False) -> dict:
    """Answer every item in each of ``modes`` and score: ``overall`` and per ``groups`` metrics (options accuracy,
    VQA accuracy of greedy answers, POPE metrics where every answer is yes/no, the majority-answer accuracy given
    ``majority``: group -> answer) and the per-item answers under ``items``. ``options`` mode scores only items
    with options; where some items lack them, the options metrics cover the items that have them."""
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        raise ValueError(f"modes must be among {', '.join(MODES)}, got {list(modes)}")
    if not items:
        raise ValueError("no questions to evaluate")
    answerer = VLMAnswerer(vlm, tokenizer, blind=blind, device=device)
    rows = []
    iterator = items
    if progress:
        from tqdm import tqdm

        iterator = tqdm(items, desc="vqa", unit="q")
    for item in iterator:
        row: dict[str, Any] = {"question": item.question, "answers": list(item.answers), "group": item.group}
        if "options" in modes and item.options:
            scores = answerer.loglikelihoods(item, item.options)
            row["option"] = item.options[choose_option(scores)]
            row["loglikelihoods"] = scores
        if "generate" in modes:
            row["generated"] = answerer.generate(item, max_new_tokens)
        rows.append(row)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    return {"n": len(rows), "blind": blind, "modes": list(modes), "overall": _group_metrics(rows, majority),
            "groups": {g: _group_metrics(r, majority) for g, r in sorted(groups.items())}, "items": rows}


VQA_TASKS = ("easy-vqa", "charts")
CHART_TEST_SEED = 1_000_003  # chart test questions: a generator seed no training recipe uses


def load_vlm(path: str | Path):
    """A VLM from a trainer checkpoint or run directory (:func:`phi3data.training.vlm.load_vlm`), or from a
    ``LlavaForConditionalGeneration`` export (:func:`phi3data.export.llava.save_llava`)."""
    import json

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a VLM checkpoint, run directory or export directory")
    config = path / "config.json"
    if config.exists() and json.loads(config.read_text()).get("model_type") == "llava":
        from phi3data.export.llava import load_llava

        return load_llava(path)
    from phi3data.training.vlm import load_vlm as load_trained

    return load_trained(path)


def vqa_task_items(task: str, limit: int | None) -> tuple[list[VQAItem], dict[str, str] | None]:
    """The items of a VQA task (the first ``limit`` questions) and its per-group majority answers, if any."""
    if task == "easy-vqa":
        return easy_vqa_items(limit), easy_vqa_majority()
    if task == "charts":  # 5 or 6 questions per chart; without a limit, 200 charts
        items = chart_items(CHART_TEST_SEED, 200 if limit is None else -(-limit // 5))
        return items[:limit], None
    raise ValueError(f"unknown VQA task {task!r}; known: {', '.join(VQA_TASKS)}")


def evaluate_vlm_checkpoint(checkpoint: Path, tokenizer: str, tasks: Sequence[str], *, limit: int | None = 500,
                            blind: bool = False, modes: Sequence[str] = MODES, device: str = "auto",
                            progress: bool = False, vlm=None) -> dict[str, Any]:
    """Score a VLM checkpoint on VQA ``tasks`` (``easy-vqa``, ``charts``): the result of :func:`evaluate_vqa` per
    task. ``vlm``: an already loaded model (``checkpoint`` is then only recorded)."""
    from phi3data.evaluation.run import resolve_device
    from phi3data.tokenization.tokenizers import get_tokenizer

    for task in tasks:
        if task not in VQA_TASKS:
            raise ValueError(f"unknown VQA task {task!r}; known: {', '.join(VQA_TASKS)}")
    device = resolve_device(device)
    vlm = load_vlm(checkpoint) if vlm is None else vlm
    tok = get_tokenizer(tokenizer)
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "tokenizer": tokenizer, "limit": limit, "blind": blind,
                              "device": device, "tasks": {}}
    for task in tasks:
        items, majority = vqa_task_items(task, limit)
        result["tasks"][task] = evaluate_vqa(vlm, tok, items, modes=modes, blind=blind, majority=majority,
                                             device=device, progress=progress)
    return result
