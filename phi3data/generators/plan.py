"""Generation plans: a TOML file that expands, deterministically, into the requests of a synthetic corpus.

A plan names the model and sampling parameters, maps each *style* to a prompt template file, describes the
*audiences*, and lists seed sources. Each seed source spans a coverage matrix of its topics x audiences x styles
with a quota of requests per cell::

    name = "textbooks"
    model = "SmolLM2-135M-Instruct"
    seed = 1
    root = ".."                       # seed paths are relative to this folder (relative to the plan file)

    [sampling]
    max_tokens = 320

    [styles]
    wikihow = "templates/wikihow.j2"

    [audiences]
    college = "college students"

    [[seeds]]
    name = "web"
    kind = "documents"                # documents | outlines | topics | problems
    path = "out/quickstart/web_quality/data"
    topic = "web"
    styles = ["wikihow"]
    audiences = ["college"]
    quota = 4

Seed kinds: ``documents`` (curated pages, e.g. a ``phi3data run`` output: an extract of each page, and an optional
topic clause), ``outlines`` (textbook sections: title, headings and opening text), ``topics`` (a topic list: a text
file with one topic a line, or ``topics = [...]``) and ``problems`` (a question with a gold answer). A path may start
with ``{data}``, the shared data folder. The server URL and API key are not part of a plan: they come from the
command line, so the same plan runs against any server.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr

from phi3data.config import ConfigError, StrictModel, read_toml, validate
from phi3data.generators.requests import GenRequest
from phi3data.generators.templates import PromptTemplate, check_variables, load_template
from phi3data.io.inputs import list_input_files
from phi3data.io.readers import RawRecord, read_objects
from phi3data.paths import shared_data

ID = r"^[A-Za-z0-9_.-]+$"
MAX_RECORD_BYTES = 16 << 20
COMMON_VARIABLES = {"topic", "audience", "style"}
KIND_VARIABLES = {
    "documents": {"extract", "title", "outline", "url", "context"},
    "outlines": {"extract", "title", "outline", "url", "context"},
    "topics": set(),
    "problems": {"question", "answer"},
}
SECRETS = {"base_url", "url", "server", "api_key", "key", "token"}


class Sampling(StrictModel):
    max_tokens: int = Field(320, ge=1)
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    stop: list[str] | None = None


class SeedSource(StrictModel):
    """One seed source and its coverage matrix."""

    name: str = Field(pattern=ID)
    kind: Literal["documents", "outlines", "topics", "problems"]
    path: str | None = None
    topics: list[str] | None = None
    """For ``topics``: the topic list itself (instead of a file); otherwise: only these topics, in this order."""
    topic: str | None = None
    """A fixed topic label for every seed of this source ..."""
    topic_field: str | None = None
    """... or the (dotted) record field that holds it, e.g. ``metadata.source``."""
    topic_names: dict[str, str] = {}
    """Readable names given to the template for topic labels (``{{ topic }}``)."""
    topic_clause: bool = False
    """Give the template ``context`` (the topic's name) for an "in the context of ..." clause."""
    text_field: str = "text"
    title_field: str | None = None
    url_field: str | None = "url"
    question_field: str = "question"
    answer_field: str = "answer"
    extract_chars: int = Field(1200, ge=100)
    outline_items: int = Field(8, ge=1)
    limit: int | None = Field(None, ge=1)
    """Read at most this many usable seeds (in file order)."""
    styles: list[str] = Field(min_length=1)
    audiences: list[str] = Field(min_length=1)
    quota: int = Field(1, ge=1)
    """Requests per cell (topic x audience x style) ..."""
    quotas: dict[str, int] = {}
    """... unless a cell ``"topic/audience/style"`` has its own."""


class VerifyConfig(StrictModel):
    """How replies are checked by running them (see ``phi3data.generators.verified``)."""

    kind: Literal["math_program", "code_exercise"] = "math_program"
    """math_program: a ``solution()`` whose answer is checked; code_exercise: a function with tests that must
    pass on it and fail on an empty and a mutated solution."""
    gold_styles: list[str] = []
    """Styles whose replies re-solve the seed problem: a reply is kept when its program's answer is the gold one."""
    solve_template: str | None = None
    """For every other style the reply states a new problem (and its program); this template (variable
    ``problem``) asks for ``samples`` independent programs solving it, and the problem is kept when ``agree`` of
    them, and its own program, give the same answer."""
    samples: int = Field(3, ge=1)
    agree: int | None = Field(None, ge=1)
    timeout: float = Field(5.0, gt=0)
    """Wall-clock seconds per program."""
    allow_code_execution: bool = False
    """Generated code runs only with this set (or ``--allow-code-execution`` on the command line)."""


class ChatConfig(StrictModel):
    """Multi-turn chat SFT conversations (see ``phi3data.generators.chat``): the plan's own requests write each
    conversation's opening user message; the model then answers as the assistant, and ``followup_template``
    (variables ``conversation``, ``topic``, ``audience``) asks it for the user's next message, for ``turns``
    exchanges."""

    turns: int = Field(2, ge=1, le=16)
    followup_template: str
    assistant_system: str | None = None
    """The system message of the conversations (and of the assistant requests)."""
    max_tokens: int | None = Field(None, ge=1)
    """Tokens per assistant reply (default: the plan's sampling.max_tokens)."""


class JudgeConfig(StrictModel):
    """Preference pairs from an LLM judge (see ``phi3data.generators.judge``): a second answer to every prompt of
    the plan, then ``rubric_template`` (variables ``prompt``, ``answer_a``, ``answer_b``) asks which is better."""

    rubric_template: str
    both_orders: bool = True
    """Ask again with the answers swapped and keep a pair only when both verdicts agree (position bias)."""
    max_tokens: int = Field(200, ge=1)
    """Tokens for the judge's reasoning and verdict."""


class GenerationPlan(StrictModel):
    """A generation plan as its TOML file holds it (load it with :func:`load_plan`)."""

    name: str = Field(pattern=ID)
    model: str = Field(min_length=1)
    seed: int = 0
    system: str | None = None
    root: str = "."
    response_schema: dict | str | None = Field(None, alias="schema")
    """A JSON schema for structured output: a table, or a ``.json`` file relative to the plan."""
    sampling: Sampling = Sampling()
    styles: dict[str, str] = Field(min_length=1)
    """Style id -> template file (relative to the plan file)."""
    audiences: dict[str, str] = Field(min_length=1)
    """Audience id -> how the template describes it."""
    seeds: list[SeedSource] = Field(min_length=1)
    verify: VerifyConfig | None = None
    chat: ChatConfig | None = None
    judge: JudgeConfig | None = None

    _path: Path = PrivateAttr()
    _text: str = PrivateAttr("")
    _templates: dict[str, PromptTemplate] = PrivateAttr(default_factory=dict)
    _schema: dict | None = PrivateAttr(None)
    _solve_template: PromptTemplate | None = PrivateAttr(None)
    _followup_template: PromptTemplate | None = PrivateAttr(None)
    _rubric_template: PromptTemplate | None = PrivateAttr(None)

    @property
    def rubric_template(self) -> PromptTemplate | None:
        return self._rubric_template

    @property
    def followup_template(self) -> PromptTemplate | None:
        return self._followup_template

    @property
    def solve_template(self) -> PromptTemplate | None:
        return self._solve_template

    @property
    def path(self) -> Path:
        return self._path

    @property
    def templates(self) -> dict[str, PromptTemplate]:
        """Style id -> parsed template."""
        return self._templates

    @property
    def schema_dict(self) -> dict | None:
        return self._schema


def load_plan(path: str | Path) -> GenerationPlan:
    """Read, validate and parse a plan and its templates; every problem is a ConfigError naming file, line, field."""
    path = Path(path)
    raw = read_toml(path, "generation plan")
    text = path.read_text(encoding="utf-8")
    secrets = sorted(SECRETS & set(raw))
    if secrets:
        raise ConfigError(f"{path}:{_line(text, secrets[0])}: {secrets[0]}: a plan holds no server or API key; pass "
                          "--base-url on the command line and the key in an environment variable")
    plan = validate(GenerationPlan, raw, str(path))
    plan._path = path
    plan._text = text
    _check_ids(plan.styles, "styles", path, text)
    _check_ids(plan.audiences, "audiences", path, text)
    names = [s.name for s in plan.seeds]
    for i, src in enumerate(plan.seeds):
        where = f"seeds[{i}]"
        if names.count(src.name) > 1:
            raise ConfigError(f"{path}:{_seed_line(text, i, src.name)}: {where}.name: {src.name!r} is used twice")
        _check_source(src, i, path, text)
        _check_known(src.styles, plan.styles, "styles", i, path, text)
        _check_known(src.audiences, plan.audiences, "audiences", i, path, text)
    by_stem: dict[str, str] = {}
    for style, rel in plan.styles.items():
        template = load_template(path.parent / rel, f"styles.{style}")
        if by_stem.setdefault(template.id, style) != style:
            raise ConfigError(f"{path}:{_line(text, rel)}: styles.{style}: template id {template.id!r} is also "
                              f"used by styles.{by_stem[template.id]}; give the files distinct names")
        plan._templates[style] = template
    for i, src in enumerate(plan.seeds):
        for style in src.styles:
            check_variables(plan._templates[style], COMMON_VARIABLES | KIND_VARIABLES[src.kind],
                            f"styles.{style}", f"seeds[{i}] ({src.name}, kind {src.kind}) in {path}")
    plan._schema = _load_schema(plan, path, text)
    if plan.verify is not None:
        _check_verify(plan, path, text)
    modes = [m for m in ("verify", "chat", "judge") if getattr(plan, m) is not None]
    if len(modes) > 1:
        raise ConfigError(f"{path}:{_line(text, f'[{modes[1]}]')}: a plan has at most one of [verify], [chat] and "
                          f"[judge], not {' and '.join(f'[{m}]' for m in modes)}")
    if plan.judge is not None:
        plan._rubric_template = load_template(path.parent / plan.judge.rubric_template, "judge.rubric_template")
        check_variables(plan._rubric_template, {"prompt", "answer_a", "answer_b"}, "judge.rubric_template",
                        str(path))
    if plan.chat is not None:
        plan._followup_template = load_template(path.parent / plan.chat.followup_template, "chat.followup_template")
        check_variables(plan._followup_template, {"conversation", "topic", "audience"}, "chat.followup_template",
                        str(path))
    return plan


def _check_verify(plan: GenerationPlan, path: Path, text: str) -> None:
    verify = plan.verify
    unknown = sorted(set(verify.gold_styles) - set(plan.styles))
    if unknown:
        raise ConfigError(f"{path}:{_line(text, 'gold_styles')}: verify.gold_styles: unknown style {unknown[0]!r}")
    for i, src in enumerate(plan.seeds):
        if set(src.styles) & set(verify.gold_styles) and src.kind != "problems":
            raise ConfigError(f"{path}:{_seed_line(text, i, 'kind')}: seeds[{i}]: gold styles need problems with "
                              f"gold answers (kind = \"problems\"), not {src.kind!r}")
    if verify.kind == "math_program" and set(plan.styles) - set(verify.gold_styles):
        if verify.solve_template is None:
            raise ConfigError(f"{path}:{_line(text, '[verify]')}: verify.solve_template: missing; styles that write "
                              "new problems need a template asking for independent solutions")
        plan._solve_template = load_template(path.parent / verify.solve_template, "verify.solve_template")
        check_variables(plan._solve_template, {"problem"}, "verify.solve_template", str(path))
    if (verify.agree or verify.samples) > verify.samples:
        raise ConfigError(f"{path}:{_line(text, 'agree')}: verify.agree: {verify.agree} is more than samples = "
                          f"{verify.samples}")


def _check_ids(table: dict[str, str], section: str, path: Path, text: str) -> None:
    for key in table:
        if not re.match(ID, key):
            raise ConfigError(f"{path}:{_line(text, key)}: {section}.{key}: use letters, digits, '_', '-' or '.'")


def _check_source(src: SeedSource, i: int, path: Path, text: str) -> None:
    where = f"seeds[{i}]"
    if src.kind == "topics":
        if (src.path is None) == (src.topics is None):
            raise ConfigError(f"{path}:{_seed_line(text, i, 'kind')}: {where}: a topics source needs either path "
                              "(a topic list file) or topics = [...]")
        if src.topic is not None or src.topic_field is not None:
            raise ConfigError(f"{path}:{_seed_line(text, i, 'topic')}: {where}.topic: each listed topic is its own "
                              "topic; drop topic / topic_field")
    else:
        if src.path is None:
            raise ConfigError(f"{path}:{_seed_line(text, i, 'kind')}: {where}.path: missing (the seed file or folder)")
        if (src.topic is None) == (src.topic_field is None):
            raise ConfigError(f"{path}:{_seed_line(text, i, 'topic')}: {where}.topic: give exactly one of topic (a "
                              "fixed label) or topic_field (a record field)")


def _check_known(values: list[str], table: dict[str, str], label: str, i: int, path: Path, text: str) -> None:
    for value in values:
        if value not in table:
            raise ConfigError(f"{path}:{_seed_line(text, i, value)}: seeds[{i}].{label}: unknown "
                              f"{label[:-1]} {value!r} (the plan's {label}: {', '.join(table)})")
    if len(set(values)) != len(values):
        raise ConfigError(f"{path}:{_seed_line(text, i, label)}: seeds[{i}].{label}: listed twice")


def _load_schema(plan: GenerationPlan, path: Path, text: str) -> dict | None:
    schema = plan.response_schema
    if not isinstance(schema, str):
        return schema
    file = path.parent / schema
    try:
        loaded = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}:{_line(text, 'schema')}: schema: cannot read JSON schema {file}: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}:{_line(text, 'schema')}: schema: {file} is not a JSON object")
    return loaded


def _line(text: str, needle: str, start: int = 0) -> int:
    """The 1-based line of the first occurrence of ``needle`` at or after line ``start`` (0-based)."""
    lines = text.splitlines()
    for number in range(start, len(lines)):
        if needle in lines[number]:
            return number + 1
    return start + 1


def _seed_line(text: str, i: int, needle: str) -> int:
    """The line of ``needle`` inside the i-th ``[[seeds]]`` table (its header line if not found)."""
    headers = [n for n, line in enumerate(text.splitlines()) if line.strip().startswith("[[seeds]]")]
    if i >= len(headers):
        return _line(text, needle)
    end = headers[i + 1] if i + 1 < len(headers) else len(text.splitlines())
    found = _line(text, needle, headers[i])
    return found if found <= end else headers[i] + 1


# --- seeds ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Seed:
    """One seed: its id, topic label and the template variables it provides."""

    id: str
    topic: str
    text: str | None
    variables: dict[str, Any]
    extra: dict[str, Any]


def _field(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(obj, str) and obj.startswith("{"):  # a JSON metadata column (phi3data run output)
            try:
                obj = json.loads(obj)
            except ValueError:
                return None
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs with their inner whitespace collapsed."""
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def extract(text: str, limit: int) -> str:
    """The opening of a document: whole paragraphs, the last one cut at a word boundary, at most ``limit`` chars."""
    joined = "\n\n".join(_paragraphs(text))
    if len(joined) <= limit:
        return joined
    cut = joined[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip()


def outline(text: str, title: str | None, items: int) -> str:
    """A section's headings (short paragraphs without closing punctuation) as a bulleted list."""
    heads: list[str] = []
    for para in _paragraphs(text):
        if len(para) <= 80 and not para.endswith((".", "?", "!", ":", ";", ",")) and para != (title or "").strip():
            if para not in heads:
                heads.append(para)
        if len(heads) == items:
            break
    return "\n".join(f"- {h}" for h in heads)


def _seed_files(src: SeedSource, root: Path) -> list[tuple[Path, str]]:
    """The seed's files with a machine-independent name for each (relative to the seed path)."""
    files = list_input_files(root, f"seed {src.name}")
    return [(f, f.name if root.is_file() else f.relative_to(root).as_posix()) for f in files]


def _read_seeds(src: SeedSource, path: Path | None, rejects: Counter) -> list[Seed]:
    """Every usable seed of a source, sorted by id; unusable records are counted in ``rejects`` by reason."""
    if src.kind == "topics":
        lines = src.topics if src.topics is not None else path.read_text(encoding="utf-8").splitlines()
        topics = []
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#") and line not in topics:
                topics.append(line)
        return [Seed(f"{src.name}:{t}", t, None, {}, {}) for t in topics[:src.limit]]
    seeds: dict[str, Seed] = {}
    for file, rel in _seed_files(src, path):
        for item in read_objects(file, source=src.name, max_record_bytes=MAX_RECORD_BYTES,
                                 id_prefix=f"{src.name}:{rel}"):
            if src.limit is not None and len(seeds) >= src.limit:
                break
            if isinstance(item, dict):
                rejects[item["reason"]] += 1
                continue
            seed = _make_seed(src, item)
            if isinstance(seed, str):
                rejects[seed] += 1
            elif seed.id in seeds:
                rejects["duplicate_id"] += 1
            else:
                seeds[seed.id] = seed
    return [seeds[k] for k in sorted(seeds)]


def _text(obj: dict, dotted: str) -> str | None:
    value = _field(obj, dotted)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _make_seed(src: SeedSource, record: RawRecord) -> Seed | str:
    """A seed from one record, or the reason it cannot be one."""
    obj = record.obj
    if not isinstance(obj, dict):
        return "malformed_record"
    raw_id = obj.get("id")
    seed_id = f"{src.name}:{raw_id}" if isinstance(raw_id, (str, int)) and str(raw_id) else record.fallback_id
    topic = src.topic if src.topic is not None else _field(obj, src.topic_field)
    if not isinstance(topic, str) or not topic.strip():
        return f"missing_{src.topic_field}"
    topic = topic.strip()
    if src.kind == "problems":
        question, answer = _text(obj, src.question_field), _text(obj, src.answer_field)
        if question is None:
            return f"missing_{src.question_field}"
        if answer is None:
            return f"missing_{src.answer_field}"
        final = answer.rsplit("####", 1)[1].strip() if "####" in answer else None
        return Seed(seed_id, topic, question, {"question": question, "answer": answer},
                    {"gold_answer": answer, "gold_final": final})
    body = _text(obj, src.text_field)
    if body is None:
        return f"missing_{src.text_field}"
    title = _text(obj, src.title_field) if src.title_field else None
    url = _text(obj, src.url_field) if src.url_field else None
    if title and body.startswith(title):  # a section's text opens with its own title
        body = body[len(title):]
    text = extract(body, src.extract_chars)
    heads = outline(body, title, src.outline_items) if src.kind == "outlines" else None
    variables = {"extract": text, "title": title, "outline": heads or None, "url": url}
    return Seed(seed_id, topic, text, variables, {k: v for k, v in (("title", title), ("url", url)) if v})


# --- expansion --------------------------------------------------------------------------------------------

@dataclass
class Expansion:
    """A plan expanded into requests, with what it planned per cell and what the seed files held that was unusable."""

    plan: GenerationPlan
    requests: list[GenRequest]
    seed_rejects: dict[str, int]
    """Reason -> count over every seed source (per source in ``source_rejects``)."""
    cells: dict[str, int]
    """``"source/topic/audience/style"`` -> requests planned."""
    seeds_read: dict[str, int] = field(default_factory=dict)
    """Source name -> usable seeds read."""
    source_rejects: dict[str, dict[str, int]] = field(default_factory=dict)


def cell_key(cell: dict[str, str]) -> str:
    return f"{cell['source']}/{cell['topic']}/{cell['audience']}/{cell['style']}"


def _int_hash(*parts: Any) -> int:
    blob = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


def seed_path(plan: GenerationPlan, src: SeedSource, base_dir: str | Path | None = None,
              override: str | Path | None = None) -> Path:
    """Where a source's seeds are: ``override`` as given, ``{data}/...`` in the shared data, else under the base."""
    if override is not None:
        return Path(override)
    raw = src.path or ""
    if raw.startswith("{data}"):
        return shared_data() / raw.removeprefix("{data}").lstrip("/")
    base = Path(base_dir) if base_dir is not None else plan.path.parent / plan.root
    return base / raw


def expand(plan: GenerationPlan, base_dir: str | Path | None = None,
           seed_paths: dict[str, str | Path] | None = None) -> Expansion:
    """Expand a plan into requests, in an order that depends only on the plan, its templates and the seed data.

    ``base_dir`` replaces the plan's ``root`` for relative seed paths; ``seed_paths`` (source name -> path)
    replaces a source's path outright (e.g. ``--seed web=out/mine/data``)."""
    seed_paths = dict(seed_paths or {})
    unknown = sorted(set(seed_paths) - {s.name for s in plan.seeds})
    if unknown:
        raise ConfigError(f"{plan.path}: no seed source named {', '.join(unknown)} "
                          f"(the plan's: {', '.join(s.name for s in plan.seeds)})")
    requests: list[GenRequest] = []
    cells: dict[str, int] = {}
    rejects_all: Counter = Counter()
    exp = Expansion(plan, requests, {}, cells)
    topic_owner: dict[str, str] = {}
    for i, src in enumerate(plan.seeds):
        path = None if src.kind == "topics" and src.path is None else seed_path(plan, src, base_dir,
                                                                                 seed_paths.get(src.name))
        if path is not None and not path.exists():
            raise ConfigError(f"{plan.path}:{_seed_line(plan._text, i, 'path')}: seeds[{i}].path: seed data not "
                              f"found: {path} (give another with --seed {src.name}=PATH)")
        rejects: Counter = Counter()
        seeds = _read_seeds(src, path, rejects)
        rejects_all.update(rejects)
        exp.seeds_read[src.name] = len(seeds)
        exp.source_rejects[src.name] = dict(sorted(rejects.items()))
        by_topic: dict[str, list[Seed]] = {}
        for seed in seeds:
            by_topic.setdefault(seed.topic, []).append(seed)
        topics = src.topics if src.topics is not None and src.kind != "topics" else sorted(by_topic)
        if not topics:
            raise ConfigError(f"{plan.path}:{_seed_line(plan._text, i, 'path')}: seeds[{i}] ({src.name}): empty "
                              f"cell: no usable seed in {path} (rejected: {dict(rejects) or 'none'})")
        for topic in topics:
            if not by_topic.get(topic):
                raise ConfigError(f"{plan.path}:{_seed_line(plan._text, i, topic)}: seeds[{i}].topics: empty cell: "
                                  f"no seed of {src.name} has topic {topic!r} (found: {', '.join(sorted(by_topic))})")
            if topic_owner.setdefault(topic, src.name) != src.name:
                raise ConfigError(f"{plan.path}:{_seed_line(plan._text, i, 'topic')}: seeds[{i}]: topic {topic!r} "
                                  f"is also a topic of seeds {topic_owner[topic]!r}")
        planned = {f"{t}/{a}/{s}": src.quota for t in topics for a in src.audiences for s in src.styles}
        for key, count in src.quotas.items():
            if key not in planned:
                raise ConfigError(f"{plan.path}:{_seed_line(plan._text, i, key)}: seeds[{i}].quotas: {key!r} is not "
                                  "a cell of this source (topic/audience/style)")
            if count < 1:
                raise ConfigError(f"{plan.path}:{_seed_line(plan._text, i, key)}: seeds[{i}].quotas: empty cell "
                                  f"{key!r}: a quota must be at least 1 (drop the style or audience instead)")
            planned[key] = count
        for topic in topics:
            pool = list(by_topic[topic])
            random.Random(_int_hash(plan.seed, src.name, topic)).shuffle(pool)
            cursor = 0
            for audience in src.audiences:
                for style in src.styles:
                    cell = {"source": src.name, "topic": topic, "audience": audience, "style": style}
                    count = planned[f"{topic}/{audience}/{style}"]
                    cells[cell_key(cell)] = count
                    for _ in range(count):
                        seed, repeat = pool[cursor % len(pool)], cursor // len(pool)
                        cursor += 1
                        requests.append(_request(plan, src, cell, seed, repeat, len(requests)))
    exp.seed_rejects = dict(sorted(rejects_all.items()))
    return exp


def _request(plan: GenerationPlan, src: SeedSource, cell: dict[str, str], seed: Seed, repeat: int,
             index: int) -> GenRequest:
    template = plan.templates[cell["style"]]
    name = src.topic_names.get(cell["topic"], cell["topic"])
    context = dict(seed.variables, topic=name, audience=plan.audiences[cell["audience"]], style=cell["style"])
    if src.kind in ("documents", "outlines"):
        context["context"] = name if src.topic_clause else None
    prompt = template.render(**context)
    messages = ({"role": "system", "content": plan.system},) if plan.system else ()
    messages += ({"role": "user", "content": prompt},)
    params: dict[str, Any] = {"max_tokens": plan.sampling.max_tokens, "temperature": plan.sampling.temperature,
                              "top_p": plan.sampling.top_p,
                              "seed": _int_hash(plan.seed, cell_key(cell), seed.id, repeat) % (2 ** 31)}
    if plan.sampling.stop:
        params["stop"] = list(plan.sampling.stop)
    return GenRequest(index=index, messages=messages, params=params, cell=dict(cell), template_id=template.id,
                      template_hash=template.hash, seed_id=seed.id, seed_text=seed.text, schema=plan.schema_dict,
                      extra=dict(seed.extra, source=src.name, kind=src.kind))


# --- dry run ----------------------------------------------------------------------------------------------

def estimate(expansion: Expansion, chars_per_token: float = 4.0, price_in_per_m: float = 0.0,
             price_out_per_m: float = 0.0) -> dict:
    """What a run would send: prompts, estimated prompt tokens, most completion tokens, cost; in all and per cell."""
    if chars_per_token <= 0:
        raise ValueError("chars_per_token must be positive")

    def cost(prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens / 1e6 * price_in_per_m + completion_tokens / 1e6 * price_out_per_m

    per_cell: dict[str, dict[str, Any]] = {}
    for req in expansion.requests:
        chars = sum(len(m["content"]) for m in req.messages)
        row = per_cell.setdefault(cell_key(req.cell), {"prompts": 0, "prompt_tokens": 0, "max_completion_tokens": 0})
        row["prompts"] += 1
        row["prompt_tokens"] += math.ceil(chars / chars_per_token)
        row["max_completion_tokens"] += int(req.params.get("max_tokens", 0))
    for row in per_cell.values():
        row["cost"] = cost(row["prompt_tokens"], row["max_completion_tokens"])
    total_in = sum(r["prompt_tokens"] for r in per_cell.values())
    total_out = sum(r["max_completion_tokens"] for r in per_cell.values())
    return {"plan": expansion.plan.name, "model": expansion.plan.model, "prompts": len(expansion.requests),
            "prompt_tokens": total_in, "max_completion_tokens": total_out, "cost": cost(total_in, total_out),
            "seed_rejects": dict(expansion.seed_rejects), "cells": per_cell}


def sample_prompts(expansion: Expansion, k: int) -> list[GenRequest]:
    """``k`` requests spread evenly over the expansion (the same ones every time), to read before a run."""
    n = len(expansion.requests)
    if k <= 0 or n == 0:
        return []
    if k >= n:
        return list(expansion.requests)
    return [expansion.requests[(i * n) // k] for i in range(k)]
