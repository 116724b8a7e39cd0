"""The memory-mapped token reader shared by the trainer and users: fixed-length windows over token files.

Inputs: a directory of token shards (``phi3data.tokenization.shards``; a shard's ``S.mask`` becomes the loss
mask), a directory of plain ``*.bin`` files with a ``manifest.json`` naming their ``"dtype"``, one shard stem,
one plain ``.bin`` (give its dtype), or a list of these. Token files are flat little-endian ``uint16``/``uint32``.

Sample ``i`` is the ``i``-th window of ``seq_len + 1`` tokens (inputs + shifted targets) in file order. Windows
start every ``seq_len`` tokens of a file, so consecutive windows share one token, and never cross files (a
file's last ``< seq_len`` tokens are not read). Each epoch visits the samples in a permutation drawn from
``(seed, epoch)``; the position in this endless stream is one integer, the number of samples consumed, so a
checkpoint stores it and a resumed run sees exactly the samples the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from phi3data.tokenization.shards import SUFFIXES, TokenShard, memmap_tokens, open_shards

IGNORE_INDEX = -100  # target value the loss skips (torch's cross-entropy default; Phi3.forward's ignore_index)


def _manifest_dtype(manifest: Path) -> str | None:
    if not manifest.exists():
        return None
    dtype = json.loads(manifest.read_text()).get("dtype")
    if dtype is None:
        raise ValueError(f"{manifest} has no 'dtype' key; pass the token dtype (uint16/uint32)")
    return dtype


def _is_shard(path: Path) -> bool:
    stem = path.with_suffix("") if path.suffix in SUFFIXES + (".json",) else path
    return stem.name != "manifest" and stem.with_name(stem.name + ".json").exists()


def _vocab_size(shard: TokenShard) -> int | None:
    return (shard.manifest.get("tokenizer") or {}).get("vocab_size")


def _sources(path: Path, dtype: str | None) -> list[tuple[str, np.ndarray, np.ndarray | None, int | None]]:
    """``(name, tokens, mask or None, tokenizer vocab size or None)`` for every token file under one input path,
    in file order."""
    if path.is_dir():
        shards = open_shards(path)
        if shards:  # a shard directory: finished shards only (each has its S.json)
            return [(str(s.stem), s.tokens, s.mask, _vocab_size(s)) for s in shards]
        files = sorted(path.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"no token shards or *.bin token files in {path}")
        dtype = dtype or _manifest_dtype(path / "manifest.json")
        if dtype is None:
            raise ValueError(f"{path} has no manifest.json; pass the token dtype (uint16/uint32)")
        return [(str(f), memmap_tokens(f, dtype), None, None) for f in files]
    if _is_shard(path):
        s = TokenShard.open(path)
        return [(str(s.stem), s.tokens, s.mask, _vocab_size(s))]
    if not path.exists():
        raise FileNotFoundError(f"token file {path} does not exist")
    dtype = dtype or _manifest_dtype(path.with_name("manifest.json"))
    if dtype is None:
        raise ValueError(f"token dtype for {path} is unknown: pass dtype='uint16' or 'uint32'")
    return [(str(path), memmap_tokens(path, dtype), None, None)]


class PackedDataset:
    """Windows of ``seq_len + 1`` tokens over memory-mapped token files, with the loss mask when there is one."""

    def __init__(self, paths: Path | str | list, seq_len: int, *, dtype: str | None = None, seed: int = 0,
                 shuffle: bool = True) -> None:
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise ValueError("no token paths given")
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, not {seq_len}")
        sources = [src for p in paths for src in _sources(Path(p), dtype)]
        names = ", ".join(map(str, paths))
        dtypes = {a.dtype for _, a, _, _ in sources}
        if len(dtypes) != 1:
            raise ValueError(f"{names}: token files mix dtypes {sorted(d.name for d in dtypes)}")
        self.dtype = dtypes.pop()
        if dtype is not None and np.dtype(dtype) != self.dtype:  # shards name their dtype: a different one is a slip
            raise ValueError(f"{names}: the tokens are {self.dtype.name}, not the dtype {dtype} given")
        sources = [src for src in sources if len(src[1])]
        if not sources:
            raise ValueError(f"no tokens in {names}")
        masked = [m is not None for _, _, m, _ in sources]
        if any(masked) and not all(masked):
            bare = [n for (n, _, m, _) in sources if m is None]
            raise ValueError(f"{names}: some token files have a loss mask and some do not ({len(bare)} without, e.g. "
                             f"{bare[0]}); train on them separately or give every file a mask")
        self.files = [n for n, _, _, _ in sources]
        self.arrays = [a for _, a, _, _ in sources]
        self.masks = [m for _, _, m, _ in sources if m is not None] if all(masked) else None
        declared = [v for _, _, _, v in sources if v is not None]
        self.tokenizer_vocab_size = max(declared) if declared else None  # from the shards' manifests
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        file_ids, offsets = [], []
        for i, arr in enumerate(self.arrays):
            n = max(len(arr) - 1, 0) // seq_len  # windows overlap by one token (the last target)
            file_ids.append(np.full(n, i, dtype=np.int32))
            offsets.append(np.arange(n, dtype=np.int64) * seq_len)
        self.file_ids = np.concatenate(file_ids)
        self.offsets = np.concatenate(offsets)
        if len(self.offsets) == 0:
            raise ValueError(f"{names}: no token file has {seq_len + 1} tokens, so no window of seq_len + 1 fits")
        self.samples = 0  # position of the iterator (__iter__), in samples consumed
        self._order_epoch = -1
        self._order = np.arange(0)

    def check_vocab(self, vocab_size: int, sample: int = 65_536) -> None:
        """Refuse token ids a model with ``vocab_size`` embeddings cannot take: the tokenizer's declared vocabulary
        (shard manifests) and the largest id in the first ``sample`` tokens of every file."""
        if self.tokenizer_vocab_size is not None and self.tokenizer_vocab_size > vocab_size:
            raise ValueError(f"these tokens come from a tokenizer with {self.tokenizer_vocab_size} ids, more than the "
                             f"model's vocab_size {vocab_size}")
        for name, arr in zip(self.files, self.arrays, strict=True):
            top = int(np.asarray(arr[:sample]).max(initial=0))
            if top >= vocab_size:
                raise ValueError(f"token id {top} in {name} is outside the model vocab ({vocab_size})")

    @property
    def has_mask(self) -> bool:
        return self.masks is not None

    @property
    def num_tokens(self) -> int:
        return int(sum(len(a) for a in self.arrays))

    def __len__(self) -> int:
        return len(self.offsets)

    # ---- windows --------------------------------------------------------------------------------------------
    def window(self, i: int) -> np.ndarray:
        """The tokens (int64, ``seq_len + 1``) of window ``i`` in file order."""
        o = self.offsets[i]
        return np.asarray(self.arrays[self.file_ids[i]][o : o + self.seq_len + 1], dtype=np.int64)

    def window_mask(self, i: int) -> np.ndarray:
        """The loss mask (uint8, 1 = train on the token) of window ``i``; only when the files have one."""
        if self.masks is None:
            raise ValueError("these token files have no loss mask")
        o = self.offsets[i]
        return np.asarray(self.masks[self.file_ids[i]][o : o + self.seq_len + 1])

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Window ``i`` in file order: ``tokens`` (int64, ``seq_len + 1``) and ``mask`` when the files have one."""
        out = {"tokens": self.window(i)}
        if self.masks is not None:
            out["mask"] = self.window_mask(i)
        return out

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of an epoch: a permutation drawn from ``(seed, epoch)`` (file order unshuffled)."""
        if epoch != self._order_epoch:
            n = len(self)
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def index(self, position: int) -> int:
        """The window at ``position`` of the endless stream (samples consumed), epoch after epoch."""
        epoch, j = divmod(position, len(self))
        return int(self.order(epoch)[j])

    # ---- batches for the trainer ----------------------------------------------------------------------------
    def _pairs(self, windows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        xy = torch.from_numpy(np.stack([self.window(i) for i in windows]))
        # clone, not contiguous(): with one row both slices are already "contiguous" views of xy, and masking y
        # in place would then write into x
        x, y = xy[:, :-1].clone(), xy[:, 1:].clone()
        if self.masks is not None:  # the mask of a target position decides whether it is trained on
            keep = torch.from_numpy(np.stack([self.window_mask(i)[1:] for i in windows]))
            y.masked_fill_(keep == 0, IGNORE_INDEX)
        return x, y

    def batch(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``start .. start+size-1`` of the stream as (inputs, targets), int64 ``[size, seq_len]``.

        Targets are ``-100`` (ignored by the loss) where the loss mask is 0.
        """
        return self._pairs([self.index(s) for s in range(start, start + size)])

    def fixed_batches(self, n_batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first windows in file order (no shuffle), as (inputs, targets) batches, for evaluation."""
        return [self._pairs([(b * batch_size + r) % len(self) for r in range(batch_size)]) for b in range(n_batches)]

    def split(self, n_val: int) -> tuple[PackedDataset, PackedDataset]:
        """Hold out the last ``n_val`` windows (file order) for validation; the rest is for training."""
        if not 0 < n_val < len(self):
            raise ValueError(f"cannot hold out {n_val} of {len(self)} windows for validation")
        parts = []
        for sl in (slice(0, len(self) - n_val), slice(len(self) - n_val, None)):
            part = object.__new__(PackedDataset)
            part.__dict__.update(self.__dict__)
            part.file_ids, part.offsets = self.file_ids[sl], self.offsets[sl]
            part.samples, part._order_epoch, part._order = 0, -1, np.arange(0)
            parts.append(part)
        return parts[0], parts[1]

    # ---- a resumable iterator for users ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Samples (as :meth:`sample` gives them) from the current position on, forever; advances ``samples``."""
        while True:
            i = self.index(self.samples)
            self.samples += 1
            yield self.sample(i)

    def state_dict(self) -> dict:
        return {"samples": self.samples, "seed": self.seed, "seq_len": self.seq_len, "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        if state["seq_len"] != self.seq_len or state["num_tokens"] != self.num_tokens:
            raise ValueError("the saved data position belongs to another dataset or sequence length")
        self.seed, self.samples = state["seed"], state["samples"]
        self._order_epoch = -1


# --- phases ----------------------------------------------------------------------------------------------------

@dataclass
class Phase:
    """One phase of a phased run: its windows and how many of them it contributes (its token budget)."""

    name: str
    data: PackedDataset
    samples: int


class PhasedDataset:
    """Phases consumed in order, never mixed: positions ``[start_k, start_k + samples_k)`` of the stream are phase
    ``k``'s, in its own seeded order (epoch after epoch if its budget allows repetition). A batch straddling a
    boundary takes its first samples from the ending phase and the rest from the next one, so the samples are
    the same whatever the batch size. Position ``p`` always maps to the same window, so a resumed run reads
    exactly what an uninterrupted one would."""

    def __init__(self, phases: list[Phase]) -> None:
        if not phases:
            raise ValueError("a phased dataset needs at least one phase")
        masked = {p.data.has_mask for p in phases}
        if len(masked) > 1:
            raise ValueError("some phases have a loss mask and some do not; train them separately")
        self.phases = phases
        self.starts = np.cumsum([0] + [p.samples for p in phases])
        self.has_mask = masked.pop()

    @property
    def total_samples(self) -> int:
        return int(self.starts[-1])

    def __len__(self) -> int:
        return self.total_samples

    def phase_at(self, position: int) -> int:
        """The index of the phase that position ``position`` of the stream belongs to (the last one past the end)."""
        return min(int(np.searchsorted(self.starts, position, side="right")) - 1, len(self.phases) - 1)

    def check_vocab(self, vocab_size: int) -> None:
        for phase in self.phases:
            phase.data.check_vocab(vocab_size)

    def batch(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        position = start
        while position < start + size:
            k = self.phase_at(position)
            end = start + size if k == len(self.phases) - 1 else min(start + size, int(self.starts[k + 1]))
            x, y = self.phases[k].data.batch(position - int(self.starts[k]), end - position)
            xs.append(x)
            ys.append(y)
            position = end
        return torch.cat(xs), torch.cat(ys)
