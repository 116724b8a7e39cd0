"""Memory-mapped token data for the trainer.

A token source is either a directory holding ``*.bin`` token files and a ``manifest.json`` with a ``"dtype"``
key (the tokenization stage's shard format), or a single flat ``.bin`` file read with an explicit ``dtype``.
Files are flat little-endian arrays of token ids (``uint16`` or ``uint32``).

Training samples are non-overlapping windows of ``seq_len + 1`` tokens (input + shifted target), visited in a
fresh seeded permutation each epoch. The reader's whole state is one integer (samples consumed), so a
checkpoint stores it and a resumed run sees exactly the samples the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def _resolve_files(path: Path, dtype: str | None) -> tuple[list[Path], np.dtype]:
    if path.is_dir():
        files = sorted(path.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"no *.bin token files in {path}")
        manifest = path / "manifest.json"
        if dtype is None:
            if not manifest.exists():
                raise FileNotFoundError(f"{path} has no manifest.json; pass the token dtype (uint16/uint32)")
            dtype = json.loads(manifest.read_text()).get("dtype")
            if dtype is None:
                raise ValueError(f"{manifest} has no 'dtype' key")
        return files, np.dtype(dtype).newbyteorder("<")
    if not path.exists():
        raise FileNotFoundError(f"token file {path} does not exist")
    if dtype is None:
        manifest = path.with_name("manifest.json")
        if manifest.exists():
            dtype = json.loads(manifest.read_text()).get("dtype")
    if dtype is None:
        raise ValueError(f"token dtype for {path} is unknown: pass dtype='uint16' or 'uint32'")
    return [path], np.dtype(dtype).newbyteorder("<")


class TokenData:
    """Fixed-length windows over memory-mapped token files."""

    def __init__(self, path: str | Path, seq_len: int, dtype: str | None = None, seed: int = 0) -> None:
        self.files, self.dtype = _resolve_files(Path(path), dtype)
        self.seq_len = seq_len
        self.seed = seed
        self.arrays = [np.memmap(f, dtype=self.dtype, mode="r") for f in self.files]
        window = seq_len + 1
        file_ids, offsets = [], []
        for i, arr in enumerate(self.arrays):
            n = (len(arr) - 1) // seq_len  # windows overlap by one token (the last target)
            file_ids.append(np.full(n, i, dtype=np.int32))
            offsets.append(np.arange(n, dtype=np.int64) * seq_len)
        self.file_ids = np.concatenate(file_ids) if file_ids else np.zeros(0, np.int32)
        self.offsets = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
        if len(self.offsets) == 0:
            raise ValueError(f"{path}: fewer than {window} tokens, no training window fits")
        self._perm_epoch = -1
        self._perm = np.arange(0)

    @property
    def num_tokens(self) -> int:
        return int(sum(len(a) for a in self.arrays))

    def __len__(self) -> int:
        return len(self.offsets)

    def window(self, i: int) -> np.ndarray:
        arr = self.arrays[self.file_ids[i]]
        o = self.offsets[i]
        return np.asarray(arr[o : o + self.seq_len + 1], dtype=np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``start .. start+size-1`` of the infinite shuffled stream, as (inputs, targets)."""
        rows = []
        for s in range(start, start + size):
            epoch, j = divmod(s, len(self))
            rows.append(self.window(int(self._order(epoch)[j])))
        xy = torch.from_numpy(np.stack(rows))
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()

    def split(self, n_val: int) -> tuple[TokenData, TokenData]:
        """Hold out the last ``n_val`` windows (file order) for validation; the rest is for training."""
        if not 0 < n_val < len(self):
            raise ValueError(f"cannot hold out {n_val} of {len(self)} windows for validation")
        train, val = object.__new__(TokenData), object.__new__(TokenData)
        for part, sl in ((train, slice(0, len(self) - n_val)), (val, slice(len(self) - n_val, None))):
            part.__dict__.update(self.__dict__)
            part.file_ids, part.offsets = self.file_ids[sl], self.offsets[sl]
            part._perm_epoch, part._perm = -1, np.arange(0)
        return train, val

    def fixed_batches(self, n_batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first windows in file order (no shuffle), for evaluation."""
        out = []
        for bi in range(n_batches):
            idx = [(bi * batch_size + r) % len(self) for r in range(batch_size)]
            xy = torch.from_numpy(np.stack([self.window(i) for i in idx]))
            out.append((xy[:, :-1].contiguous(), xy[:, 1:].contiguous()))
        return out
