"""The report of a curation run (``phi3data run``): funnel, drops with examples, scores, languages, domains,
lengths, rejects, dedup clusters and contamination hits."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from phi3data.report import svg
from phi3data.report.rows import columns_of, domain, iter_rows, read_json
from phi3data.report.sample import Reservoir, excerpt, smallest

EXAMPLES_PER_REASON = 3
CLUSTERS = 10
HITS = 10
TOP_DOMAINS = 20
SCORE_BINS = 40
THRESHOLD_STAGES = ("edu_threshold", "knowledge_threshold")



def _files(directory: Path, manifest: dict, key: str, folder: str) -> list[Path]:
    """The run's files in ``folder``: the manifest names each data shard; rejects and findings (one file per shard
    and pass, ``*.s<k>.parquet`` for earlier passes) are every Parquet file there (a directory holds one recipe)."""
    if key == "data":
        names = [entry.get(key) for entry in manifest.get("shards", []) if isinstance(entry.get(key), str)]
        paths = [p for p in (directory / folder / name for name in names) if p.is_file()]
        if paths:
            return paths
    return sorted((directory / folder).glob("*.parquet")) + sorted((directory / folder).glob("*.jsonl"))


def thresholds(manifest: dict, stats: dict) -> dict[str, list[tuple[float, str]]]:
    """Score column -> the cuts the recipe chose: a language stage's ``min_score``, a threshold stage's decision."""
    found: dict[str, list[tuple[float, str]]] = defaultdict(list)
    decisions = stats.get("decisions", {})
    for stage in manifest.get("recipe", {}).get("stages", []):
        params = stage.get("params", {})
        if stage["type"] == "language" and params.get("min_score") is not None:
            found["language_score"].append((float(params["min_score"]), f"{stage['name']} ≥ {params['min_score']}"))
        if stage["type"] in THRESHOLD_STAGES:
            decision = decisions.get(stage["name"], {})
            cut = decision.get("threshold_score", params.get("min_score"))
            if cut is not None:
                found[params.get("column", "edu_score")].append(
                    (float(cut), f"{stage['name']} {decision.get('mode', params.get('mode', ''))} ≥ {cut:.3g}"))
    return found


class _DataScan:
    """One pass over the kept documents: score histograms, languages, domains, lengths, per-domain examples."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.columns = columns_of(paths[0]) if paths else []
        self.score_columns = [c for c in self.columns if c.endswith("_score") or c == "seed_overlap"]
        self.scores: dict[str, list[float]] = {c: [] for c in self.score_columns}
        self.languages: Counter = Counter()
        self.domains: Counter = Counter()
        self.chars: list[int] = []
        self.words = 0
        self.by_domain = Reservoir(1)
        self.by_source = Reservoir(1)
        self.ids: set[str] = set()
        wanted = ["id", "text", "url", "source", "language", *self.score_columns]
        for row in iter_rows(paths, wanted):
            text = row.get("text") or ""
            self.chars.append(len(text))
            self.words += len(text.split())
            for c in self.score_columns:
                if row.get(c) is not None:
                    self.scores[c].append(float(row[c]))
            if row.get("language"):
                self.languages[row["language"]] += 1
            host = domain(row.get("url"))
            self.domains[host] += 1

            def make(row=row, text=text, host=host):
                return {"id": row.get("id"), "url": row.get("url"), "source": row.get("source"), "domain": host,
                        "text": excerpt(text)}

            self.by_domain.offer(host, row.get("id"), make)
            self.by_source.offer(str(row.get("source")), row.get("id"), make)

    def kept_beside(self, url: object, source: object) -> dict | None:
        """A kept document from the same domain, else the same source, else none."""
        host = domain(url)
        if host not in ("(no url)", "(no domain)"):
            found = self.by_domain.get(host)
            if found:
                return {**found[0], "match": "same domain"}
        found = self.by_source.get(str(source))
        return {**found[0], "match": "same source"} if found else None


def _texts_by_id(paths: list[Path], ids: set[str]) -> dict[str, dict]:
    out = {}
    if not ids:
        return out
    for row in iter_rows(paths, ["id", "text", "url"]):
        if row.get("id") in ids:
            out[row["id"]] = {"text": excerpt(row.get("text")), "url": row.get("url")}
    return out


def _input_files(input_path: Path | None) -> list[Path]:
    if input_path is None:
        return []
    path = Path(input_path)
    files = [path] if path.is_file() else sorted([*path.rglob("*.parquet"), *path.rglob("*.jsonl")])
    return [f for f in files if f.suffix in (".parquet", ".jsonl") and not f.name.startswith(("_", "."))]


def build(directory: Path, input_path: Path | None = None) -> dict:
    """Everything the curation template shows, computed from the run's files (and its input, if given)."""
    manifest, stats = read_json(directory / "manifest.json"), read_json(directory / "stats.json")
    data_paths = _files(directory, manifest, "data", "data")
    scan = _DataScan(data_paths)
    cuts = thresholds(manifest, stats)

    # funnel
    funnel, bars = [], [("read", stats["documents_read"])]
    for s in stats["stages"]:
        decision = stats.get("decisions", {}).get(s["name"], {})
        funnel.append({**s, "dropped": s["in"] - s["out"], "kept_pct": 100 * s["out"] / s["in"] if s["in"] else None,
                       "tokens_in": decision.get("total_tokens"), "tokens_out": decision.get("kept_tokens")})
        bars.append((s["name"], s["out"]))

    # drops by reason, with replayed examples beside a kept document
    replay, replay_error = None, None
    if input_path is not None:
        from phi3data.report.replay import replay_drops

        try:
            replay = replay_drops(manifest, stats, Path(input_path))
        except (ValueError, OSError) as exc:
            replay_error = str(exc)
    examples: dict[str, list[dict]] = defaultdict(list)
    for drop in smallest(replay["drops"], len(replay["drops"])) if replay else []:
        if len(examples[drop["reason"]]) < EXAMPLES_PER_REASON:
            examples[drop["reason"]].append({"dropped": drop, "kept": scan.kept_beside(drop["url"], drop["source"])})
    findings = _findings(_files(directory, manifest, "findings", "findings"))
    reasons_of = {s["name"]: list(s["drops"]) for s in stats["stages"]}
    for f in smallest(findings, len(findings)):
        if f["kind"] in ("duplicate", "benchmark_match") or "excerpt" not in f["detail"]:
            continue
        own = reasons_of.get(f["stage"], [])
        reason = own[0] if len(own) == 1 else f"{f['stage']}:{f['kind']}"
        if len(examples[reason]) < EXAMPLES_PER_REASON:
            examples[reason].append({"dropped": {"id": f["id"], "text": excerpt(f["detail"].get("excerpt")),
                                                 "url": f["detail"].get("url"), "stage": f["stage"]},
                                     "kept": scan.kept_beside(f["detail"].get("url"), None)})
    # dedup and contamination drops: the dropped member beside the kept one, the document beside the item
    inputs = _input_files(input_path)
    clusters = _clusters(findings, data_paths, inputs)
    contamination = _contamination(directory, manifest, findings, data_paths, inputs)
    for c in clusters:
        reason = f"{c['stage']}:duplicate"
        for member in c["dropped"]:
            if len(examples[reason]) < EXAMPLES_PER_REASON:
                examples[reason].append({"dropped": member,
                                         "kept": {**c["kept"], "match": "kept member of its cluster"}})
    for hit in (contamination or {}).get("hits", []):
        reason = f"{hit['stage']}:contaminated"
        if len(examples[reason]) < EXAMPLES_PER_REASON:
            examples[reason].append({"dropped": {"id": hit["id"], "text": hit["document"]},
                                     "kept": {"id": f"{hit['benchmark']} #{hit['item']}",
                                              "text": hit["item_text"] or hit["matched"],
                                              "match": "the benchmark item it reproduces"}})
    drops = []
    for s in stats["stages"]:
        for reason, count in sorted(s["drops"].items(), key=lambda kv: -kv[1]):
            drops.append({"stage": s["name"], "reason": reason, "count": count, "examples": examples.get(reason, [])})

    # score histograms with the chosen thresholds
    histograms = []
    for column in scan.score_columns:
        values = scan.scores[column]
        if not values:
            continue
        lo, hi = (0.0, 1.0) if 0 <= min(values) and max(values) <= 1 else (None, None)
        counts, edges = svg.bins(values, SCORE_BINS, lo, hi)
        marks = cuts.get(column, [])
        histograms.append({"column": column, "n": len(values), "thresholds": marks,
                           "svg": svg.histogram([(column, counts)], edges, thresholds=marks, xlabel=column)})

    # lengths (log10 characters)
    lengths = None
    if scan.chars:
        counts, edges = svg.bins([math.log10(max(c, 1)) for c in scan.chars], 30)
        lengths = svg.histogram([("chars", counts)], edges, xlabel="log10(characters per kept document)")

    # rejects (bad input) by reason
    rejects = _rejects(_files(directory, manifest, "rejects", "rejects"))

    return {
        "kind": "curation", "directory": str(directory), "manifest": manifest, "stats": stats,
        "pipeline": manifest.get("pipeline"), "funnel": funnel,
        "has_tokens": any(s["tokens_in"] is not None for s in funnel), "funnel_svg": svg.hbars(bars, title="documents"),
        "words_out": scan.words, "chars_out": sum(scan.chars),
        "drops": drops, "replay": replay, "replay_error": replay_error,
        "histograms": histograms, "lengths": lengths,
        "languages": svg.hbars(scan.languages.most_common(15)) if scan.languages else None,
        "language_counts": scan.languages.most_common(15),
        "domains": svg.hbars(scan.domains.most_common(TOP_DOMAINS)),
        "domain_counts": scan.domains.most_common(TOP_DOMAINS),
        "rejects": rejects, "clusters": clusters, "contamination": contamination,
        "reports": stats.get("reports", {}),
    }


def _findings(paths: list[Path]) -> list[dict]:
    out = []
    for path in paths:
        table = pq.read_table(path)
        for row in table.to_pylist():
            try:
                row["detail"] = json.loads(row["detail"]) if row.get("detail") else {}
            except ValueError:
                row["detail"] = {"raw": row["detail"]}
            out.append(row)
    return out


def _rejects(paths: list[Path]) -> list[dict]:
    counts: Counter = Counter()
    rows: dict[str, list[dict]] = defaultdict(list)
    for row in iter_rows([p for p in paths if p.is_file()]):
        counts[row.get("reason")] += 1
        rows[row.get("reason")].append(row)
    out = []
    for reason, count in counts.most_common():
        chosen = smallest(rows[reason], EXAMPLES_PER_REASON)
        out.append({"reason": reason, "count": count, "examples": [
            {"id": r.get("id"), "source": r.get("source"), "stage": r.get("stage"),
             "detail": excerpt(r.get("detail"), 300),
             "offset": r.get("offset"), "excerpt": excerpt(r.get("excerpt"), 400)} for r in chosen]})
    return out


def _clusters(findings: list[dict], data_paths: list[Path], inputs: list[Path]) -> list[dict]:
    """Dedup clusters (findings of kind ``duplicate``): the kept document beside the dropped members."""
    members: dict[tuple[str, str], list[str]] = defaultdict(list)
    sizes: dict[tuple[str, str], int] = {}
    for f in findings:
        if f["kind"] == "duplicate" and f["detail"].get("cluster"):
            key = (f["stage"], f["detail"]["cluster"])
            members[key].append(f["id"])
            sizes[key] = f["detail"].get("size", 0)
    if not members:
        return []
    chosen = smallest([{"id": k[1], "key": k} for k in members], CLUSTERS)
    keys = [c["key"] for c in chosen]
    kept_ids = {k[1] for k in keys}
    dropped_ids = {m for k in keys for m in sorted(members[k])[:3]}
    texts = _texts_by_id(data_paths, kept_ids)
    texts.update({k: v for k, v in _texts_by_id(inputs, dropped_ids | kept_ids).items() if k not in texts})
    return [{"stage": k[0], "kept": {"id": k[1], **texts.get(k[1], {})}, "size": sizes[k],
             "dropped": [{"id": m, **texts.get(m, {})} for m in sorted(members[k])[:3]],
             "more": max(0, len(members[k]) - 3)} for k in keys]


def _benchmark_items(manifest: dict, wanted: set[tuple[str, str, str]]) -> dict[tuple[str, str, str], str]:
    """The text of each (stage, benchmark, item) hit, read from the benchmark files the run's recipe names (the
    files must still be where the recipe says; otherwise the report shows the matched passage only)."""
    from phi3data.report.replay import recipe_of

    found: dict[tuple[str, str, str], str] = {}
    try:
        stages = {s.name: s for s in recipe_of(manifest).build_stages()}
        for stage_name in sorted({w[0] for w in wanted}):
            for bench in stages[stage_name].load():
                for index, item in enumerate(bench.ids):
                    key = (stage_name, bench.name, str(item))
                    if key in wanted:
                        found[key] = bench.texts[index]
    except (ValueError, OSError, KeyError, AttributeError):
        return found
    return found


def _contamination(directory: Path, manifest: dict, findings: list[dict], data_paths: list[Path],
                   inputs: list[Path]) -> dict | None:
    """Contamination: the report of each decontaminate stage and sampled hits: the benchmark item beside the
    document that reproduces it."""
    reports = {p.stem: read_json(p) for p in sorted((directory / "reports").glob("*.json"))}
    reports = {k: v for k, v in reports.items() if "benchmarks" in v and "totals" in v}
    hits = [f for f in findings if f["kind"] == "benchmark_match"]
    if not reports and not hits:
        return None
    chosen = smallest(hits, HITS)
    ids = {h["id"] for h in chosen}
    texts = _texts_by_id(data_paths, ids)
    texts.update({k: v for k, v in _texts_by_id(inputs, ids).items() if k not in texts})
    keys = [(h["stage"], str(h["detail"].get("benchmark")), str(h["detail"].get("item"))) for h in chosen]
    items = _benchmark_items(manifest, set(keys)) if keys else {}
    return {"reports": reports, "hits": [{"id": h["id"], "stage": h["stage"], "benchmark": h["detail"].get("benchmark"),
                                          "item": h["detail"].get("item"), "ratio": h["detail"].get("ratio"),
                                          "matched": excerpt(h["detail"].get("matched"), 800),
                                          "item_text": excerpt(items[key], 800) if key in items else None,
                                          "document": texts.get(h["id"], {}).get("text")}
                                         for h, key in zip(chosen, keys)],
            "total_hits": len(hits)}
