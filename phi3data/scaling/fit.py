"""Scaling-law fits with uncertainty.

Per data recipe, ``log(error) = a + b·log(N)`` by least squares, with bootstrap confidence intervals that resample
seeds (whole training runs) and benchmark items. Where the grid has several sizes and token counts, the
Chinchilla form ``L = E + A/N^alpha + B/D^beta`` can be fitted too (Huber loss on log L, as Hoffmann et al.).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class RunPoint:
    """One trained model: its recipe, size (non-embedding parameters), seed, tokens seen, and per-item errors.

    ``item_errors`` holds one error per benchmark item (e.g. 1 - p(correct)); the run's error is their mean. It
    lets the bootstrap resample items as well as seeds.
    """

    recipe: str
    params: int
    seed: int
    tokens: int
    item_errors: np.ndarray
    loss: float | None = None

    @property
    def error(self) -> float:
        return float(np.mean(self.item_errors))


@dataclass
class PowerLawFit:
    recipe: str
    a: float
    b: float
    a_ci: tuple[float, float]
    b_ci: tuple[float, float]
    sizes: list[int]
    errors: list[float]
    error_ci: list[tuple[float, float]]
    samples: np.ndarray  # bootstrap (a, b) pairs

    def predict(self, n: float | np.ndarray) -> float | np.ndarray:
        return np.exp(self.a + self.b * np.log(n))

    def predict_ci(self, n: np.ndarray, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise band of the fitted error at sizes ``n`` from the bootstrap fits."""
        curves = np.exp(self.samples[:, :1] + self.samples[:, 1:2] * np.log(n)[None, :])
        lo, hi = np.quantile(curves, [(1 - level) / 2, (1 + level) / 2], axis=0)
        return lo, hi


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if len(np.unique(x)) < 2:
        return float(np.mean(y)), 0.0
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def _size_means(points: Sequence[RunPoint], item_pick: dict[int, np.ndarray] | None = None,
                seed_pick: dict[int, list[RunPoint]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    by_size: dict[int, list[RunPoint]] = {}
    for p in points:
        by_size.setdefault(p.params, []).append(p)
    sizes = sorted(by_size)
    errors = []
    for size in sizes:
        runs = seed_pick[size] if seed_pick is not None else by_size[size]
        per_run = []
        for run in runs:
            errs = run.item_errors if item_pick is None else run.item_errors[item_pick[len(run.item_errors)]]
            per_run.append(float(np.mean(errs)))
        errors.append(np.mean(per_run))
    return np.array(sizes, dtype=float), np.array(errors)


def fit_power_law(points: Sequence[RunPoint], *, n_boot: int = 1000, level: float = 0.9,
                  seed: int = 0) -> PowerLawFit:
    """Fit log(error) = a + b log(N) over one recipe's runs, with a seeds x items bootstrap."""
    if not points:
        raise ValueError("no runs to fit")
    recipe = points[0].recipe
    sizes, errors = _size_means(points)
    if np.any(errors <= 0):
        raise ValueError(f"{recipe}: errors must be positive to fit in log space")
    a, b = _line(np.log(sizes), np.log(errors))
    rng = np.random.default_rng(seed)
    by_size: dict[int, list[RunPoint]] = {}
    for p in points:
        by_size.setdefault(p.params, []).append(p)
    samples = np.empty((n_boot, 2))
    size_boot = np.empty((n_boot, len(sizes)))
    item_counts = {len(p.item_errors) for p in points}
    for i in range(n_boot):
        seed_pick = {s: [runs[j] for j in rng.integers(0, len(runs), len(runs))] for s, runs in by_size.items()}
        item_pick = {n: rng.integers(0, n, n) for n in item_counts}
        bs, be = _size_means(points, item_pick, seed_pick)
        be = np.maximum(be, 1e-12)
        samples[i] = _line(np.log(bs), np.log(be))
        size_boot[i] = be
    q = [(1 - level) / 2, (1 + level) / 2]
    a_ci = tuple(float(v) for v in np.quantile(samples[:, 0], q))
    b_ci = tuple(float(v) for v in np.quantile(samples[:, 1], q))
    err_ci = [tuple(float(v) for v in np.quantile(size_boot[:, j], q)) for j in range(len(sizes))]
    return PowerLawFit(recipe, a, b, a_ci, b_ci, [int(s) for s in sizes], errors.tolist(), err_ci, samples)


def compare_fits(first: PowerLawFit, second: PowerLawFit, sizes: Sequence[float], level: float = 0.9) -> list[dict]:
    """At each size, the predicted error gap (second - first) and whether its bootstrap interval excludes 0.

    Both fits' bootstrap samples are paired by index; they are independent resamples, so the interval of the
    difference is a fair (slightly conservative) estimate of the noise.
    """
    out = []
    n = min(len(first.samples), len(second.samples))
    for size in sizes:
        f = np.exp(first.samples[:n, 0] + first.samples[:n, 1] * math.log(size))
        s = np.exp(second.samples[:n, 0] + second.samples[:n, 1] * math.log(size))
        diff = s - f
        lo, hi = np.quantile(diff, [(1 - level) / 2, (1 + level) / 2])
        gap = float(second.predict(size) - first.predict(size))
        out.append({"size": float(size), "gap": gap, "ci": (float(lo), float(hi)),
                    "significant": bool(lo > 0 or hi < 0)})
    return out


@dataclass
class ChinchillaFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def predict(self, n: np.ndarray, d: np.ndarray) -> np.ndarray:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)


def fit_chinchilla(params: Sequence[float], tokens: Sequence[float], losses: Sequence[float]) -> ChinchillaFit:
    """Fit L = E + A/N^alpha + B/D^beta (Huber loss on log L, a small grid of starts, L-BFGS)."""
    from scipy.optimize import minimize
    from scipy.special import logsumexp

    n = np.log(np.asarray(params, dtype=float))
    d = np.log(np.asarray(tokens, dtype=float))
    target = np.log(np.asarray(losses, dtype=float))
    if len(target) < 5:
        raise ValueError("the Chinchilla form needs at least 5 runs over several sizes and token counts")

    def objective(theta: np.ndarray) -> float:
        a, b, e, alpha, beta = theta
        pred = logsumexp(np.stack([a - alpha * n, b - beta * d, np.full_like(n, e)]), axis=0)
        r = pred - target
        delta = 1e-3
        huber = np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
        return float(huber.sum())

    best = None
    for a0 in (0.0, 5.0, 10.0):
        for alpha0 in (0.2, 0.5):
            for e0 in (-1.0, 0.5):
                res = minimize(objective, np.array([a0, a0, e0, alpha0, alpha0]), method="L-BFGS-B")
                if best is None or res.fun < best.fun:
                    best = res
    a, b, e, alpha, beta = best.x
    return ChinchillaFit(float(np.exp(e)), float(np.exp(a)), float(np.exp(b)), float(alpha), float(beta))
