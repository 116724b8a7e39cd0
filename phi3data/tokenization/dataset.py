"""A memory-mapped dataset of packed fixed-length sequences over token shards, for the trainer.

All shards of a directory are one token stream (in shard-name order; documents are already separated by the
end-of-document token). Sample ``i`` is the window ``stream[i*seq_len : i*seq_len + seq_len + 1]`` (inputs and
shifted targets). Each epoch visits the samples in a fresh permutation drawn from ``(seed, epoch)``, so the
order is deterministic; the whole position is ``(epoch, index)``, which ``state_dict`` returns and
``load_state_dict`` restores: a resumed run sees exactly the samples the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from phi3data.tokenization.shards import TokenShard, open_shards


class PackedDataset:
    """Packed windows of ``seq_len + 1`` tokens (and loss mask, when the shards have one)."""

    def __init__(self, paths: Path | str | list, seq_len: int, *, seed: int = 0, shuffle: bool = True):
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        self.shards: list[TokenShard] = []
        for path in map(Path, paths):
            self.shards += open_shards(path) if path.is_dir() else [TokenShard.open(path)]
        self.shards = [s for s in self.shards if len(s.tokens)]
        if not self.shards:
            raise FileNotFoundError(f"no tokens in {', '.join(map(str, paths))}")
        dtypes = {s.tokens.dtype for s in self.shards}
        if len(dtypes) != 1:
            raise ValueError(f"shards mix token dtypes: {sorted(d.name for d in dtypes)}")
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.has_mask = all(s.mask is not None for s in self.shards)
        sizes = np.array([len(s.tokens) for s in self.shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(sizes)])
        self.num_tokens = int(self.shard_starts[-1])
        self.num_samples = (self.num_tokens - 1) // seq_len
        if self.num_samples < 1:
            raise ValueError(f"{self.num_tokens} tokens: not one window of {seq_len + 1} fits")
        self.epoch = 0
        self.index = 0
        self._order_epoch = -1
        self._order = np.arange(0)

    def __len__(self) -> int:
        return self.num_samples

    def _slice(self, start: int, stop: int, mask: bool) -> np.ndarray:
        parts = []
        first = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        for k in range(first, len(self.shards)):
            lo = int(self.shard_starts[k])
            if lo >= stop:
                break
            arr = self.shards[k].mask if mask else self.shards[k].tokens
            parts.append(np.asarray(arr[max(start - lo, 0):stop - lo]))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Window ``i`` (in stream order): ``tokens`` (int64, seq_len + 1) and ``mask`` when present."""
        start = i * self.seq_len
        out = {"tokens": self._slice(start, start + self.seq_len + 1, mask=False).astype(np.int64)}
        if self.has_mask:
            out["mask"] = self._slice(start, start + self.seq_len + 1, mask=True)
        return out

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of an epoch (a seeded permutation, or stream order without shuffling)."""
        if epoch != self._order_epoch:
            n = self.num_samples
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Samples from the current position on, forever (epoch after epoch)."""
        while True:
            order = self.order(self.epoch)
            while self.index < len(order):
                i = int(order[self.index])
                self.index += 1
                yield self.sample(i)
            self.epoch += 1
            self.index = 0

    def batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """The next ``batch_size`` samples stacked: ``tokens`` [B, seq_len + 1] (and ``mask``)."""
        it = iter(self)
        samples = [next(it) for _ in range(batch_size)]
        return {k: np.stack([s[k] for s in samples]) for k in samples[0]}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "seq_len": self.seq_len,
                "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        if state["seq_len"] != self.seq_len or state["num_tokens"] != self.num_tokens:
            raise ValueError("the checkpoint's data position belongs to another dataset or sequence length")
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.index = state["index"]
