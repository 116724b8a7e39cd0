"""Power-law fits, bootstrap intervals, comparison verdicts and the plot, on data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from phi3data.scaling.fit import RunPoint, compare_fits, fit_chinchilla, fit_power_law
from phi3data.scaling.plot import plot_scaling


def _runs(recipe: str, a: float, b: float, noise: float, seeds: int = 3, items: int = 200, rng_seed: int = 0):
    rng = np.random.default_rng(rng_seed)
    out = []
    for n in (1e5, 3e5, 1e6, 3e6):
        mean = np.exp(a + b * np.log(n))
        for s in range(seeds):
            errs = np.clip(mean + rng.normal(0, noise, items), 1e-4, None)
            out.append(RunPoint(recipe, int(n), s, int(20 * n), errs))
    return out


def test_recovers_known_slope_with_a_covering_interval():
    fit = fit_power_law(_runs("web", a=1.0, b=-0.15, noise=0.05), n_boot=400)
    assert fit.b == pytest.approx(-0.15, abs=0.02)
    assert fit.b_ci[0] <= -0.15 <= fit.b_ci[1]
    assert fit.b_ci[0] < fit.b < fit.b_ci[1]
    assert fit.sizes == [100000, 300000, 1000000, 3000000]


def test_noisier_runs_give_wider_intervals():
    narrow = fit_power_law(_runs("a", 1.0, -0.15, 0.01), n_boot=300)
    wide = fit_power_law(_runs("a", 1.0, -0.15, 0.3), n_boot=300)
    assert (wide.b_ci[1] - wide.b_ci[0]) > 3 * (narrow.b_ci[1] - narrow.b_ci[0])


def test_comparison_tells_a_real_gap_from_noise(tmp_path):
    base = fit_power_law(_runs("heuristic", 0.0, -0.1, 0.02, rng_seed=1), n_boot=300)
    better = fit_power_law(_runs("edu", -0.2, -0.1, 0.02, rng_seed=2), n_boot=300)
    assert all(row["significant"] and row["gap"] < 0 for row in compare_fits(base, better, [1e5, 1e6]))
    # under no real difference, a 90% interval should flag a gap in about 1 of 10 replicates
    flagged = 0
    for replicate in range(12):
        same = fit_power_law(_runs("heuristic-again", 0.0, -0.1, 0.02, rng_seed=10 + replicate), n_boot=300)
        flagged += compare_fits(base, same, [3e5])[0]["significant"]
    assert flagged <= 4
    png = plot_scaling([base, better], tmp_path / "scaling.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_chinchilla_form_recovers_parameters():
    rng = np.random.default_rng(0)
    n = np.repeat([1e6, 3e6, 1e7, 3e7], 3)
    d = np.tile([2e7, 6e7, 2e8], 4)
    loss = 1.7 + 400 / n**0.34 + 410 / d**0.28
    fit = fit_chinchilla(n, d, loss * np.exp(rng.normal(0, 0.002, len(n))))
    assert fit.predict(np.array([1e7]), np.array([2e8]))[0] == pytest.approx(
        1.7 + 400 / 1e7**0.34 + 410 / 2e8**0.28, rel=0.02)
