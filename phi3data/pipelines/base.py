"""Stage base classes and the stage registry."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

STAGES: dict[str, type[Stage]] = {}


class StageParams(BaseModel):
    """Parameters of a stage; unknown keys are an error so typos in a recipe fail loudly."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class StageOutput:
    batch: pa.Table
    drops: Counter = field(default_factory=Counter)
    rejects: list[dict] = field(default_factory=list)
    findings: list[dict] = field(default_factory=list)
    """What a stage found about documents, kept or dropped (a benchmark item a document matched, the earlier
    document a duplicate matched): dicts with ``id`` and ``kind`` plus any JSON-serialisable detail. They are
    written per shard to ``findings/`` and summed into a report by the stage's ``report``."""


class Stage:
    """Maps a document batch to a batch. Heavy resources load lazily in ``setup`` (once per worker)."""

    type_name: ClassVar[str] = ""
    Params: ClassVar[type[StageParams]] = StageParams
    reports_always: ClassVar[bool] = False
    """Write a report even when the stage found nothing (a clean decontamination report is news too)."""

    def __init__(self, params: StageParams, name: str | None = None):
        self.params = params
        self.name = name or self.type_name
        self._ready = False

    def setup(self) -> None:
        """Load heavy resources; called once per worker before the first batch."""

    def identity(self) -> dict:
        """What the stage loads from outside the recipe (model files, by content hash). It is part of the recipe
        hash, so retraining a model in place gives a new hash instead of mixing old and new scores."""
        return {}

    def report(self, findings: pa.Table) -> dict:
        """A run-level report from all this stage's findings (columns ``id``, ``kind``, ``detail`` as a JSON
        string), written to ``reports/<stage name>.json`` and into the run's stats. Default: counts by kind."""
        kinds = Counter(findings.column("kind").to_pylist()) if findings.num_rows else Counter()
        return {"findings": findings.num_rows, "by_kind": dict(sorted(kinds.items()))}

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    def process(self, batch: pa.Table) -> StageOutput:
        raise NotImplementedError


class Filter(Stage):
    """A stage that keeps or drops whole documents; each drop is counted under a named reason.

    Subclasses implement ``reasons`` returning, per row, ``None`` to keep it or the reason to drop it. A filter
    may also return replacement texts (C4 keeps only its good lines), or ``None`` for no change.
    """

    def reasons(self, batch: pa.Table) -> tuple[list[str | None], list[str] | None]:
        raise NotImplementedError

    def process(self, batch: pa.Table) -> StageOutput:
        if batch.num_rows == 0:
            return StageOutput(batch)
        reasons, new_texts = self.reasons(batch)
        if new_texts is not None:
            index = batch.schema.get_field_index("text")
            batch = batch.set_column(index, batch.schema.field("text"), pa.array(new_texts, pa.large_string()))
        keep = pa.array([r is None for r in reasons], pa.bool_())
        drops = Counter(f"{self.name}:{r}" for r in reasons if r is not None)
        return StageOutput(batch.filter(keep) if drops else batch, drops)


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage available to recipes under its ``type_name``."""
    if not cls.type_name:
        raise ValueError(f"{cls.__name__} has no type_name")
    STAGES[cls.type_name] = cls
    return cls


def texts(batch: pa.Table) -> list[str]:
    """The batch's texts; a null text (an image record without a caption) reads as empty, which the text
    filters drop under their own reason for empty or short documents."""
    return [t or "" for t in batch.column("text").to_pylist()]


def set_column(batch: pa.Table, name: str, values: pa.Array) -> pa.Table:
    """Add or replace a column."""
    index = batch.schema.get_field_index(name)
    if index >= 0:
        return batch.set_column(index, name, values)
    return batch.append_column(name, values)


class GlobalStage(Stage):
    """A stage that needs the whole dataset before it can act (percentile thresholds, token budgets ...).

    The runner splits the pipeline at a global stage and runs it as map -> reduce on the driver -> map:
      1. ``summarize(batch)`` on every batch, in every worker: a small, additive summary (a dict of ints or of
         equal-length lists of ints, e.g. a fixed-bin histogram); the runner sums them over all shards, so the
         result is the same on every engine and in any order;
      2. ``decide(summary)`` once, on the driver: a JSON-serialisable decision (e.g. {"threshold": 2.7});
      3. ``apply(batch, decision)`` on every batch in a second pass: drops and columns as a normal stage.
    """

    def summarize(self, batch: pa.Table) -> dict:
        raise NotImplementedError

    def decide(self, summary: dict) -> dict:
        raise NotImplementedError

    def apply(self, batch: pa.Table, decision: dict) -> StageOutput:
        raise NotImplementedError

    def process(self, batch: pa.Table) -> StageOutput:
        raise RuntimeError(f"{self.name} is a global stage: run it through phi3data.pipelines.runner")


class KeyedStage(GlobalStage):
    """A global stage decided by a shuffle rather than a small summary (dedup): too much to sum on the driver.

    The runner runs it in three steps:
      1. ``keys(batch)`` in every worker: keyed rows per document (a ``key`` uint64 column and ``id``, plus the
         stage's own columns); each shard's rows are written, partitioned by key, next to the segment's output;
      2. ``resolve(job)`` on the driver, once: reduce tasks over the key partitions run on the run's engine
         (:class:`phi3data.pipelines.shuffle.ShuffleJob`) and write, per shard, what each document needs; it
         returns the (small) decision;
      3. ``apply_resolved(batch, decision, resolved)`` on every batch of the next pass, with ``resolved`` the
         rows the shuffle wrote for that batch's shard.
    """

    def keys(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError

    def resolve(self, job) -> dict:
        raise NotImplementedError

    def apply_resolved(self, batch: pa.Table, decision: dict, resolved: pa.Table) -> StageOutput:
        raise NotImplementedError

    def summarize(self, batch: pa.Table) -> dict:
        return {}

    def decide(self, summary: dict) -> dict:
        raise RuntimeError(f"{self.name} is decided by a shuffle: the runner calls resolve()")

    def apply(self, batch: pa.Table, decision: dict) -> StageOutput:
        raise RuntimeError(f"{self.name} needs its shard's resolved rows: the pipeline calls apply_resolved()")


def merge_summaries(a: dict, b: dict) -> dict:
    """Add two GlobalStage summaries key by key (ints add, lists of ints add element-wise)."""
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, list):
            if len(value) != len(out[key]):
                raise ValueError(f"summary list {key!r} has different lengths: {len(out[key])} vs {len(value)}")
            out[key] = [x + y for x, y in zip(out[key], value)]
        else:
            out[key] = out[key] + value
    return out
