"""Direct preference optimisation: the losses, per-sequence log-probabilities and the reference model's store.

With ``h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))`` over the assistant's
tokens:

- ``sigmoid`` (DPO, Rafailov et al. 2023): ``-(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)``, where
  ``e`` is the label smoothing (conservative DPO; 0 is plain DPO);
- ``ipo`` (Azar et al. 2023): ``(h - 1 / (2 beta))^2`` with per-token mean log-probabilities.

The implicit rewards ``beta (log pi - log ref)`` of each side give the logged reward accuracy and margin.

The reference model never changes during a run, so its log-probabilities are computed once, before the first
step, and stored beside the pairs in ``reference/<key>.npy``; the key hashes the reference weights, the pairs'
shard manifests and the sequence length, so other weights or data never reuse a stale file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from phi3data.io.writers import commit, tmp_path_for
from phi3data.tokenization.dataset import IGNORE_INDEX, PreferencePairs

LOSSES = ("sigmoid", "ipo")
REFERENCE_DIR = "reference"


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the log-probabilities of each row's trained targets (``!= -100``) and how many there are."""
    keep = targets != IGNORE_INDEX
    safe = targets.masked_fill(~keep, 0)
    logits = logits.float()
    token_logps = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logps * keep).sum(-1), keep.sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, kind: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the chosen and rejected rewards, from per-sequence log-probabilities (sums for
    ``sigmoid``, per-token means for ``ipo``)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if kind == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}: use one of {', '.join(LOSSES)}")
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor],
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's (sum, count) of log-probabilities for every row of a collated pair batch (chosen rows first)."""
    logits, _ = model(batch["inputs"].to(device))
    return sequence_logps(logits, batch["targets"].to(device))


def reference_key(reference_dir: Path, pairs: PreferencePairs) -> str:
    """What the stored log-probabilities depend on: the reference weights, the pairs' shards and the length."""
    h = hashlib.sha256()
    for f in sorted(Path(reference_dir).glob("model*.safetensors")):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    for side in ("chosen", "rejected"):
        for manifest in sorted((pairs.path / side).glob("*.json")):
            h.update(manifest.name.encode())
            h.update(manifest.read_bytes())
    h.update(json.dumps({"seq_len": pairs.seq_len}).encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def reference_logps(model: torch.nn.Module, pairs: PreferencePairs, device: torch.device, batch_size: int,
                    say=print) -> np.ndarray:
    """(total_pairs, 4) float64: chosen sum, rejected sum, chosen count, rejected count for every usable pair
    (rows of pairs left out are NaN)."""
    model.eval()
    out = np.full((pairs.total_pairs, 4), np.nan)
    order = pairs.usable.tolist()
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        sums, counts = pair_logps(model, pairs.collate(chunk), device)
        n = len(chunk)
        out[chunk] = torch.stack([sums[:n], sums[n:], counts[:n].double(), counts[n:].double()], 1).cpu().numpy()
        if (i // batch_size) % 20 == 0:
            say(f"reference log-probabilities: {min(i + batch_size, len(order))}/{len(order)} pairs")
    return out


def load_or_compute_reference(model: torch.nn.Module, pairs: PreferencePairs, key: str, device: torch.device,
                              batch_size: int, say=print) -> tuple[np.ndarray, Path, bool]:
    """The stored reference log-probabilities under ``key``, computing and writing them (atomically) when absent.
    Returns (array, path, whether it was computed now)."""
    path = pairs.path / REFERENCE_DIR / f"{key}.npy"
    if path.exists():
        return np.load(path), path, False
    values = reference_logps(model, pairs, device, batch_size, say)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    with open(tmp, "wb") as fh:
        np.save(fh, values)
    commit(tmp, path)
    return values, path, True
