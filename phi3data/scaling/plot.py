"""The Figure 3 style plot: log benchmark error against log model size, one line per data recipe."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from phi3data.scaling.fit import PowerLawFit


def plot_scaling(fits: Sequence[PowerLawFit], path: Path, *, metric: str = "error",
                 title: str = "Data-optimal scaling") -> Path:
    """Points with bootstrap error bars, the fitted power law and its band, log-log axes; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=150)
    colors = plt.get_cmap("tab10")
    all_sizes = [s for f in fits for s in f.sizes]
    grid = np.geomspace(min(all_sizes) * 0.8, max(all_sizes) * 1.25, 100)
    for i, fit in enumerate(fits):
        color = colors(i % 10)
        errs = np.array(fit.errors)
        lo = errs - np.array([c[0] for c in fit.error_ci])
        hi = np.array([c[1] for c in fit.error_ci]) - errs
        ax.errorbar(fit.sizes, errs, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], fmt="o", color=color,
                    capsize=3, label=f"{fit.recipe}  (slope {fit.b:+.3f})")
        ax.plot(grid, fit.predict(grid), color=color, lw=1.5)
        band_lo, band_hi = fit.predict_ci(grid)
        ax.fill_between(grid, band_lo, band_hi, color=color, alpha=0.12, lw=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    ax.set_xlabel("model size (non-embedding parameters, log scale)")
    ax.set_ylabel(f"{metric} (log scale)")
    ax.set_title(textwrap.fill(title, 56))  # a long ladder name must not run off the figure
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
