"""easy-VQA with its blind baseline: does the tiny LLaVA-style VLM read the image?

For each seed: stage 1 (``model/vlm-stage1-tiny-cpu.toml``: projector on easy-VQA image-caption pairs), then
stage 2 (``model/vlm-stage2-tiny-cpu.toml``: projector + language model on the easy-VQA train questions) twice
from the same stage-1 checkpoint: with the images, and blind (``vision.blind = true``: the same conversations with
the image tokens removed). Both are scored on the easy-VQA test split (``phi3data.evaluation.vlm``): the closed
answer set by log-likelihood ("options") and greedy answers (VQA accuracy), overall, on yes/no questions (with
POPE metrics) and on the other questions (shape and colour), beside the majority train answer of each group.
The result is the sighted - blind gap against the seed-to-seed spread.

``--tower clip`` first pretrains the recipe's small ViT contrastively (CLIP loss, frozen MiniLM text side) on the
easy-VQA train images and their captions, per seed, and trains both stages on that tower (the recipe's tower is
a random frozen ViT).

Run:  python -m bench.vlm_eval [--seeds 0 1 2] [--stage2-steps 600] [--eval-limit 2000] [--tower clip]
Writes OUT/results.json and OUT/results.md (default OUT: out/vlm_eval). Seeds may run side by side, one process
each (``--seeds 1 --threads 1 --out out/vlm_eval_s1``), then ``--merge DIR DIR ...`` joins their results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = ROOT / "model" / "vlm-stage1-tiny-cpu.toml"
STAGE2 = ROOT / "model" / "vlm-stage2-tiny-cpu.toml"


def build_data(out: Path, train_images: int | None) -> dict[str, Path]:
    """easy-VQA train pairs and conversations, tokenized for the two stages."""
    from phi3data.multimodal import easy_vqa
    from phi3data.tokenization.images import ImageTokenizeConfig, tokenize_images

    records = out / "records"
    if not (records / "conversations").exists():
        easy_vqa.build(records, "train", train_images)
    tokens = {"pairs": out / "tokens-pairs", "conversations": out / "tokens-conv"}
    tokenize_images([records / "pairs"], tokens["pairs"], ImageTokenizeConfig(mask="caption"))
    tokenize_images([records / "conversations"], tokens["conversations"], ImageTokenizeConfig(mask="assistant"))
    return tokens


def pretrain_tower(seed: int, out: Path, records: Path, steps: int) -> Path:
    """The recipe's small ViT, contrastively pretrained (``phi3data.model.clip_pretrain``, CLIP loss against the
    frozen MiniLM) on the easy-VQA train pairs ("a blue rectangle"); saved under ``out``."""
    import tomllib

    from phi3data.model.clip_pretrain import ContrastiveConfig, pretrain_tower_on_pairs

    vit = tomllib.loads(STAGE1.read_text())["vision"]["vit"]
    cfg = ContrastiveConfig(steps=steps, batch_size=64, lr=1e-3, seed=seed)
    return pretrain_tower_on_pairs([records / "pairs"], out, vit, cfg)


def train_seed(seed: int, tokens: dict[str, Path], runs: Path, args) -> dict[str, Path]:
    """Stage 1, then stage 2 with and without images, all from ``seed``; finished runs are kept (resumable).
    ``args.tower == "clip"``: the tower is contrastively pretrained first (per seed)."""
    from phi3data.training.trainer import train

    stage1 = runs / f"stage1-seed{seed}"
    common = {"seed": seed, "seq_len": args.seq_len}
    tower = {}
    if args.tower == "clip":
        records = tokens["pairs"].parent / "records"  # build_data's
        path = pretrain_tower(seed, runs / f"tower-clip-seed{seed}", records, args.clip_steps)
        tower = {"vision.tower": str(path), "vision.vit": {}}
    train(STAGE1, {**common, **tower, "out_dir": str(stage1), "data_path": str(tokens["pairs"]),
                   "max_steps": args.stage1_steps})
    out = {}
    for arm, blind in (("sighted", False), ("blind", True)):
        out[arm] = runs / f"stage2-{arm}-seed{seed}"
        train(STAGE2, {**common, "out_dir": str(out[arm]), "init_from": str(stage1),
                       "data_path": str(tokens["conversations"]), "max_steps": args.stage2_steps,
                       "vision.blind": blind})
    return out


def _flat(task_result: dict) -> dict[str, float]:
    """The numbers of one task's result as ``group::metric`` -> value."""
    out = {}
    for group, m in [("all", task_result["overall"]), *task_result["groups"].items()]:
        for key in ("options_accuracy", "vqa_accuracy", "majority_accuracy"):
            if key in m:
                out[f"{group}::{key}"] = m[key]
        for mode in ("options", "generate"):
            for key, value in m.get(f"pope_{mode}", {}).items():
                if key not in ("n", "unanswered"):
                    out[f"{group}::pope_{mode}_{key}"] = value
    return out


def question_prior(limit: int | None) -> dict[str, float]:
    """Accuracy of answering each easy-VQA test question with the most common train answer to the same question
    text (what a model that ignores the image can reach at best), overall and per group."""
    from collections import Counter, defaultdict

    from phi3data.multimodal.easy_vqa import questions

    answers: dict[str, Counter] = defaultdict(Counter)
    for question, answer, _ in questions("train"):
        answers[question][answer] += 1
    test = questions("test")[:limit]
    right: dict[str, list[bool]] = defaultdict(list)
    for question, answer, _ in test:
        guess = answers[question].most_common(1)[0][0] if question in answers else "yes"
        for group in ("all", "yes/no" if answer in ("yes", "no") else "other"):
            right[group].append(guess == answer)
    return {g: sum(r) / len(r) for g, r in right.items()}


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(results: dict) -> str:
    """A markdown table per task: sighted, blind, gap (mean ± sd over seeds) for every metric; beside the
    accuracies, the majority train answer of the group and (easy-VQA) the per-question majority train answer."""
    lines = []
    seeds = sorted(results["runs"])
    for task in results["tasks"]:
        flat = {arm: [_flat(results["runs"][s][arm][task]) for s in seeds] for arm in ("sighted", "blind")}
        keys = list(flat["sighted"][0])
        n = results["runs"][seeds[0]]["sighted"][task]
        sizes = {g: m["n"] for g, m in [("all", n["overall"]), *n["groups"].items()]}
        prior = question_prior(results["args"]["eval_limit"]) if task == "easy-vqa" else {}
        lines += [f"### {task}: {len(seeds)} seeds ({', '.join(map(str, seeds))}), mean ± sd", "",
                  "| questions | metric | with images | blind | gap (per-seed pairs) | majority answer | "
                  "question prior |", "|---|---|---:|---:|---:|---:|---:|"]
        for key in keys:
            group, metric = key.split("::", 1)
            if metric == "majority_accuracy":
                continue
            sighted = [f[key] for f in flat["sighted"]]
            blind = [f[key] for f in flat["blind"]]
            gaps = [a - b for a, b in zip(sighted, blind)]
            majority = flat["sighted"][0].get(f"{group}::majority_accuracy")
            show_majority = metric in ("options_accuracy", "vqa_accuracy") and majority is not None
            qp = prior.get(group) if show_majority else None
            lines.append(f"| {group} ({sizes[group]}) | {metric} | {_mean_sd(sighted)} | {_mean_sd(blind)} | "
                         f"{_mean_sd(gaps)} | {f'{majority:.3f}' if show_majority else ''} | "
                         f"{'' if qp is None else f'{qp:.3f}'} |")
        lines.append("")
    return "\n".join(lines)


IGNORED = ("seeds", "out", "threads", "merge", "charts")  # options that do not change a seed's result


OLDER_DEFAULTS = {"tower": "small", "clip_steps": 300}  # options added after the first results were written


def merge(parts: list[dict]) -> dict:
    """One result from runs of the same settings with different seeds."""
    for part in parts:
        part["args"] = {**OLDER_DEFAULTS, **part["args"]}
    first = parts[0]
    same = {k: v for k, v in first["args"].items() if k not in IGNORED}
    for part in parts[1:]:
        other = {k: v for k, v in part["args"].items() if k not in IGNORED}
        if other != same:
            raise ValueError(f"cannot merge runs with different settings: {same} vs {other}")
    runs = {}
    for part in parts:
        runs.update(part["runs"])
    return {**first, "runs": runs, "merged_from": [p["args"]["out"] for p in parts]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-images", type=int, default=None, help="easy-VQA train images (default: all 4,000)")
    parser.add_argument("--stage1-steps", type=int, default=80)
    parser.add_argument("--stage2-steps", type=int, default=150)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval-limit", type=int, default=None, help="test questions (default: all 9,673)")
    parser.add_argument("--tower", choices=["small", "clip"], default="small",
                        help="small: the recipe's random frozen ViT; clip: the same ViT contrastively pretrained on "
                             "the train images and captions first")
    parser.add_argument("--clip-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 when seeds run side by side)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "vlm_eval")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="only merge the results.json of these output directories (seeds run side by side) "
                             "into OUT/results.json and OUT/results.md")
    args = parser.parse_args()
    if args.merge:
        merged = merge([json.loads((d / "results.json").read_text()) for d in args.merge])
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(merged, indent=2))
        text = report(merged)
        (args.out / "results.md").write_text(text)
        print(text)
        return

    import torch

    from phi3data.evaluation.vlm import evaluate_vlm_checkpoint

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    tokens = build_data(args.out, args.train_images)
    tasks = ["easy-vqa"]
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "tasks": tasks,
               "runs": {}}
    for seed in args.seeds:
        t0 = time.perf_counter()
        runs = train_seed(seed, tokens, args.out / "runs", args)
        results["runs"][seed] = {}
        for arm, run in runs.items():
            r = evaluate_vlm_checkpoint(run, "phi3-mini", tasks, limit=args.eval_limit, blind=arm == "blind",
                                        device="cpu")
            for task in r["tasks"].values():
                task.pop("items")
            results["runs"][seed][arm] = r["tasks"]
        print(f"seed {seed}: trained and scored in {time.perf_counter() - t0:.0f} s", flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    results["seconds"] = round(time.perf_counter() - started)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    (args.out / "results.md").write_text(text)
    print(text)
    print(f"{results['seconds']} s; results: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
