"""LLM annotation of educational value: sample documents, grade each with a rubric, parse the grade.

The rubric (built in: ``phi3data/classifiers/rubrics/*.md``, shipped with the package; or any file) is a 0-5
scale: ``edu_additive`` (the default) adds an educational level (primary, secondary, undergraduate, expert);
``knowledge_level`` scores lasting knowledge against ephemeral, time-bound facts. A rubric may end with its own
JSON-mode reply format (an HTML comment ``<!-- json {"instruction": ..., "schema": ...} -->``, never sent as part
of the prompt); without one, JSON mode asks for the educational score and level. A reply is parsed
strictly: the score must be stated as a whole number from 0 to 5 after "score"; a reply without one is recorded
as ``unparsed`` with the raw reply, never guessed.

Resumable: results are appended to a JSONL file as they arrive; a rerun skips documents already graded (status
``ok`` or ``unparsed``) and retries failed ones. With the client's request cache, a rerun sends nothing twice.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from phi3data.classifiers.data import read_documents, sample
from phi3data.generators.client import Completion, LLMClient, LLMError
from phi3data.io.readers import RawRecord, read_objects

LEVELS = ("primary", "secondary", "undergraduate", "expert")
RUBRICS_DIR = Path(__file__).resolve().parent / "rubrics"
"""The built-in rubrics (package data)."""
DEFAULT_RUBRIC = RUBRICS_DIR / "edu_additive.md"
CHARS_PER_TOKEN = 4.0
"""Rough characters per token for the cost estimate (English prose, BPE tokenizers)."""

_SCORE = re.compile(r"score\W{0,6}?(-?\d+(?:\.\d+)?)(?:\s*/\s*5)?", re.IGNORECASE)
_JSON_SCORE = re.compile(r'"score"\s*:\s*"?(-?\d+(?:\.\d+)?)', re.IGNORECASE)
_LEVEL = re.compile(r"level\W{0,6}?(" + "|".join(LEVELS) + r")\b", re.IGNORECASE)
JSON_INSTRUCTION = ('\nAnswer with a JSON object only: {"score": <0-5>, '
                    '"level": "<primary|secondary|undergraduate|expert>", "reason": "<one sentence>"}')
# Score and level come first so a reply cut short by max_tokens still carries them.
JSON_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "enum": [0, 1, 2, 3, 4, 5]},
                   "level": {"type": "string", "enum": list(LEVELS)}, "reason": {"type": "string"}},
    "required": ["score", "level", "reason"],
}


def parse_reply(reply: str) -> tuple[int | None, str | None]:
    """The score (0-5) and level stated in a reply; ``None`` for what it does not state clearly.

    The last "score: N" wins (a model may restate its answer). A number outside 0-5 or with a fraction is not a
    valid grade on an additive rubric, so it is not rounded or clipped: the score is ``None`` (unparsed).
    """
    matches = _JSON_SCORE.findall(reply) or _SCORE.findall(reply)
    score: int | None = None
    if matches:
        value = matches[-1]
        if re.fullmatch(r"[0-5]", value):
            score = int(value)
    levels = _LEVEL.findall(reply)
    level = levels[-1].lower() if levels else None
    return score, level


_JSON_BLOCK = re.compile(r"\s*<!--\s*json\s*\n(?P<spec>.*?)-->\s*\Z", re.DOTALL)


def load_rubric(path: str | Path | None = None) -> str:
    """A rubric template: text with one ``{text}`` placeholder for the document. ``path`` is a file, or the name
    of a built-in rubric (``edu_additive``, ``knowledge_level``); the default is ``edu_additive``."""
    return read_rubric(path)[0]


def read_rubric(path: str | Path | None = None) -> tuple[str, str, dict]:
    """(template, JSON-mode instruction, JSON schema) of a rubric; the JSON reply format is the rubric's own
    trailing ``<!-- json {...} -->`` block, or the educational score-and-level format without one."""
    rubric_path = Path(path) if path else DEFAULT_RUBRIC
    if not rubric_path.exists() and (RUBRICS_DIR / f"{rubric_path.name}.md").exists():
        rubric_path = RUBRICS_DIR / f"{rubric_path.name}.md"
    if not rubric_path.exists():
        built_in = ", ".join(sorted(p.stem for p in RUBRICS_DIR.glob("*.md")))
        raise FileNotFoundError(f"rubric not found: {rubric_path} (built-in rubrics: {built_in})")
    template = rubric_path.read_text(encoding="utf-8")
    instruction, schema = JSON_INSTRUCTION, JSON_SCHEMA
    block = _JSON_BLOCK.search(template)
    if block:
        try:
            spec = json.loads(block.group("spec"))
            instruction, schema = "\n" + spec["instruction"].strip(), spec["schema"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"rubric {rubric_path}: its <!-- json --> block needs a JSON object with "
                             f"\"instruction\" and \"schema\" ({exc})") from exc
        template = template[:block.start()] + "\n"
    if "{text}" not in template:
        raise ValueError(f"rubric {rubric_path} has no {{text}} placeholder for the document")
    return template, instruction, schema


def build_prompt(template: str, text: str, max_doc_chars: int, json_mode: bool = False,
                 instruction: str = JSON_INSTRUCTION) -> str:
    prompt = template.replace("{text}", text[:max_doc_chars].strip())
    return prompt + instruction if json_mode else prompt


@dataclass
class CostEstimate:
    documents: int
    prompt_tokens: int
    max_completion_tokens: int
    cost: float

    def describe(self) -> str:
        return (f"{self.documents} documents, about {self.prompt_tokens:,} prompt tokens + at most "
                f"{self.max_completion_tokens:,} completion tokens (estimate: {CHARS_PER_TOKEN:g} characters per "
                f"token), cost about {self.cost:.4f} at the given prices")


def estimate_cost(prompts: list[str], max_tokens: int, price_in_per_m: float = 0.0,
                  price_out_per_m: float = 0.0) -> CostEstimate:
    """Tokens and money a run will take at most, before it starts."""
    prompt_tokens = int(sum(len(p) for p in prompts) / CHARS_PER_TOKEN)
    completion = max_tokens * len(prompts)
    cost = (prompt_tokens * price_in_per_m + completion * price_out_per_m) / 1e6
    return CostEstimate(len(prompts), prompt_tokens, completion, cost)


@dataclass
class AnnotationPlan:
    """What a run will send: the sampled documents still to grade, and their prompts."""

    documents: list[dict]
    prompts: list[str]
    already_done: int
    estimate: CostEstimate
    json_schema: dict = field(default_factory=lambda: JSON_SCHEMA)
    """The schema a JSON-mode reply is constrained by (the rubric's own, or the educational one)."""


@dataclass
class AnnotationResult:
    output: Path
    status: Counter = field(default_factory=Counter)
    scores: Counter = field(default_factory=Counter)
    usage: dict = field(default_factory=dict)


def done_ids(output: Path) -> set[str]:
    """Ids already graded in an annotation file (``ok`` or ``unparsed``; failed requests are retried). A line cut
    short by a crash is a reader reject, so its document is graded again."""
    if not output.exists():
        return set()
    done = set()
    for item in read_objects(output, fmt="jsonl", source=output.name, max_record_bytes=1 << 26):
        if isinstance(item, RawRecord) and isinstance(item.obj, dict) and item.obj.get("status") in ("ok", "unparsed"):
            done.add(str(item.obj["id"]))
    return done


def plan_annotation(inputs: list[str | Path], output: Path, *, n: int, seed: int = 0, rubric: str | Path | None = None,
                    max_doc_chars: int = 4000, min_chars: int = 200, max_tokens: int = 128, json_mode: bool = False,
                    text_key: str = "text", id_key: str = "id", price_in_per_m: float = 0.0,
                    price_out_per_m: float = 0.0) -> AnnotationPlan:
    """Sample ``n`` documents (deterministic for a seed), drop those already graded, and build the prompts."""
    template, instruction, schema = read_rubric(rubric)
    docs = (d for path in inputs for d in read_documents(path, text_key=text_key, id_key=id_key)
            if len(d.get("text") or "") >= min_chars)  # streamed: the sample keeps only n documents
    chosen = sample(docs, n, seed=seed, key=lambda d: str(d["id"]))
    finished = done_ids(output)
    todo = [d for d in chosen if str(d["id"]) not in finished]
    prompts = [build_prompt(template, d["text"], max_doc_chars, json_mode, instruction) for d in todo]
    return AnnotationPlan(todo, prompts, len(chosen) - len(todo),
                          estimate_cost(prompts, max_tokens, price_in_per_m, price_out_per_m), schema)


def run_annotation(plan: AnnotationPlan, client: LLMClient, output: Path, *, max_tokens: int = 128,
                   temperature: float = 0.0, json_mode: bool = False) -> AnnotationResult:
    """Grade every planned document, appending one JSON line per result as it arrives."""
    output.parent.mkdir(parents=True, exist_ok=True)
    result = AnnotationResult(output)
    params: dict = {"max_tokens": max_tokens, "temperature": temperature}
    if json_mode:
        params["response_format"] = {"type": "json_object", "schema": plan.json_schema}
    conversations = [[{"role": "user", "content": prompt}] for prompt in plan.prompts]
    with open(output, "a", encoding="utf-8") as handle:

        def write(index: int, reply: Completion | LLMError) -> None:
            doc = plan.documents[index]
            record = {"id": str(doc["id"]), "text": doc["text"], "model": client.config.model}
            if isinstance(reply, LLMError):
                record.update(status="error", score=None, level=None, reply=None, error=str(reply))
            else:
                score, level = parse_reply(reply.text)
                record.update(status="ok" if score is not None else "unparsed", score=score, level=level,
                              reply=reply.text, finish_reason=reply.finish_reason,
                              prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
                              cached=reply.cached)
            result.status[record["status"]] += 1
            if record["score"] is not None:
                result.scores[record["score"]] += 1
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()

        client.chat_many(conversations, on_result=write, **params)
    result.usage = client.usage.as_dict()
    return result
