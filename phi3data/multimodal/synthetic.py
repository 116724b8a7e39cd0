"""Synthetic image-text data with exact answers (phi-3-vision's chart, table and OCR data), seeded and resumable.

Three generators, each a pure function of ``(seed, index)``:

- ``charts``: a random small table (categories x integer values) drawn by matplotlib as a bar, line or pie chart
  with every value printed on it, and a conversation of questions whose answers are computed from the table
  (largest / smallest category, value of X, difference of X and Y, number of categories, and for line charts the
  trend from first to last). The table is kept in the record's metadata, so answers can be re-derived.
- ``tables``: a random table (items x numeric columns) drawn with PIL; the first answer is the cell text (rows
  on lines, cells joined by ``" | "``), then lookup questions.
- ``ocr``: a paragraph of the OpenStax textbooks (shared data) drawn with PIL; the pair's text is the paragraph,
  exactly.

Charts and tables are conversation records, OCR ones pairs (:mod:`phi3data.multimodal.records`). Fonts are the
DejaVu faces matplotlib ships, so nothing is downloaded and the same seed gives byte-identical images and shards.
Output shards are named by kind, config hash and record range, written atomically; a rerun skips finished ones.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import re
import time
import zlib
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from phi3data.io.inputs import file_sha256
from phi3data.io.writers import output_lock, refuse_other_config, remove_stale_tmp, write_json_atomic
from phi3data.multimodal.records import IMAGE_PLACEHOLDER, make_conversations, make_pairs
from phi3data.multimodal.writers import write_parquet

KINDS = ("charts", "tables", "ocr")
GENERATOR_VERSION = 1  # part of the config hash: bump when a generator's output changes
SHARD_RECORDS = 256

# (title template, category pool): bar and pie charts draw categories from a pool; line charts use years.
CHART_THEMES = [
    ("Fruit sold per day", ["Apples", "Bananas", "Cherries", "Grapes", "Lemons", "Mangoes", "Pears", "Plums"]),
    ("Visitors by city (thousands)", ["Berlin", "Cairo", "Delhi", "Lima", "Oslo", "Paris", "Quito", "Tokyo"]),
    ("Votes by colour", ["Red", "Blue", "Green", "Yellow", "Purple", "Orange", "Pink", "Brown"]),
    ("Animals counted in the park", ["Deer", "Foxes", "Owls", "Rabbits", "Squirrels", "Hedgehogs", "Ducks"]),
    ("Students per club", ["Chess", "Drama", "Music", "Robotics", "Soccer", "Tennis", "Art", "Debate"]),
]
LINE_THEMES = ["Rainfall (mm)", "Bicycles sold", "Library loans", "Solar output (kWh)", "Museum visitors"]
TABLE_ITEMS = ["Apple", "Bread", "Cheese", "Coffee", "Eggs", "Honey", "Milk", "Olives", "Pasta", "Rice", "Salt",
               "Tea"]
TABLE_COLUMNS = ["Price", "Stock", "Orders", "Weight", "Rating", "Returns"]
PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]

OCR_MIN_CHARS, OCR_MAX_CHARS = 200, 600
# Characters the DejaVu face draws and an OCR reader can be asked to read back: printable ASCII, Latin-1 letters
# and common typographic punctuation.
OCR_EXTRA_CHARS = set("’‘“”–—°×±µ")


@dataclass(frozen=True)
class SynthConfig:
    """What decides the records (and therefore the shard names)."""

    kind: str
    seed: int = 0
    shard_records: int = SHARD_RECORDS
    textbooks: str | None = None  # OCR source; default: the shared OpenStax file

    def hash(self) -> str:
        blob = {**asdict(self), "version": GENERATOR_VERSION}
        if self.kind == "ocr":  # the paragraphs come from a file: its content is part of the config
            blob["textbooks"] = file_sha256(_require_textbooks(textbooks_path(self.textbooks)))
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


@dataclass
class SynthSummary:
    output: Path
    records: int
    shards_total: int
    shards_skipped: int
    seconds: float


def _rng(seed: int, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(kind.encode()), index])


def _font_path(name: str = "DejaVuSans.ttf") -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name


@lru_cache(maxsize=16)
def _font(name: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(_font_path(name)), size)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _conversation(qa: list[dict], first_prompt: str | None = None) -> list[dict]:
    """User/assistant turns from question-answer pairs; the image placeholder opens the first user turn."""
    messages = []
    for i, item in enumerate(qa):
        question = item["question"] if i else f"{IMAGE_PLACEHOLDER}\n{first_prompt or item['question']}"
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": item["answer"]}]
    return messages


def _conversation_row(messages: list[dict], image: bytes, source: str, metadata: dict) -> dict:
    blob = json.dumps({"messages": messages, "image": hashlib.sha256(image).hexdigest()}, sort_keys=True)
    return {"id": hashlib.sha256(blob.encode()).hexdigest(), "messages": messages, "images": [image],
            "source": source, "metadata": metadata}


# --- charts ---------------------------------------------------------------------------------------------------


def chart_table(rng: np.random.Generator) -> dict:
    """A random chart table: ``chart`` (bar, line or pie), ``title``, ``categories`` and distinct int ``values``."""
    chart = str(rng.choice(["bar", "line", "pie"]))
    n = int(rng.integers(3, 7))
    if chart == "line":
        start = int(rng.integers(2000, 2020))
        title = str(rng.choice(LINE_THEMES))
        categories = [str(start + i) for i in range(n)]
    else:
        title, pool = CHART_THEMES[int(rng.integers(len(CHART_THEMES)))]
        categories = [str(c) for c in rng.choice(pool, size=n, replace=False)]
    values = [int(v) for v in rng.choice(np.arange(5, 100), size=n, replace=False)]
    return {"chart": chart, "title": title, "categories": categories, "values": values}


def chart_questions(table: dict, rng: np.random.Generator) -> list[dict]:
    """Questions about a chart table with answers computed from it (values are distinct, so answers are unique)."""
    cats, vals = table["categories"], table["values"]
    by_cat = dict(zip(cats, vals))
    what = "year" if table["chart"] == "line" else "category"
    a, b = (str(c) for c in rng.choice(cats, size=2, replace=False))
    qa = [
        {"kind": "max", "question": f"Which {what} has the highest value?", "answer": cats[int(np.argmax(vals))]},
        {"kind": "min", "question": f"Which {what} has the lowest value?", "answer": cats[int(np.argmin(vals))]},
        {"kind": "value", "question": f"What is the value of {a}?", "answer": str(by_cat[a])},
        {"kind": "difference", "question": f"What is the difference between the values of {a} and {b}?",
         "answer": str(abs(by_cat[a] - by_cat[b]))},
        {"kind": "count", "question": f"How many {'years' if what == 'year' else 'categories'} does the chart show?",
         "answer": str(len(cats))},
    ]
    if table["chart"] == "line":
        qa.append({"kind": "trend", "question": f"Did the value go up or down from {cats[0]} to {cats[-1]}?",
                   "answer": "up" if vals[-1] > vals[0] else "down"})
    return qa


def render_chart(table: dict, color: str) -> bytes:
    """The chart of a table as PNG bytes (matplotlib's Agg canvas, DejaVu Sans, every value printed)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cats, vals = table["categories"], table["values"]
    with matplotlib.rc_context():
        matplotlib.rcdefaults()  # the user's matplotlibrc must not change the images
        matplotlib.rcParams.update({"font.family": "DejaVu Sans", "font.size": 10, "svg.hashsalt": "phi3data"})
        fig = Figure(figsize=(4.8, 3.6), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if table["chart"] == "bar":
            bars = ax.bar(cats, vals, color=color)
            ax.bar_label(bars, labels=[str(v) for v in vals], padding=2)
            ax.set_ylim(0, max(vals) * 1.15)
            ax.tick_params(axis="x", labelrotation=20)
        elif table["chart"] == "line":
            ax.plot(cats, vals, marker="o", color=color)
            for x, v in zip(cats, vals):
                ax.annotate(str(v), (x, v), textcoords="offset points", xytext=(0, 7), ha="center",
                            bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none"})
            ax.set_ylim(0, max(vals) * 1.2)
        else:
            colors = [PALETTE[(PALETTE.index(color) + i) % len(PALETTE)] for i in range(len(cats))]
            ax.pie(vals, labels=[f"{c} ({v})" for c, v in zip(cats, vals)], colors=colors, startangle=90,
                   counterclock=False, wedgeprops={"linewidth": 1, "edgecolor": "white"})
            ax.set_aspect("equal")
        ax.set_title(table["title"])
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def chart_record(seed: int, index: int) -> dict:
    """One chart conversation record (a dict for :func:`make_conversations`)."""
    rng = _rng(seed, "charts", index)
    table = chart_table(rng)
    color = PALETTE[int(rng.integers(len(PALETTE)))]
    qa = chart_questions(table, rng)
    image = render_chart(table, color)
    meta = {"generator": "charts", "seed": seed, "index": index, "table": table, "qa": qa}
    return _conversation_row(_conversation(qa), image, "synthetic/charts", meta)


# --- tables -----------------------------------------------------------------------------------------------


def random_table(rng: np.random.Generator) -> dict:
    """A random table: ``header`` (Item + numeric columns) and ``rows`` of cell strings (distinct per column)."""
    n_rows, n_cols = int(rng.integers(3, 7)), int(rng.integers(2, 4))
    items = [str(i) for i in rng.choice(TABLE_ITEMS, size=n_rows, replace=False)]
    columns = [str(c) for c in rng.choice(TABLE_COLUMNS, size=n_cols, replace=False)]
    values = [[int(v) for v in rng.choice(np.arange(1, 500), size=n_rows, replace=False)] for _ in columns]
    rows = [[item, *(str(values[c][r]) for c in range(n_cols))] for r, item in enumerate(items)]
    return {"header": ["Item", *columns], "rows": rows}


def table_text(table: dict) -> str:
    """The OCR target of a table: one line per row (header first), cells joined by ``" | "``."""
    return "\n".join(" | ".join(row) for row in [table["header"], *table["rows"]])


def table_questions(table: dict, rng: np.random.Generator) -> list[dict]:
    header, rows = table["header"], table["rows"]
    qa = [{"kind": "transcribe", "question": "Transcribe the table: one row per line, cells separated by ' | '.",
           "answer": table_text(table)}]
    for _ in range(2):
        r, c = int(rng.integers(len(rows))), int(rng.integers(1, len(header)))
        qa.append({"kind": "lookup", "question": f"What is the {header[c]} of {rows[r][0]}?", "answer": rows[r][c]})
    c = int(rng.integers(1, len(header)))
    best = max(rows, key=lambda row: int(row[c]))
    qa.append({"kind": "max", "question": f"Which item has the highest {header[c]}?", "answer": best[0]})
    qa.append({"kind": "count", "question": "How many rows does the table have, not counting the header?",
               "answer": str(len(rows))})
    return qa


def render_table(table: dict, font_size: int = 18) -> bytes:
    """A table drawn with PIL (grid lines, bold header) as PNG bytes."""
    from PIL import Image, ImageDraw

    regular, bold = _font("DejaVuSans.ttf", font_size), _font("DejaVuSans-Bold.ttf", font_size)
    lines = [table["header"], *table["rows"]]
    pad, row_h = 10, font_size + 16
    widths = [max(int(bold.getlength(row[c])) for row in lines) + 2 * pad for c in range(len(lines[0]))]
    width, height = sum(widths) + 21, row_h * len(lines) + 21
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    y = 10
    for r, row in enumerate(lines):
        if r == 0:
            draw.rectangle([10, y, width - 11, y + row_h], fill="#E8E8E8")
        x = 10
        for c, cell in enumerate(row):
            draw.text((x + pad, y + 8), cell, fill="black", font=bold if r == 0 else regular)
            x += widths[c]
        y += row_h
    x = 10
    for w in [0, *widths]:
        x += w
        draw.line([(x, 10), (x, 10 + row_h * len(lines))], fill="black", width=1)
    for r in range(len(lines) + 1):
        draw.line([(10, 10 + r * row_h), (10 + sum(widths), 10 + r * row_h)], fill="black", width=1)
    return _png(image)


def table_record(seed: int, index: int) -> dict:
    """One table conversation record: transcription first, then lookups."""
    rng = _rng(seed, "tables", index)
    table = random_table(rng)
    qa = table_questions(table, rng)
    image = render_table(table)
    meta = {"generator": "tables", "seed": seed, "index": index, "table": table, "qa": qa}
    return _conversation_row(_conversation(qa), image, "synthetic/tables", meta)


# --- OCR text images ------------------------------------------------------------------------------------------


def textbooks_path(path: str | Path | None = None) -> Path:
    """The OpenStax textbook sections (shared data), or ``path``."""
    if path is not None:
        return Path(path)
    from phi3data.paths import shared_data

    return shared_data() / "textbooks" / "openstax.jsonl.gz"


def _require_textbooks(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"textbook file {path} is missing: OCR images are rendered from the shared "
                                f"OpenStax sections (../shared/data/textbooks/openstax.jsonl.gz) or --textbooks")
    return path


def _drawable(text: str) -> bool:
    return all(32 <= ord(ch) < 127 or 0xC0 <= ord(ch) <= 0xFF or ch in OCR_EXTRA_CHARS for ch in text)


@lru_cache(maxsize=2)
def ocr_paragraphs(path: str) -> tuple[tuple[str, str], ...]:
    """Single-line paragraphs of ``OCR_MIN_CHARS``..``OCR_MAX_CHARS`` drawable characters: (book, text), file order."""
    path = _require_textbooks(Path(path))
    out = []
    with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            book = (row.get("metadata") or {}).get("source") or ""
            for para in row.get("text", "").split("\n\n"):
                para = re.sub(r"\s+", " ", para).strip()
                if OCR_MIN_CHARS <= len(para) <= OCR_MAX_CHARS and _drawable(para):
                    out.append((book, para))
    if not out:
        raise ValueError(f"{path} has no paragraphs of {OCR_MIN_CHARS}-{OCR_MAX_CHARS} drawable characters")
    return tuple(out)


def wrap_text(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to lines no wider than ``width`` pixels (a longer single word gets a line of its own)."""
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    if line:
        lines.append(line)
    return lines


def render_text(text: str, font_size: int = 22, width: int = 720, margin: int = 24) -> bytes:
    """Black text on white, wrapped to ``width`` pixels, as PNG bytes."""
    from PIL import Image, ImageDraw

    font = _font("DejaVuSans.ttf", font_size)
    lines = wrap_text(text, font, width - 2 * margin)
    line_h = int(font_size * 1.7)  # OCR detectors merge or miss lines set closer than this
    image = Image.new("RGB", (width, 2 * margin + line_h * len(lines)), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * line_h), line, fill="black", font=font)
    return _png(image)


def ocr_record(seed: int, index: int, textbooks: str | None = None) -> dict:
    """One OCR pair record: a textbook paragraph drawn as an image, the paragraph as its text."""
    rng = _rng(seed, "ocr", index)
    paragraphs = ocr_paragraphs(str(textbooks_path(textbooks)))
    book, text = paragraphs[int(rng.integers(len(paragraphs)))]
    font_size = int(rng.choice([22, 24, 26]))
    image = render_text(text, font_size=font_size)
    meta = {"generator": "ocr", "seed": seed, "index": index, "book": book, "font": "DejaVuSans.ttf",
            "font_size": font_size}
    return {"image": image, "text": text, "source": "synthetic/ocr", "metadata": meta}


# --- shards ---------------------------------------------------------------------------------------------------


def make_records(config: SynthConfig, start: int, stop: int):
    """Records ``start .. stop-1`` of a kind as one record table (conversations, or pairs for OCR)."""
    if config.kind == "charts":
        return make_conversations([chart_record(config.seed, i) for i in range(start, stop)])
    if config.kind == "tables":
        return make_conversations([table_record(config.seed, i) for i in range(start, stop)])
    if config.kind == "ocr":
        return make_pairs([ocr_record(config.seed, i, config.textbooks) for i in range(start, stop)])
    raise ValueError(f"unknown kind {config.kind!r}: choose one of {', '.join(KINDS)}")


def shard_name(config: SynthConfig, config_hash: str, start: int, stop: int) -> str:
    return f"{config.kind}-{config_hash[:10]}-{start:08d}-{stop:08d}.parquet"


def write_shard(config_json: str, out_dir: str, item: dict) -> dict:
    """Generate and write one shard (the engine task)."""
    config = SynthConfig(**json.loads(config_json))
    write_parquet(make_records(config, item["start"], item["stop"]), Path(out_dir) / item["file"])
    return {"file": item["file"], "records": item["stop"] - item["start"]}


def generate(config: SynthConfig, count: int, output: Path, *, engine: str = "local", workers: int | None = 1,
             ray_address: str | None = None, spark_master: str | None = None,
             progress: bool = False) -> SynthSummary:
    """Write ``count`` records of ``config.kind`` into ``output`` as parquet shards plus ``manifest.json``.

    Shards run on the named engine (each is a pure function of the config and its record range). Same config and
    count give byte-identical files; finished shards are skipped on a rerun."""
    from phi3data.engines import map_shards
    from phi3data.engines.progress import drain

    if config.kind not in KINDS:
        raise ValueError(f"unknown kind {config.kind!r}: choose one of {', '.join(KINDS)}")
    if count < 1 or config.shard_records < 1:
        raise ValueError("count and shard_records must be at least 1")
    started = time.perf_counter()
    output = Path(output)
    config_hash = config.hash()
    items = [{"start": a, "stop": min(a + config.shard_records, count),
              "file": shard_name(config, config_hash, a, min(a + config.shard_records, count))}
             for a in range(0, count, config.shard_records)]
    with output_lock(output):
        refuse_other_config(output, config_hash, "synthetic images", "another kind, seed or config")
        remove_stale_tmp(output)
        pending = [i for i in items if not (output / i["file"]).exists()]
        task = functools.partial(write_shard, json.dumps(asdict(config), sort_keys=True), str(output))
        results = map_shards(task, pending, engine=engine, workers=workers, ray_address=ray_address,
                             spark_master=spark_master)
        drain(results, total=len(items), skipped=len(items) - len(pending), label=f"synth-images {config.kind}",
              count=lambda r: r["records"], unit="records", progress=progress)
        manifest = {"format": "phi3data-synthetic-images", "version": GENERATOR_VERSION, "config": asdict(config),
                    "config_hash": config_hash, "records": count, "shards": items}
        write_json_atomic(output / "manifest.json", manifest)
    return SynthSummary(output, count, len(items), len(items) - len(pending), time.perf_counter() - started)
