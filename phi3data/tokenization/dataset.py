"""The memory-mapped token reader shared by the trainer and users: fixed-length windows over token files.

Inputs: a directory of token shards (``phi3data.tokenization.shards``; a shard's ``S.mask`` becomes the loss
mask), a directory of plain ``*.bin`` files with a ``manifest.json`` naming their ``"dtype"``, one shard stem,
one plain ``.bin`` (give its dtype), or a list of these. Token files are flat little-endian ``uint16``/``uint32``.

Sample ``i`` is the ``i``-th window of ``seq_len + 1`` tokens (inputs + shifted targets) in file order. Windows
start every ``seq_len`` tokens of a file, so consecutive windows share one token, and never cross files (a
file's last ``< seq_len`` tokens are not read). Each epoch visits the samples in a permutation drawn from
``(seed, epoch)``; the position in this endless stream is one integer, the number of samples consumed, so a
checkpoint stores it and a resumed run sees exactly the samples the uninterrupted run would have seen.

``pack="documents"`` (SFT on chat shards) packs whole documents instead: consecutive documents of a file fill a
window of at most ``seq_len + 1`` tokens and the rest is padding (never trained on); a document longer than that
is left out and counted (``dropped_documents``). Each batch then carries the document id of every position, so
attention stays inside a conversation and no target is predicted across a boundary.
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


Source = tuple[str, np.ndarray, np.ndarray | None, int | None, np.ndarray | None]


def _sources(path: Path, dtype: str | None) -> list[Source]:
    """``(name, tokens, mask or None, tokenizer vocab size or None, document ends or None)`` for every token file
    under one input path, in file order."""
    if path.is_dir():
        shards = open_shards(path)
        if shards:  # a shard directory: finished shards only (each has its S.json)
            return [(str(s.stem), s.tokens, s.mask, _vocab_size(s), s.ends) for s in shards]
        files = sorted(path.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"no token shards or *.bin token files in {path}")
        dtype = dtype or _manifest_dtype(path / "manifest.json")
        if dtype is None:
            raise ValueError(f"{path} has no manifest.json; pass the token dtype (uint16/uint32)")
        return [(str(f), memmap_tokens(f, dtype), None, None, None) for f in files]
    if _is_shard(path):
        s = TokenShard.open(path)
        return [(str(s.stem), s.tokens, s.mask, _vocab_size(s), s.ends)]
    if not path.exists():
        raise FileNotFoundError(f"token file {path} does not exist")
    dtype = dtype or _manifest_dtype(path.with_name("manifest.json"))
    if dtype is None:
        raise ValueError(f"token dtype for {path} is unknown: pass dtype='uint16' or 'uint32'")
    return [(str(path), memmap_tokens(path, dtype), None, None, None)]


def _document_windows(ends: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Greedy packing of consecutive whole documents into spans of at most ``capacity`` tokens: (starts, stops,
    documents left out because they alone exceed ``capacity``)."""
    starts, stops, dropped = [], [], 0
    span_start = span_stop = 0
    prev = 0
    for end in np.asarray(ends, dtype=np.int64).tolist():
        if end - prev > capacity:  # too long to fit any window: close the open span, skip this document
            if span_stop > span_start:
                starts.append(span_start)
                stops.append(span_stop)
            dropped += 1
            span_start = span_stop = end
        elif end - span_start > capacity:
            starts.append(span_start)
            stops.append(span_stop)
            span_start, span_stop = prev, end
        else:
            span_stop = end
        prev = end
    if span_stop > span_start:
        starts.append(span_start)
        stops.append(span_stop)
    return np.asarray(starts, dtype=np.int64), np.asarray(stops, dtype=np.int64), dropped


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of an epoch's ``n`` samples, drawn from ``(seed, epoch)`` alone (so a resumed run redraws it)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def hold_out(data, n_val: int, what: str, narrow) -> tuple:
    """Two shallow copies of a dataset: all but its last ``n_val`` items, and those; ``narrow(copy, slice)`` cuts
    a copy's item index down to the slice. Each copy draws its own epoch orders."""
    if not 0 < n_val < len(data):
        raise ValueError(f"cannot hold out {n_val} of {len(data)} {what} for validation")
    parts = []
    for sl in (slice(0, len(data) - n_val), slice(len(data) - n_val, None)):
        part = object.__new__(type(data))
        part.__dict__.update(data.__dict__)
        narrow(part, sl)
        part._order_epoch, part._order = -1, np.arange(0)
        parts.append(part)
    return parts[0], parts[1]


class PackedDataset:
    """Windows of ``seq_len + 1`` tokens over memory-mapped token files, with the loss mask when there is one."""

    def __init__(self, paths: Path | str | list, seq_len: int, *, dtype: str | None = None, seed: int = 0,
                 shuffle: bool = True, pack: str = "stream") -> None:
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise ValueError("no token paths given")
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, not {seq_len}")
        if pack not in ("stream", "documents"):
            raise ValueError(f"pack must be 'stream' or 'documents', not {pack!r}")
        sources = [src for p in paths for src in _sources(Path(p), dtype)]
        names = ", ".join(map(str, paths))
        dtypes = {src[1].dtype for src in sources}
        if len(dtypes) != 1:
            raise ValueError(f"{names}: token files mix dtypes {sorted(d.name for d in dtypes)}")
        self.dtype = dtypes.pop()
        if dtype is not None and np.dtype(dtype) != self.dtype:  # shards name their dtype: a different one is a slip
            raise ValueError(f"{names}: the tokens are {self.dtype.name}, not the dtype {dtype} given")
        sources = [src for src in sources if len(src[1])]
        if not sources:
            raise ValueError(f"no tokens in {names}")
        masked = [src[2] is not None for src in sources]
        if any(masked) and not all(masked):
            bare = [src[0] for src in sources if src[2] is None]
            raise ValueError(f"{names}: some token files have a loss mask and some do not ({len(bare)} without, e.g. "
                             f"{bare[0]}); train on them separately or give every file a mask")
        self.files = [src[0] for src in sources]
        self.arrays = [src[1] for src in sources]
        self.masks = [src[2] for src in sources] if all(masked) else None
        declared = [src[3] for src in sources if src[3] is not None]
        self.tokenizer_vocab_size = max(declared) if declared else None  # from the shards' manifests
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.pack = pack
        self.ends = [src[4] for src in sources]
        self.dropped_documents = 0
        file_ids, offsets, stops = [], [], []
        for i, arr in enumerate(self.arrays):
            if pack == "documents":
                if self.ends[i] is None:
                    raise ValueError(f"{self.files[i]}: pack='documents' needs token shards (with document offsets)")
                starts, ends, dropped = _document_windows(self.ends[i], seq_len + 1)
                self.dropped_documents += dropped
                file_ids.append(np.full(len(starts), i, dtype=np.int32))
                offsets.append(starts)
                stops.append(ends)
                continue
            n = max(len(arr) - 1, 0) // seq_len  # windows overlap by one token (the last target)
            file_ids.append(np.full(n, i, dtype=np.int32))
            offsets.append(np.arange(n, dtype=np.int64) * seq_len)
            stops.append(np.arange(n, dtype=np.int64) * seq_len + seq_len + 1)
        self.file_ids = np.concatenate(file_ids)
        self.offsets = np.concatenate(offsets)
        self.stops = np.concatenate(stops)
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
    def _span(self, arrays: list[np.ndarray], i: int, dtype) -> np.ndarray:
        """Window ``i``'s positions of one of the per-file arrays, zero-padded to ``seq_len + 1`` (only packed
        documents ever need the padding)."""
        span = arrays[self.file_ids[i]][self.offsets[i] : self.stops[i]]
        if len(span) == self.seq_len + 1:
            return np.asarray(span, dtype=dtype)
        out = np.zeros(self.seq_len + 1, dtype=dtype)
        out[: len(span)] = span
        return out

    def window(self, i: int) -> np.ndarray:
        """The tokens (int64, ``seq_len + 1``) of window ``i`` in file order (zero-padded when packing documents)."""
        return self._span(self.arrays, i, np.int64)

    def window_mask(self, i: int) -> np.ndarray:
        """The loss mask (uint8, 1 = train on the token) of window ``i``; only when the files have one."""
        if self.masks is None:
            raise ValueError("these token files have no loss mask")
        return self._span(self.masks, i, np.uint8)

    def window_documents(self, i: int) -> np.ndarray:
        """Packed documents: the document number (0, 1, ...) of each of window ``i``'s ``seq_len + 1`` positions;
        padding is one more number after the last document's."""
        ends = self.ends[self.file_ids[i]]
        start, stop = int(self.offsets[i]), int(self.stops[i])
        first = int(np.searchsorted(ends, start, side="right"))
        last = int(np.searchsorted(ends, stop, side="left"))  # the document ending at ``stop``
        bounds = np.asarray(ends[first:last], dtype=np.int64) - start  # ends inside the span (exclusive of stop)
        doc = np.full(self.seq_len + 1, len(bounds) + 1, dtype=np.int64)
        doc[: stop - start] = np.searchsorted(bounds, np.arange(stop - start), side="right")
        return doc

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
            self._order = epoch_permutation(self.seed, epoch, n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def index(self, position: int) -> int:
        """The window at ``position`` of the endless stream (samples consumed), epoch after epoch."""
        epoch, j = divmod(position, len(self))
        return int(self.order(epoch)[j])

    # ---- batches for the trainer ----------------------------------------------------------------------------
    def _pairs(self, windows: list[int]) -> tuple[torch.Tensor, ...]:
        xy = torch.from_numpy(np.stack([self.window(i) for i in windows]))
        # clone, not contiguous(): with one row both slices are already "contiguous" views of xy, and masking y
        # in place would then write into x
        x, y = xy[:, :-1].clone(), xy[:, 1:].clone()
        if self.masks is not None:  # the mask of a target position decides whether it is trained on
            keep = torch.from_numpy(np.stack([self.window_mask(i)[1:] for i in windows]))
            y.masked_fill_(keep == 0, IGNORE_INDEX)
        if self.pack != "documents":
            return x, y
        docs = torch.from_numpy(np.stack([self.window_documents(i) for i in windows]))
        # a target in another document than its input (a boundary, or padding) is never trained on
        y.masked_fill_(docs[:, 1:] != docs[:, :-1], IGNORE_INDEX)
        lengths = torch.as_tensor(np.asarray([self.stops[i] - self.offsets[i] for i in windows]))
        y.masked_fill_(torch.arange(1, self.seq_len + 1)[None, :] >= lengths[:, None], IGNORE_INDEX)  # padding
        return x, y, docs[:, :-1].contiguous()

    def batch(self, start: int, size: int) -> tuple[torch.Tensor, ...]:
        """Samples ``start .. start+size-1`` of the stream as (inputs, targets), int64 ``[size, seq_len]``, and the
        positions' document numbers when packing documents.

        Targets are ``-100`` (ignored by the loss) where the loss mask is 0.
        """
        return self._pairs([self.index(s) for s in range(start, start + size)])

    def fixed_batches(self, n_batches: int, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
        """The first windows in file order (no shuffle), as (inputs, targets) batches, for evaluation."""
        return [self._pairs([(b * batch_size + r) % len(self) for r in range(batch_size)]) for b in range(n_batches)]

    def split(self, n_val: int) -> tuple[PackedDataset, PackedDataset]:
        """Hold out the last ``n_val`` windows (file order) for validation; the rest is for training."""
        def narrow(part: PackedDataset, sl: slice) -> None:
            part.file_ids, part.offsets, part.stops = self.file_ids[sl], self.offsets[sl], self.stops[sl]
            part.samples = 0

        return hold_out(self, n_val, "windows", narrow)

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


# --- preference pairs (DPO) ------------------------------------------------------------------------------------

class PreferencePairs:
    """The pairs of a ``phi3data tokenize --preferences`` output: ``chosen/`` and ``rejected/`` masked chat shards
    holding the same pairs in the same order. Pair ``i`` is document ``i`` of each side; a pair whose longer side
    exceeds ``seq_len + 1`` tokens is left out and counted (``dropped_pairs``). Positions in the endless stream
    map to pairs through a seeded permutation per epoch, as for :class:`PackedDataset`."""

    def __init__(self, path: Path | str, seq_len: int, *, seed: int = 0) -> None:
        self.path = Path(path)
        sides = {}
        for side in ("chosen", "rejected"):
            if not (self.path / side).is_dir():
                raise FileNotFoundError(f"{self.path} has no {side}/ folder: give the output of "
                                        "`phi3data tokenize --preferences`")
            shards = open_shards(self.path / side)
            if not shards or any(s.mask is None for s in shards):
                raise ValueError(f"{self.path / side}: needs masked chat shards (tokenize --preferences writes them)")
            sides[side] = shards
        self.tokens = {side: np.concatenate([np.asarray(s.tokens) for s in shards]) for side, shards in sides.items()}
        self.masks = {side: np.concatenate([np.asarray(s.mask) for s in shards]) for side, shards in sides.items()}
        self.starts, self.ends = {}, {}
        for side, shards in sides.items():
            base = np.cumsum([0] + [len(s.tokens) for s in shards[:-1]])
            ends = np.concatenate([np.asarray(s.ends, dtype=np.int64) + b for s, b in zip(shards, base, strict=True)])
            self.ends[side] = ends
            self.starts[side] = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        if len(self.ends["chosen"]) != len(self.ends["rejected"]):
            raise ValueError(f"{self.path}: chosen/ has {len(self.ends['chosen'])} documents and rejected/ "
                             f"{len(self.ends['rejected'])}; they must hold the same pairs")
        vocab = {_vocab_size(s) for shards in sides.values() for s in shards} - {None}
        self.tokenizer_vocab_size = max(vocab) if vocab else None
        self.seq_len = seq_len
        self.seed = seed
        longest = np.maximum(*(self.ends[side] - self.starts[side] for side in ("chosen", "rejected")))
        self.usable = np.flatnonzero(longest <= seq_len + 1)  # pair numbers (document index on each side)
        self.pairs = self.usable  # this part's pairs (a split keeps ``usable`` whole)
        self.total_pairs = len(longest)
        self.dropped_pairs = int(self.total_pairs - len(self.pairs))
        if len(self.pairs) == 0:
            raise ValueError(f"{self.path}: no pair fits seq_len + 1 = {seq_len + 1} tokens")
        self.has_mask = True
        self._order_epoch, self._order = -1, np.arange(0)

    def __len__(self) -> int:
        return len(self.pairs)

    def check_vocab(self, vocab_size: int) -> None:
        if self.tokenizer_vocab_size is not None and self.tokenizer_vocab_size > vocab_size:
            raise ValueError(f"these pairs come from a tokenizer with {self.tokenizer_vocab_size} ids, more than the "
                             f"model's vocab_size {vocab_size}")
        for side, tokens in self.tokens.items():
            if len(tokens) and int(tokens.max()) >= vocab_size:
                raise ValueError(f"{self.path / side}: token id {int(tokens.max())} is outside the model vocab "
                                 f"({vocab_size})")

    def sequence(self, side: str, pair: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and loss mask of pair number ``pair``'s ``side``."""
        a, b = self.starts[side][pair], self.ends[side][pair]
        return self.tokens[side][a:b].astype(np.int64), self.masks[side][a:b]

    def index(self, position: int) -> int:
        """The pair number at ``position`` of the endless stream, epoch after epoch."""
        epoch, j = divmod(position, len(self))
        if epoch != self._order_epoch:
            self._order, self._order_epoch = epoch_permutation(self.seed, epoch, len(self)), epoch
        return int(self.pairs[self._order[j]])

    def collate(self, pairs: list[int]) -> dict[str, torch.Tensor]:
        """Chosen sides then rejected sides as one right-padded batch: ``inputs``, ``targets`` (-100 off the
        assistant's tokens and on padding), int64 ``[2 * len(pairs), L]``, and ``pairs`` (the pair numbers)."""
        seqs = [self.sequence(side, p) for side in ("chosen", "rejected") for p in pairs]
        width = max(len(ids) for ids, _ in seqs) - 1
        inputs = torch.zeros(len(seqs), width, dtype=torch.int64)
        targets = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.int64)
        for row, (ids, mask) in enumerate(seqs):
            n = len(ids) - 1
            inputs[row, :n] = torch.from_numpy(ids[:-1])
            targets[row, :n] = torch.from_numpy(np.where(mask[1:] == 1, ids[1:], IGNORE_INDEX))
        return {"inputs": inputs, "targets": targets, "pairs": torch.as_tensor(pairs, dtype=torch.int64)}

    def batch(self, start: int, size: int) -> dict[str, torch.Tensor]:
        """Positions ``start .. start+size-1`` of the stream, collated."""
        return self.collate([self.index(s) for s in range(start, start + size)])

    def split(self, n_val: int) -> tuple[PreferencePairs, PreferencePairs]:
        """Hold out the last ``n_val`` usable pairs for validation."""
        def narrow(part: PreferencePairs, sl: slice) -> None:
            part.pairs = self.pairs[sl]

        return hold_out(self, n_val, "pairs", narrow)

    def fixed_batches(self, n_batches: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Pairs in order (no shuffle) for evaluation; ``n_batches`` 0 or fewer: all of them."""
        order = self.pairs.tolist()
        if n_batches > 0:
            order = [order[i % len(order)] for i in range(n_batches * batch_size)]
        return [self.collate(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
