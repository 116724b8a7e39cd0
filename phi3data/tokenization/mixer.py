"""Mix tokenized sources into training phases with weights or token budgets, counting repetition.

A mix recipe (TOML) names phases; each phase lists sources (directories of token shards made by
``phi3data tokenize``) with either a ``weight`` (a share of the phase's ``tokens``) or a ``tokens`` budget of
its own. Documents are taken whole, in a seeded permutation of each source; when a source runs out, its next
epoch starts with a new permutation, so repeated tokens are counted exactly. A source's position carries from
phase to phase (the same directory in phase 1 and phase 2 is not re-read from the start), and passing
``max_epochs`` warns. Each phase becomes a directory of token shards (plus ``manifest.json`` with the report),
its documents interleaved in a seeded order, ready for the trainer.

    name = "phi3-two-phase"
    seed = 1234
    max_epochs = 4.0

    [[phases]]
    name = "phase1"
    tokens = 2_000_000
    sources = [
      { name = "web", path = "out/tokens/web", weight = 0.9 },
      { name = "textbooks", path = "out/tokens/textbooks", weight = 0.1 },
    ]
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from phi3data.config import ConfigError, StrictModel, read_toml, validate
from phi3data.io.writers import output_lock, write_json_atomic
from phi3data.tokenization.shards import SHARD_FORMAT, TokenShardWriter, open_shards


class MixError(ConfigError):
    """A mix recipe that cannot be built; the message names the phase or source."""


class RepetitionWarning(UserWarning):
    """A source is repeated more times than the recipe's ``max_epochs`` allows."""


class SourceSpec(StrictModel):
    path: str
    """A tokenized directory (``phi3data tokenize`` output)."""
    name: str = ""
    """Defaults to the directory's name."""
    weight: float | None = Field(None, gt=0)
    tokens: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_budget(self) -> SourceSpec:
        if not self.name:
            self.name = Path(self.path).name
        if (self.weight is None) == (self.tokens is None):
            raise ValueError(f"source {self.name}: give exactly one of weight or tokens")
        return self


class PhaseSpec(StrictModel):
    name: str = ""
    tokens: int | None = Field(None, gt=0)
    """The phase's total budget, shared out by the weighted sources."""
    sources: list[SourceSpec] = []

    @model_validator(mode="after")
    def _budgeted(self) -> PhaseSpec:
        if not self.sources:
            raise ValueError(f"phase {self.name or '(unnamed)'}: no sources")
        if any(s.weight is not None for s in self.sources) and not self.tokens:
            raise ValueError(f"phase {self.name or '(unnamed)'}: weighted sources need the phase's total `tokens`")
        return self


class MixRecipe(StrictModel):
    name: str = "mix"
    seed: int = 0
    max_epochs: float = Field(4.0, gt=0)
    shard_tokens: int = Field(100_000_000, gt=0)
    phases: list[PhaseSpec] = []
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)
    """Where relative source paths start (the working directory); not part of the recipe file."""

    @model_validator(mode="after")
    def _named_phases(self) -> MixRecipe:
        if not self.phases:
            raise ValueError("a mix needs at least one [[phases]] entry")
        for index, phase in enumerate(self.phases):
            phase.name = phase.name or f"phase{index + 1}"
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique: {names}")
        return self


def load_mix(path: Path) -> MixRecipe:
    """Read and check a mix recipe; relative source paths are relative to the current directory."""
    try:
        raw = read_toml(path, "mix recipe")
    except ConfigError as exc:
        raise MixError(str(exc)) from None
    return parse_mix(raw, default_name=Path(path).stem, where=str(path))


def parse_mix(raw: dict, default_name: str = "mix", where: str = "mix recipe") -> MixRecipe:
    """Validate a mix recipe given as a dict (the TOML's tables)."""
    if "base_dir" in raw:
        raise MixError(f"{where}: base_dir: unknown field")
    try:
        return validate(MixRecipe, {"name": default_name, **raw}, where)
    except ConfigError as exc:
        raise MixError(str(exc)) from None


class _Source:
    """A tokenized directory as a list of documents, read in seeded permutations epoch after epoch."""

    def __init__(self, path: Path, name: str, seed: int):
        self.path = path
        self.shards = open_shards(path)
        if not self.shards:
            raise MixError(f"{path} has no token shards: run `phi3data tokenize ... --output {path}` first")
        manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").exists() else {}
        self.tokenizer_hash = manifest.get("tokenizer_hash") or self.shards[0].manifest.get("tokenizer_hash")
        self.dtype = self.shards[0].tokens.dtype
        self.doc_shard = np.concatenate([np.full(len(s), k, np.int32) for k, s in enumerate(self.shards)])
        self.doc_start = np.concatenate([s.starts for s in self.shards])
        self.doc_len = np.concatenate([np.diff(np.concatenate([[0], s.ends.astype(np.int64)]))
                                       for s in self.shards])
        self.unique_tokens = int(self.doc_len.sum())
        if self.unique_tokens == 0:
            raise MixError(f"{path} has no tokens")
        self.has_mask = all(s.mask is not None for s in self.shards)
        # Seeded by the source's name and content, not its path: the same data mixes the same wherever it lies.
        key = int.from_bytes(hashlib.sha256(f"{name}\0{self.content_identity()}".encode()).digest()[:4], "little")
        self.seed = [seed, key]
        self.epoch = 0
        self.cursor = 0
        self.consumed = 0
        self._order = self._permutation(0)

    def content_identity(self) -> str:
        """A hash of what the directory holds: its tokenizer and each shard's name (``phi3data tokenize`` names a
        shard by its input's content key and the tokenizer config), token count and document count."""
        parts = [str(self.tokenizer_hash)] + [f"{s.stem.name}:{len(s.tokens)}:{len(s)}" for s in self.shards]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([*self.seed, epoch]).permutation(len(self.doc_len))

    def take(self, budget: int) -> list[int]:
        """Documents (ids into this source) until at least ``budget`` tokens; whole documents only."""
        chosen: list[int] = []
        got = 0
        while got < budget:
            if self.cursor == len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._permutation(self.epoch)
            remaining = self._order[self.cursor:]
            cum = np.cumsum(self.doc_len[remaining])
            need = int(np.searchsorted(cum, budget - got, side="left")) + 1
            need = min(need, len(remaining))
            chosen += remaining[:need].tolist()
            got += int(cum[need - 1])
            self.cursor += need
        self.consumed += got
        return chosen

    def tokens_of(self, doc: int, mask: bool = False) -> np.ndarray:
        shard = self.shards[self.doc_shard[doc]]
        arr = shard.mask if mask else shard.tokens
        start = int(self.doc_start[doc])
        return np.asarray(arr[start:start + int(self.doc_len[doc])])


def _budgets(phase: PhaseSpec) -> list[int]:
    fixed = sum(s.tokens for s in phase.sources if s.tokens is not None)
    weights = [s.weight for s in phase.sources if s.weight is not None]
    rest = (phase.tokens or 0) - fixed
    if weights and rest <= 0:
        raise MixError(f"phase {phase.name}: token budgets ({fixed:,}) leave nothing of {phase.tokens:,} for "
                       f"the weighted sources")
    total_w = sum(weights)
    return [s.tokens if s.tokens is not None else int(round(rest * s.weight / total_w)) for s in phase.sources]


def build_mix(recipe: MixRecipe, output: Path, *, dry_run: bool = False) -> list[dict]:
    """Select documents for every phase, write each phase's shards under ``output/<phase>``; returns reports.
    The output directory is locked while it is written."""
    if dry_run:
        return _build_mix(recipe, output, dry_run=True)
    with output_lock(output):
        return _build_mix(recipe, output, dry_run=False)


def _build_mix(recipe: MixRecipe, output: Path, *, dry_run: bool) -> list[dict]:
    sources: dict[Path, _Source] = {}
    reports = []
    tokenizer_hashes = set()
    for phase in recipe.phases:
        budgets = _budgets(phase)
        picks: list[tuple[_Source, list[int]]] = []
        rows = []
        for spec, budget in zip(phase.sources, budgets, strict=True):
            path = Path(spec.path)
            if not path.is_absolute():
                path = recipe.base_dir / path
            if path not in sources:
                if not path.is_dir():
                    raise MixError(f"phase {phase.name}, source {spec.name}: {path} is not a tokenized directory")
                sources[path] = _Source(path, spec.name, recipe.seed)
            src = sources[path]
            tokenizer_hashes.add(src.tokenizer_hash)
            before = src.consumed
            docs = src.take(budget)
            selected = src.consumed - before
            unique_before = min(before, src.unique_tokens)
            unique_after = min(src.consumed, src.unique_tokens)
            epochs = src.consumed / src.unique_tokens
            row = {"source": spec.name, "path": str(spec.path), "weight": spec.weight, "budget": budget,
                   "tokens": selected, "documents": len(docs), "unique_available": src.unique_tokens,
                   "new_unique": unique_after - unique_before,
                   "repeated": selected - (unique_after - unique_before), "epochs": round(epochs, 4),
                   "warning": None}
            if epochs > recipe.max_epochs:
                row["warning"] = (f"{spec.name} is repeated {epochs:.2f} times (limit {recipe.max_epochs:g}): "
                                  f"add data or lower its weight")
                warnings.warn(f"phase {phase.name}: {row['warning']}", RepetitionWarning, stacklevel=2)
            rows.append(row)
            picks.append((src, docs))
        if len(tokenizer_hashes) > 1:
            raise MixError("the sources were tokenized with different tokenizers; re-tokenize them with one")
        total = sum(r["tokens"] for r in rows)
        for r in rows:
            r["share"] = round(r["tokens"] / total, 4) if total else 0.0
        report = {"mix": recipe.name, "phase": phase.name, "tokens": total, "budget": phase.tokens,
                  "documents": sum(r["documents"] for r in rows), "sources": rows,
                  "tokenizer_hash": next(iter(tokenizer_hashes)), "seed": recipe.seed}
        if not dry_run:
            _write_phase(recipe, phase, picks, output / phase.name, report)
        reports.append(report)
    return reports


def _write_phase(recipe: MixRecipe, phase: PhaseSpec, picks: list[tuple[_Source, list[int]]], out: Path,
                 report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("mix-*"):
        stale.unlink()
    order = [(k, d) for k, (_, docs) in enumerate(picks) for d in docs]
    phase_key = int.from_bytes(hashlib.sha256(phase.name.encode()).digest()[:4], "little")
    rng = np.random.default_rng([recipe.seed, phase_key])
    perm = rng.permutation(len(order))
    dtype = picks[0][0].dtype
    with_mask = all(src.has_mask for src, _ in picks)
    if not with_mask and any(src.has_mask for src, _ in picks):
        raise MixError(f"phase {phase.name!r} mixes sources with a loss mask (chat/SFT) and without; the mask would "
                       f"be lost: mix them in separate phases")
    shard_index, writer = 0, None
    for i in perm:
        k, doc = order[i]
        src = picks[k][0]
        if writer is None:
            writer = TokenShardWriter(out / f"mix-{shard_index:05d}", dtype, with_mask=with_mask)
        writer.write(src.tokens_of(doc), src.tokens_of(doc, mask=True) if with_mask else None)
        if writer.tokens >= recipe.shard_tokens:
            writer.close({"mix": recipe.name, "phase": phase.name, "tokenizer_hash": report["tokenizer_hash"]})
            shard_index, writer = shard_index + 1, None
    if writer is not None:
        writer.close({"mix": recipe.name, "phase": phase.name, "tokenizer_hash": report["tokenizer_hash"]})
    write_json_atomic(out / "manifest.json", {**report, "dtype": dtype.name, "format": SHARD_FORMAT})


def report_table(report: dict):
    """A rich Table of one phase: per source budget, tokens, share, unique vs repeated, epochs."""
    from rich.table import Table

    table = Table(title=f"{report['mix']} / {report['phase']}: {report['tokens']:,} tokens, "
                        f"{report['documents']:,} documents")
    for column in ("source", "weight", "budget", "tokens", "share", "unique avail.", "new unique", "repeated",
                   "epochs"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for r in report["sources"]:
        style = "red" if r["warning"] else None
        table.add_row(r["source"], "-" if r["weight"] is None else f"{r['weight']:g}", f"{r['budget']:,}",
                      f"{r['tokens']:,}", f"{100 * r['share']:.1f}%", f"{r['unique_available']:,}",
                      f"{r['new_unique']:,}", f"{r['repeated']:,}", f"{r['epochs']:.2f}", style=style)
    return table
