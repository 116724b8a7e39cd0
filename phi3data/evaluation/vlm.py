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
    trend question up / down, the count question 2..8; value and difference questions are generated only. Each
    question is asked on its own, as the first turn with the image (a chart conversation asks them in turns)."""
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


def final_hidden(vlm, embeds: torch.Tensor, positions: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """The language model's last hidden states (after the final norm) for input embeddings; logits are
    ``lm_head`` of them, computed only where needed (the full ``T x vocab`` logits dominate a tiny model's cost).
    ``positions`` (B, T): each token's rotary position (default 0..T-1); ``mask`` (B, 1, T, T): which tokens each
    token attends to (default causal)."""
    lm = vlm.language_model
    x = embeds
    if lm.cfg.mup_embedding_multiplier != 1.0:
        x = x * lm.cfg.mup_embedding_multiplier
    if positions is None:
        cos, sin = lm.rotary(x.shape[1], x.dtype)
    else:
        cos, sin = lm.rotary(int(positions.max()) + 1, x.dtype)
        cos, sin = cos[positions][:, None], sin[positions][:, None]  # (B, 1, T, head_dim): per row and token
    for block in lm.model.layers:
        x = block(x, cos, sin, mask)
    return lm.model.norm(x)


def _logits(vlm, hidden: torch.Tensor) -> torch.Tensor:
    logits = vlm.language_model.lm_head(hidden).float()
    return logits / vlm.language_model.cfg.mup_width_multiplier


class VLMAnswerer:
    """Asks a VLM questions in its training format. ``blind``: leave the image out of the prompt (a model
    trained without images)."""

    def __init__(self, vlm, tokenizer, *, blind: bool = False, device: str = "cpu", batch_size: int = 16) -> None:
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

    def _sees(self, item: VQAItem) -> bool:
        return item.image is not None and not self.blind

    def _features(self, items: Sequence[VQAItem]) -> torch.Tensor:
        """Tower features of the images of the items that show one, in order."""
        pixels = [self.vlm.vision_tower.transform(_pil(item.image)) for item in items if self._sees(item)]
        if not pixels:
            tower = self.vlm.vision_tower
            return torch.zeros(0, self.vlm.n_tokens, tower.hidden_size, device=self.device)
        return self.vlm.vision_features(torch.stack(pixels).to(self.device))

    def _packed(self, item: VQAItem, options: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """One row for all options of a question: the prompt once, then each option's reply. Returns the ids, the
        rotary positions (each reply continues the prompt), the segment of each token (-1 prompt, k option k)
        and per option its reply's (token id, position of the hidden state that predicts it) pairs."""
        prompt = None
        ids, positions, segments, targets = [], [], [], []
        for k, option in enumerate(options):
            full, mask, _ = self.encode(item, option)
            first = int(np.flatnonzero(mask)[0])
            if prompt is None:
                prompt = full[:first]
                ids, positions, segments = list(prompt), list(range(first)), [-1] * first
            elif len(prompt) != first or not np.array_equal(full[:first], prompt):
                raise ValueError(f"option {option!r} changes the prompt's tokens; score it on its own")
            reply = full[first:]
            if not mask[first:].all():
                raise ValueError(f"option {option!r}: the assistant reply is not the end of the conversation")
            start = len(ids)
            # the first reply token is predicted at the prompt's last token, the others at the reply's previous one
            targets.append([(int(t), first - 1 if j == 0 else start + j - 1) for j, t in enumerate(reply)])
            ids += reply.tolist()
            positions += range(first, first + len(reply))
            segments += [k] * len(reply)
        return np.asarray(ids), np.asarray(positions), np.asarray(segments), targets

    @torch.no_grad()
    def score_options(self, items: Sequence[VQAItem], options: Sequence[Sequence[str]]) -> list[list[float]]:
        """For each item, the sum of log p(assistant reply) of each of its options. The prompt is computed once
        per question: its options' replies follow it in one row, each attending to the prompt and to itself."""
        out: list[list[float]] = []
        for start in range(0, len(items), self.batch_size):
            chunk = list(zip(items[start:start + self.batch_size], options[start:start + self.batch_size],
                             strict=True))
            packed = [self._packed(item, opts) for item, opts in chunk]
            width = max(len(p[0]) for p in packed)
            batch = torch.zeros((len(packed), width), dtype=torch.long)
            positions = torch.zeros((len(packed), width), dtype=torch.long)
            segments = torch.full((len(packed), width), -2, dtype=torch.long)  # -2: padding
            for r, (ids, pos, seg, _) in enumerate(packed):
                batch[r, :len(ids)], positions[r, :len(ids)], segments[r, :len(ids)] = (
                    torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(seg))
            causal = torch.ones(width, width, dtype=torch.bool).tril()
            query, key = segments[:, :, None], segments[:, None, :]
            mask = causal & ((key == -1) | (key == query))
            mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself (no empty softmax row)
            batch = batch.to(self.device)
            embeds = self.vlm.embed(batch, self._features([item for item, _ in chunk]),
                                    batch == self.vlm.image_token_id)
            hidden = final_hidden(self.vlm, embeds, positions.to(self.device), mask[:, None].to(self.device))
            rows, at, target, owner = [], [], [], []
            for r, (_, _, _, targets) in enumerate(packed):
                for k, pairs in enumerate(targets):
                    for token, where in pairs:
                        rows.append(r)
                        at.append(where)
                        target.append(token)
                        owner.append((r, k))
            logprobs = F.log_softmax(_logits(self.vlm, hidden[rows, at]), dim=-1)
            picked = logprobs.gather(1, torch.tensor(target, device=self.device)[:, None])[:, 0].double().cpu()
            sums = [[0.0] * len(opts) for _, opts in chunk]
            for (r, k), value in zip(owner, picked.tolist()):
                sums[r][k] += value
            out += sums
        return out

    def loglikelihoods(self, item: VQAItem, options: Sequence[str]) -> list[float]:
        """Sum of log p(assistant reply) for each option of one item."""
        return self.score_options([item], [options])[0]

    @torch.no_grad()
    def generate_many(self, items: Sequence[VQAItem], max_new_tokens: int = 8) -> list[str]:
        """Greedy answers, each up to ``<|end|>`` or end of text; prompts of equal length decode as one batch."""
        prompts = []
        for item in items:
            ids, mask, _ = self.encode(item, "x")
            prompts.append(ids[:int(np.flatnonzero(mask)[0])])
        answers: list[str] = [""] * len(items)
        by_length: dict[int, list[int]] = {}
        for k, ids in enumerate(prompts):
            by_length.setdefault(len(ids), []).append(k)
        embed_tokens = self.vlm.language_model.model.embed_tokens
        for group in by_length.values():
            group_items = [items[k] for k in group]
            batch = torch.from_numpy(np.stack([prompts[k] for k in group])).to(self.device)
            embeds = self.vlm.embed(batch, self._features(group_items), batch == self.vlm.image_token_id)
            out = [[] for _ in group]
            done = [False] * len(group)
            for _ in range(max_new_tokens):
                hidden = final_hidden(self.vlm, embeds)
                next_ids = _logits(self.vlm, hidden[:, -1]).argmax(-1)
                for r, t in enumerate(next_ids.tolist()):
                    if not done[r]:
                        done[r] = t in self.end_ids
                        if not done[r]:
                            out[r].append(t)
                if all(done):
                    break
                embeds = torch.cat([embeds, embed_tokens(next_ids[:, None])], dim=1)
            for k, ids in zip(group, out):
                answers[k] = self.tok.decode(ids).strip()
        return answers

    def generate(self, item: VQAItem, max_new_tokens: int = 8) -> str:
        """The greedy answer to one item."""
        return self.generate_many([item], max_new_tokens)[0]


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
                 batch_questions: int = 8, progress: bool = False) -> dict:
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
    rows = [{"question": item.question, "answers": list(item.answers), "group": item.group} for item in items]
    chunks = range(0, len(items), batch_questions)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="vqa", unit="batch")
    for start in chunks:
        part = list(range(start, min(start + batch_questions, len(items))))
        if "options" in modes:
            scored = [k for k in part if items[k].options]
            if scored:
                all_scores = answerer.score_options([items[k] for k in scored], [items[k].options for k in scored])
                for k, scores in zip(scored, all_scores):
                    rows[k]["option"] = items[k].options[choose_option(scores)]
                    rows[k]["loglikelihoods"] = scores
        if "generate" in modes:
            for k, answer in zip(part, answerer.generate_many([items[k] for k in part], max_new_tokens)):
                rows[k]["generated"] = answer
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
